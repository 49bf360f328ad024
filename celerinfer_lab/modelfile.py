"""The JSON model file (this project's format and the original CelerInfer layout) in memory: ``Model``,
its checks, tensor encoding, ``save_model``.

A tensor is ``{name, shape, dtype, encoding: "base64", data, preview}``: ``data`` is the
base64 of the raw little-endian C-order bytes, ``preview`` the first values for a human. The
format is documented in docs/model-file.md and docs/model-file.schema.json.

The format's constants and the weights a config implies are in modelformat.py, writing (streamed,
atomic) in writer.py: both re-exported here. Reading is reader.py's ``load_model`` (it builds a
``Model``, so it sits above this module; ``celerinfer_lab.load_model`` is it).
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, ModelConfig  # noqa: F401  (ConfigError re-exported)
from .errors import ModelFileError  # noqa: E402,F401  (defined in errors.py, re-exported here)

# defined in modelformat.py, re-exported here
from .modelformat import (  # noqa: F401
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PREVIEW_LEN,
    _dumps,
    _preview,
    iter_weight_shapes,
    weight_shapes,
)
from .quantize import check_weight_format, decode, encode
from .schema import reduced_weights
from .writer import write_model_file


# ---- the in-memory model -----------------------------------------------------------------------
@dataclass
class Model:
    """A loaded model file: config, weights (numpy, MiniMind names), inputs and RoPE cache."""

    config: ModelConfig
    weights: dict[str, np.ndarray]  # as stored: a tied lm_head is not repeated
    input_ids: np.ndarray  # int64 [B, S]
    attention_mask: np.ndarray  # int64 [B, S], 1 = real token, 0 = padding
    rope_cos: np.ndarray  # float32 [max_position_embeddings, head_dim], halves concatenated
    rope_sin: np.ndarray
    meta: dict = field(default_factory=dict)
    source_format: str = FORMAT_NAME
    # Loaded with a sidecar: watches the mapped file (sidecar.SidecarWatch); None otherwise.
    sidecar_watch: Any = field(default=None, repr=False, compare=False)
    # The format of the reduced weights (schema.reduced_weights): "f32", "bf16" or "q8" (quantize.py).
    # In a bf16/q8 model, ``stored`` holds each reduced weight as the file stores it (bf16 bits, uint16
    # of the weight's shape; Q8_0 bytes, uint8 [out, ceil(in/32) * 34]) and ``weights`` its float32
    # decoding (exact for bf16, rounded once per weight for q8), for everything that reads float32.
    weight_format: str = "f32"
    stored: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Weights keyed by MiniMind's state-dict names; a tied lm_head is the embedding itself."""
        sd = dict(self.weights)
        if self.config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def save(self, path: str | Path, sidecar: bool = False) -> None:
        save_model(self, path, sidecar)

    def weight_values(self, name: str, dtype: type = np.float32) -> np.ndarray:
        """A weight's values in ``dtype``: decoded from its stored form when it has one (exact in
        float64, which is what the precision-matched oracle runs on), else the float32 array."""
        if name in self.stored:
            return decode(self.stored[name], self.weight_format, tuple(self.weights[name].shape), dtype)
        return np.asarray(self.weights[name]).astype(dtype, copy=False)

    def as_format(self, fmt: str) -> Model:
        """This model with its reduced weights in ``fmt`` ("f32", "bf16" or "q8"); itself when already so.
        From float32 each reduced weight is encoded; to float32 the decoded values are kept; between
        bf16 and q8 the decoded values are encoded again (a second rounding: quantize from float32)."""
        check_weight_format(fmt)
        if fmt == self.weight_format:
            return self
        weights, stored = dict(self.weights), {}
        if fmt != "f32":
            for name, shape in reduced_weights(self.config):
                stored[name] = encode(self.weights[name], fmt, name)
                weights[name] = decode(stored[name], fmt, shape)
        return dataclasses.replace(self, weights=weights, stored=stored, weight_format=fmt)

    def check(self, where: str = "model", allow_nonfinite: bool = False) -> None:
        """Check every tensor against the config; raise ModelFileError naming what is wrong."""
        _check_model(self, where, allow_nonfinite)

    def check_sidecar(self) -> None:
        """Raise SidecarError if the memory-mapped sidecar was truncated or rewritten on disk since
        loading (reading it could kill the process with SIGBUS). Forwards call this first."""
        if self.sidecar_watch is not None:
            self.sidecar_watch.check()


# ---- tensors -------------------------------------------------------------------------------------
def encode_tensor(name: str, array: np.ndarray, dtype: str) -> dict[str, Any]:
    """The JSON object of one tensor (what the file holds for it)."""
    arr = np.ascontiguousarray(array, dtype=DTYPES[dtype])
    return {
        "name": name,
        "shape": list(arr.shape),
        "dtype": dtype,
        "encoding": "base64",
        "data": base64.b64encode(arr.tobytes()).decode("ascii"),
        "preview": _preview(arr),
    }


# ---- writing -----------------------------------------------------------------------------------
def save_model(model: Model, path: str | Path, sidecar: bool = False) -> None:
    """Write ``model`` in this project's format (version FORMAT_VERSION), in its weight format: its
    reduced weights' stored bytes as they are (a loaded file saved again is the same bytes)."""
    write_model_file(
        path,
        model.config,
        ((name, model.stored.get(name, array)) for name, array in model.weights.items()),  # reduced: as stored
        model.input_ids,
        model.attention_mask,
        model.rope_cos,
        model.rope_sin,
        model.meta,
        sidecar=sidecar,
        weight_format=model.weight_format,
    )


# ---- checks ----------------------------------------------------------------------------------------
def _check_model(model: Model, where: str, allow_nonfinite: bool = False) -> None:
    config = model.config
    expected = weight_shapes(config)
    for name, shape in expected.items():
        if name not in model.weights:
            raise ModelFileError(f"{where}: missing tensor '{name}' (the config needs it, shape {list(shape)})")
        actual = tuple(model.weights[name].shape)
        if actual != shape:
            raise ModelFileError(f"{where}: tensor '{name}' has shape {list(actual)}, the config implies {list(shape)}")
    for name in model.weights:
        if name not in expected:
            raise ModelFileError(f"{where}: unexpected tensor '{name}' (not a weight of this config)")
    for name, array in model.weights.items():
        if array.dtype.kind != "f":
            raise ModelFileError(f"{where}: tensor '{name}' has dtype {array.dtype}, weights must be floating point")
        if not allow_nonfinite and not np.isfinite(array).all():
            raise ModelFileError(f"{where}: tensor '{name}' contains NaN or Inf")
    check_input_values(model, where)
    rope_shape = (config.max_position_embeddings, config.head_dim)
    for name, array in (("rope cos", model.rope_cos), ("rope sin", model.rope_sin)):
        if tuple(array.shape) != rope_shape:
            raise ModelFileError(
                f"{where}: {name} has shape {list(array.shape)}, expected [max_position_embeddings, head_dim] = {list(rope_shape)}"
            )


def input_problem(ids: np.ndarray, mask: np.ndarray, vocab_size: int, past: int = 0) -> str | None:
    """What is wrong with token ids [B, S] and attention mask [B, past + S] (``past``: tokens already
    in a KV cache), or None: the one check of inputs, for a model file (check_input_values), for
    arrays given to the C++ (NativeModel.check_inputs) and to the reference (ReferenceModel.forward);
    each caller raises it as its own error."""
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        return f"input_ids has shape {list(ids.shape)}, expected [batch >= 1, seq_len >= 1]"  # as the C++ reader says
    expected = (ids.shape[0], past + ids.shape[1])
    if mask.shape != expected:
        if past:
            return f"attention_mask has shape {list(mask.shape)}, expected [batch, past + new] = {list(expected)}"
        return f"attention_mask has shape {list(mask.shape)}, input_ids has {list(ids.shape)}"
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        b, s = bad[0]
        return f"input_ids[{b},{s}] = {ids[b, s]} is outside the vocabulary [0, {vocab_size}) ({len(bad)} such ids)"
    bad = np.argwhere((mask != 0) & (mask != 1))
    if len(bad):
        b, s = bad[0]
        return f"attention_mask[{b},{s}] = {mask[b, s]}; the mask must hold only 0 and 1"
    return None


def check_input_values(model: Model, where: str) -> None:
    """Token ids inside the vocabulary, a 0/1 mask of the ids' shape, seq_len within the RoPE cache."""
    ids, mask, config = model.input_ids, model.attention_mask, model.config
    problem = input_problem(ids, mask, config.vocab_size)
    if problem:
        raise ModelFileError(f"{where}: {problem}")
    if ids.shape[1] > config.max_position_embeddings:
        raise ModelFileError(
            f"{where}: seq_len {ids.shape[1]} is longer than max_position_embeddings {config.max_position_embeddings}"
        )
