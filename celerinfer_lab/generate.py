"""Random MiniMind models and inputs: every parameter matters, activations stay in a realistic range.

Initialisation (per tensor, from one seeded stream, in file order):
* linear weights ~ N(0, 1/fan_in), so every projection keeps unit-scale activations; the two
  projections that write into the residual stream (o_proj, down_proj) are further scaled by
  1/sqrt(2 * layers), as GPT-2 does, so the stream grows gently with depth;
* embeddings (and an untied lm_head) ~ N(0, (2/sqrt(hidden))^2): logits of std about 2;
* RMSNorm weights ~ N(1, 0.1^2): around 1 but not 1, so a forward that ignores a norm weight
  gives a visibly different answer (with all-ones weights that bug is invisible);
* an untied lm_head is drawn separately from the embedding.
Inputs come from a second stream, so changing the model's shape leaves the seed's meaning intact
for the inputs' layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, overload

import numpy as np

from .config import ConfigError, ModelConfig
from .errors import ModelFileError, UsageError
from .flags import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN
from .modelfile import Model, weight_shapes
from .quantize import check_weight_format
from .rope import rope_cache
from .writer import (
    Written,
    check_disk_room,
    check_target,
    human_bytes,
    largest_tensor,
    tensor_count,
    weight_bytes,
    write_model_file,
)

PADDING_MODES = ("none", "left", "right", "mixed")
_RESIDUAL_WRITERS = ("o_proj.weight", "down_proj.weight")


def _init_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], config: ModelConfig) -> np.ndarray:
    if len(shape) == 1:  # RMSNorm weights
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        std = 2.0 / math.sqrt(config.hidden_size)
    else:
        std = 1.0 / math.sqrt(shape[1])
        if name.endswith(_RESIDUAL_WRITERS):
            std /= math.sqrt(2 * config.num_hidden_layers)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed={seed!r}: must be an integer >= 0")


def random_weights(config: ModelConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (state-dict name, float32 array) one tensor at a time, deterministically."""
    _check_seed(seed)
    rng = np.random.default_rng([seed, 0])
    for name, shape in weight_shapes(config).items():
        yield name, _init_tensor(rng, name, shape, config)


def random_inputs(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    seed: int,
    padding: str = "none",
    pad_lengths: list[int] | None = None,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, S], int64.

    padding: "left" / "right" pad every row but the first (the longest sequence sets S);
    "mixed" pads even rows on the left and odd rows on the right. pad_lengths overrides the
    random lengths, one per row. Padded positions hold pad_id and mask 0.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size={batch_size!r}: must be an integer >= 1")
    config.validate(seq_len=seq_len)
    if padding not in PADDING_MODES:
        raise ConfigError(f"padding={padding!r}: must be one of {PADDING_MODES}")
    if not 0 <= pad_id < config.vocab_size:
        raise ConfigError(f"pad_id={pad_id}: must be a token id in [0, vocab_size={config.vocab_size})")
    _check_seed(seed)
    rng = np.random.default_rng([seed, 1])
    ids = rng.integers(0, config.vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    mask = np.ones((batch_size, seq_len), dtype=np.int64)
    if padding == "none":
        if pad_lengths:
            raise ConfigError("pad_lengths given with padding='none': choose left, right or mixed padding")
        return ids, mask
    if pad_lengths is None:
        pad_lengths = [0] + [int(rng.integers(1, seq_len)) if seq_len > 1 else 0 for _ in range(batch_size - 1)]
    if len(pad_lengths) != batch_size:
        raise ConfigError(f"pad_lengths has {len(pad_lengths)} entries, batch_size is {batch_size}")
    for b, n in enumerate(pad_lengths):
        if not 0 <= n < seq_len:
            raise ConfigError(
                f"pad_lengths[{b}]={n}: must be in [0, seq_len={seq_len}) (a row keeps at least one token)"
            )
        left = padding == "left" or (padding == "mixed" and b % 2 == 0)
        cols = slice(0, n) if left else slice(seq_len - n, seq_len)
        ids[b, cols], mask[b, cols] = pad_id, 0
    return ids, mask


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Encoding a float32 weight holds temporaries (padded copy, float64 products, the result) of up to
# this many times its float32 bytes: tracemalloc's peak over quantize.to_q8 of a [1024, 1024]
# weight is 9.1x, over to_bf16 4.0x.
ENCODE_FACTOR = {"f32": 0, "bf16": 4, "q8": 10}


def check_memory(
    config: ModelConfig, batch_size: int, seq_len: int, streamed: bool = True, weight_format: str = "f32"
) -> None:
    """Refuse (UsageError) a model that cannot be generated in the memory available: streamed, its
    largest tensor (and, in bf16 or q8, its encoding's temporaries), the RoPE cache and the inputs are
    in memory at once; returned, all its weights (float32, and their stored form besides)."""
    available = _mem_available()
    if available is None:
        return
    name, shape, largest = largest_tensor(config)
    if streamed:
        weights = largest * (1 + ENCODE_FACTOR[weight_format])
    else:  # float32 values, the stored forms beside them, one tensor's encoding at a time
        weights = config.num_parameters() * 4 + largest * ENCODE_FACTOR[weight_format]
        weights += weight_bytes(config, weight_format) if weight_format != "f32" else 0
    rope = 2 * config.max_position_embeddings * config.head_dim * 4
    inputs = 2 * batch_size * seq_len * 8
    need = weights + rope + inputs
    if need > available:
        what = (
            f"its largest tensor ({name} {list(shape)}, {human_bytes(largest)})"
            if streamed
            else f"its weights ({config.num_parameters():,} parameters, {human_bytes(weights)})"
        )
        raise UsageError(
            f"this model does not fit in memory: {what}, the RoPE cache ([{config.max_position_embeddings}, "
            f"{config.head_dim}] x 2, {human_bytes(rope)}) and the inputs ({human_bytes(inputs)}) need "
            f"{human_bytes(need)}, {human_bytes(available)} is available"
        )


# For type checkers: the result follows ``output``, a Model without it, the Path written with it (by keyword).
@overload
def generate_model(
    config: ModelConfig,
    batch_size: int = 2,
    seq_len: int = 5,
    seed: int = 123,
    padding: str = "none",
    pad_lengths: list[int] | None = None,
    pad_id: int = 0,
    output: None = None,
    progress: bool | None = None,
    sidecar: bool = False,
    weights: str = "f32",
) -> Model: ...
@overload
def generate_model(
    config: ModelConfig,
    batch_size: int = 2,
    seq_len: int = 5,
    seed: int = 123,
    padding: str = "none",
    pad_lengths: list[int] | None = None,
    pad_id: int = 0,
    *,
    output: str | Path,
    progress: bool | None = None,
    sidecar: bool = False,
    weights: str = "f32",
) -> Path: ...
def generate_model(
    config: ModelConfig,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 123,
    padding: str = "none",
    pad_lengths: list[int] | None = None,
    pad_id: int = 0,
    output: str | Path | None = None,
    progress: bool | None = None,
    sidecar: bool = False,
    weights: str = "f32",
) -> Model | Path:
    """A random model with inputs. With ``output`` it is streamed to that file (one tensor in
    memory at a time) and the path is returned (missing parent folders are created; an existing
    model is replaced atomically: see writer.py); without, the Model is returned. ``sidecar``: the
    weights go to a safetensors file beside the JSON (see writer.write_model_file).

    Refused before anything large is allocated: a model that does not fit in the available memory
    (UsageError), or in the output folder's free space (ModelFileError). An output that is a
    folder, or ends in .safetensors with a sidecar, is a UsageError; a file that cannot be written
    (a full disk, a read-only folder, a file in the way) is a ModelFileError naming it.

    ``weights``: the weight format, "f32", "bf16" or "q8" (quantize.py): the same random float32
    weights, the reduced ones (projections, experts, head) then stored in that format (Model.as_format;
    the file's "weight_format"). A bad name is a ConfigError."""
    if output is not None:
        written = generate_model_file(
            config,
            batch_size,
            seq_len,
            seed,
            padding,
            pad_lengths,
            pad_id,
            output=output,
            progress=progress,
            sidecar=sidecar,
            weights=weights,
        )
        return written.path
    _check_request(config, batch_size, seq_len, seed, streamed=False, weight_format=weights)
    input_ids, attention_mask = random_inputs(config, batch_size, seq_len, seed, padding, pad_lengths, pad_id)
    cos, sin = rope_cache(config)
    meta = _meta(config, batch_size, seq_len, seed, padding)
    model = Model(config, dict(random_weights(config, seed)), input_ids, attention_mask, cos, sin, meta)
    return model.as_format(weights)


def generate_model_file(
    config: ModelConfig,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 123,
    padding: str = "none",
    pad_lengths: list[int] | None = None,
    pad_id: int = 0,
    *,
    output: str | Path,
    progress: bool | None = None,
    sidecar: bool = False,
    weights: str = "f32",
) -> Written:
    """generate_model with ``output``, returning what was written (writer.Written: paths and sizes)."""
    _check_request(config, batch_size, seq_len, seed, streamed=True, weight_format=weights)
    output = check_target(output, sidecar)
    blocking = next((parent for parent in output.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ModelFileError(f"cannot write {output}: {blocking} is a file, not a folder")
    check_disk_room(output, config, batch_size, seq_len, sidecar, weights)
    input_ids, attention_mask = random_inputs(config, batch_size, seq_len, seed, padding, pad_lengths, pad_id)
    cos, sin = rope_cache(config)
    meta = _meta(config, batch_size, seq_len, seed, padding)
    tensors = random_weights(config, seed)
    if progress is None:
        progress = config.num_parameters() >= 20_000_000
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(
            f"cannot write {output}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        ) from exc
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tensor_count(config), desc=f"writing {output.name}", unit="tensor")
    try:
        return write_model_file(
            output,
            config,
            tensors,
            input_ids,
            attention_mask,
            cos,
            sin,
            meta,
            on_tensor=(lambda _name: bar.update()) if bar else None,
            sidecar=sidecar,
            weight_format=weights,
        )
    finally:
        if bar:
            bar.close()


def _check_request(
    config: ModelConfig, batch_size: int, seq_len: int, seed: int, streamed: bool, weight_format: str = "f32"
) -> None:
    """Refuse a bad seed, batch size, weight format or config, or a model that does not fit in memory
    (see check_memory)."""
    _check_seed(seed)
    if not isinstance(weight_format, str):
        raise ConfigError(f"weights={weight_format!r}: must be one of f32, bf16, q8")
    check_weight_format(weight_format)
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ConfigError(f"batch_size={batch_size!r}: must be an integer >= 1")
    config.validate(seq_len=seq_len)
    check_memory(config, batch_size, seq_len, streamed=streamed, weight_format=weight_format)


def _meta(config: ModelConfig, batch_size: int, seq_len: int, seed: int, padding: str) -> dict[str, object]:
    """What the file's meta records of how the model was made."""
    return {
        "generator": "celerinfer-lab",
        "seed": seed,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "padding": padding,
        "num_parameters": config.num_parameters(),
    }
