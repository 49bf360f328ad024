"""Real checkpoints in and out: Hugging Face folders and MiniMind's .pth files to a model file, and a
model file back to a Hugging Face folder that ``transformers`` loads.

Import (``import_checkpoint``):

* a folder with ``config.json`` and ``model.safetensors`` (or sharded, with
  ``model.safetensors.index.json``) or ``pytorch_model.bin``: LlamaForCausalLM, Qwen3ForCausalLM,
  Qwen3MoeForCausalLM, MiniMindForCausalLM (model_type "minimind"); each config field mapped onto
  ``ModelConfig`` (``config_from_hf``), every feature this project does not run refused by name;
* a MiniMind ``.pth`` state dict of any era (``ERAS``): the era is found from the tensor names, and
  sets the names' mapping, the RoPE pairing, the top-k rule and the defaults of the fields the
  tensors cannot tell (heads, eps, theta); ``era=`` overrides; a file two eras fit, where they would
  give different models, is refused with both named.

Nothing in a file is executed: safetensors headers are parsed by the sidecar's parser
(``sidecar.parse_safetensors_header``: a strict-JSON header and raw bytes), pickles go
through ``torch.load(weights_only=True)``, which refuses any object but tensors and containers.
Tensors are read one at a time (safetensors memory-mapped, ``torch.load(mmap=True)``) and, with an
output path, streamed into the writer: one float32 tensor in memory at a time besides the mapping.

Export (``export_checkpoint``): ``config.json`` + ``model.safetensors``, as Llama (dense), Qwen3
(q/k norm) or Qwen3-MoE (MoE with q/k norm), or MiniMind's own HF format (``fmt="minimind"``).
What transformers cannot express (interleaved RoPE, shared experts, the "k>1" top-k rule, MiniMind's
YaRN) is refused with the reason; transformers' YaRN (``rope_scaling.rule`` "transformers", what a
HF yarn folder imports as) travels as ``rope_parameters`` yarn. The config's fields with no HF name
travel in ``config.json`` under ``"celerinfer_lab"``, so ``import_checkpoint(export_checkpoint(m))``
gives ``m`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .config import DEFAULT_YARN, ConfigError, ModelConfig
from .errors import CheckpointError, ModelFileError
from .generate import random_inputs
from .modelfile import Model, weight_shapes
from .reader import load_model
from .rope import rope_cache
from .sidecar import SAFETENSORS_DTYPES, parse_safetensors_header
from .writer import write_model_file, write_safetensors

ARCHITECTURES = {  # HF architecture -> model_type
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MiniMindForCausalLM": "minimind",
}
EXPORT_FORMATS = ("hf", "minimind")


# ---- MiniMind's eras -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Era:
    """One generation of MiniMind's model code: how its state dict names tensors and what its math is."""

    code: str  # where in MiniMind's history
    names: str  # "v1" (tok_embeddings, layers.N.attention.wq, ...) or "hf" (model.embed_tokens, ...)
    rope_pairing: str
    topk_renorm: str
    defaults: dict[str, Any]  # the config fields a state dict cannot tell, as that era's config had them


ERAS = {
    "v1": Era(
        "model/model.py `Transformer` (Aug 2024 - Feb 2025): RoPE by complex multiply (interleaved pairs)",
        "v1",
        "interleaved",
        "k>1",
        dict(num_attention_heads=16, rope_theta=1e4, max_position_embeddings=512, rms_norm_eps=1e-5),
    ),
    "minimindlm": Era(
        "model/model.py `MiniMindLM` (Feb - Apr 2025, MiniMind2's .pth files): the v1 names, interleaved pairs",
        "v1",
        "interleaved",
        "k>1",
        dict(num_attention_heads=8, rope_theta=1e6, max_position_embeddings=8192, rms_norm_eps=1e-5),
    ),
    "minimind2": Era(
        "model/model_minimind.py `MiniMindForCausalLM` (Apr 2025 - Mar 2026): HF names, rotate_half",
        "hf",
        "half",
        "k>1",
        dict(num_attention_heads=8, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5),
    ),
    "minimind3": Era(
        "model/model_minimind.py MiniMind-3 (Mar 2026 -): HF names with q/k norm, top-k always renormalised",
        "hf",
        "half",
        "always",
        dict(num_attention_heads=8, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6),
    ),
}

# v1 names -> HF names, after "layers.N." (per layer) or whole (model level)
_V1_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_W123 = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}  # MiniMind v1's FeedForward: w1 gate, w2 down, w3 up
_V1_LAYER: list[tuple[str, Callable[[re.Match[str]], str]]] = [
    (r"attention\.w([qkvo])\.weight", lambda m: f"self_attn.{m[1]}_proj.weight"),
    (r"attention_norm\.weight", lambda m: "input_layernorm.weight"),
    (r"ffn_norm\.weight", lambda m: "post_attention_layernorm.weight"),
    (r"feed_forward\.gate\.weight", lambda m: "mlp.gate.weight"),
    (r"feed_forward\.(experts\.\d+\.)?w([123])\.weight", lambda m: f"mlp.{m[1] or ''}{_W123[m[2]]}.weight"),
    (r"feed_forward\.shared_experts\.w([123])\.weight", lambda m: f"mlp.shared_experts.0.{_W123[m[1]]}.weight"),
]
# buffers, not weights: RoPE caches, the v1 causal mask, HF's position ids (recomputed here, or unused)
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|freqs_cos|freqs_sin|pos_cis|attention\.mask|position_ids)$")
_BIAS = re.compile(r".*\.bias$")


def _strip_prefix(name: str) -> str:
    for prefix in ("_orig_mod.", "module."):  # torch.compile / DataParallel wrappers
        name = name.removeprefix(prefix)
    return name


def _rename_v1(name: str, where: str) -> str:
    if name in _V1_TOP:
        return _V1_TOP[name]
    found = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if found:
        for pattern, build in _V1_LAYER:
            m = re.fullmatch(pattern, found[2])
            if m:
                return f"model.layers.{found[1]}.{build(m)}"
    raise CheckpointError(f"{where}: tensor '{name}' is not a weight of MiniMind's v1 layout")


def _naming(names: list[str]) -> set[str]:
    """Which naming ("v1", "hf") the tensor names use."""
    found = set()
    for name in names:
        if name.startswith(("tok_embeddings.", "output.")) or re.match(r"layers\.\d+\.(attention|feed_forward)", name):
            found.add("v1")
        elif name.startswith(("model.", "lm_head.")):
            found.add("hf")
    return found


def detect_era(names: list[str], given: dict[str, Any], where: str) -> str:
    """The era whose names the state dict uses; CheckpointError when none or several fit (several
    only matter when they would give different models under the fields already ``given``)."""
    naming = _naming(names)
    if len(naming) != 1:
        what = (
            "both v1 (tok_embeddings, layers.N.attention.wq) and HF (model.embed_tokens) names"
            if naming
            else "no MiniMind tensor names"
        )
        raise CheckpointError(f"{where}: {what}: cannot tell the era; pass era= (--era) one of {sorted(ERAS)}")
    if naming == {"hf"}:
        return "minimind3" if any(n.endswith("self_attn.q_norm.weight") for n in names) else "minimind2"
    if any(n.endswith("attention.mask") for n in names):
        return "v1"  # the first v1 versions saved the causal mask as a buffer
    candidates = ["v1", "minimindlm"]
    settings = {era: {**ERAS[era].defaults, **given} for era in candidates}
    differ = sorted(k for k in settings["v1"] if settings["v1"][k] != settings["minimindlm"][k])
    if differ:
        lines = "; ".join(f"{era}: {ERAS[era].code}" for era in candidates)
        raise CheckpointError(
            f"{where}: the tensor names fit two eras that differ in {', '.join(differ)} ({lines}); "
            f"pass era= (--era v1 or --era minimindlm), or give {', '.join(differ)} in config.json or as flags"
        )
    return "minimindlm"


# ---- reading tensors, one at a time, executing nothing ------------------------------------------------
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


class _Tensors:
    """The tensors of a checkpoint by name: ``shape(name)`` and ``get(name)`` (float32, one at a time)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._get: dict[str, Callable[[], np.ndarray]] = {}

    def get(self, name: str) -> np.ndarray:
        return self._get[name]()

    def add_safetensors(self, path: Path) -> None:
        """The tensors of a safetensors file, its header checked by the one parser (sidecar.py): any
        safetensors dtype spans its bytes; weights must be a float dtype, buffers are only seen."""
        where = str(path)
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{where}: cannot read: {exc}") from exc
        data_start, entries = parse_safetensors_header(
            lambda offset, length: bytes(data[offset : offset + length]),
            len(data),
            where,
            CheckpointError,
            SAFETENSORS_DTYPES,
            f"not a safetensors dtype ({', '.join(SAFETENSORS_DTYPES)})",
            exact_tiling=False,  # each tensor inside the data is enough to read it (the sidecar is held to more)
            aligned=False,
        )
        body = data[data_start:]
        for name, e in entries.items():
            if _IGNORED.match(name):
                self.shapes[name] = e.shape  # a buffer: seen (for the era), never decoded
                continue
            if e.dtype not in _ST_DTYPES:
                raise CheckpointError(f"{where}: tensor '{name}' has dtype {e.dtype}; supported: {sorted(_ST_DTYPES)}")
            self._add(name, e.shape, _lazy(_decode, body[e.start : e.end], e.dtype, e.shape), where)

    def add_pickle(self, path: Path) -> None:
        import torch  # here: importing the package must not load torch

        where = str(path)
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # an old (non-zip) file cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError (code in the pickle), a truncated zip, ...
            raise CheckpointError(f"{where}: {_load_failure(exc)}") from exc
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{where}: holds a {type(sd).__name__}, not a state dict (name -> tensor)")
        for name, tensor in sd.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{where}: '{name}' is a {type(tensor).__name__}, not a tensor")
            if _IGNORED.match(_strip_prefix(str(name))):
                self.shapes[_strip_prefix(str(name))] = tuple(tensor.shape)  # a buffer: seen, never decoded
                continue
            if not tensor.is_floating_point():
                raise CheckpointError(
                    f"{where}: tensor '{name}' has dtype {tensor.dtype}; weights must be floating point"
                )
            shape = tuple(tensor.shape)
            self._add(str(name), shape, _lazy(_tensor_to_numpy, tensor), where)

    def split_fused_experts(self, where: str) -> None:
        """transformers 5 keeps a MoE layer's experts fused: ``mlp.experts.gate_up_proj`` [E, 2I, H]
        (gate rows first) and ``mlp.experts.down_proj`` [E, H, I]; seen as per-expert tensors here."""
        for name in [n for n in self.shapes if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]:
            shape = self.shapes.pop(name)
            get = self._get.pop(name)
            if len(shape) != 3 or (name.endswith("gate_up_proj") and shape[1] % 2):
                raise CheckpointError(f"{where}: fused expert tensor '{name}' has shape {list(shape)}")
            prefix = name.rsplit(".", 1)[0]
            if name.endswith("down_proj"):
                parts = [("down_proj", 0, shape[1])]
            else:
                parts = [("gate_proj", 0, shape[1] // 2), ("up_proj", shape[1] // 2, shape[1])]
            for e in range(shape[0]):
                for part, lo, hi in parts:
                    key = f"{prefix}.{e}.{part}.weight"
                    self.shapes[key] = (hi - lo, shape[2])
                    self._get[key] = _lazy(_slice, get, e, lo, hi)

    def _add(self, name: str, shape: tuple[int, ...], get: Callable[[], np.ndarray], where: str) -> None:
        name = _strip_prefix(name)
        if name in self.shapes:
            raise CheckpointError(f"{where}: tensor '{name}' appears twice")
        self.shapes[name], self._get[name] = shape, get


def _lazy(fn: Callable[..., np.ndarray], *args: Any) -> Callable[[], np.ndarray]:
    """``fn(*args)`` when called: a tensor decoded only when the writer asks for it."""
    return lambda: fn(*args)


def _load_failure(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to load it unsafely."""
    import pickle

    text = str(exc)
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", text)
    if found or (isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" not in text):
        what = f" ({found[1]})" if found else ""
        return (
            f"the pickle holds objects other than tensors{what}: building them would run code from the file, "
            "so it is refused (torch.load(weights_only=True)); only plain state dicts of tensors are read"
        )
    lines = [
        x for x in text.splitlines() if x.strip() and not x.startswith(("Weights only", "Check the doc", "Please file"))
    ]
    first = lines[0].strip() if lines else type(exc).__name__
    return f"not a torch checkpoint torch.load(weights_only=True) can read: {first}"


def _slice(get: Callable[[], np.ndarray], e: int, lo: int, hi: int) -> np.ndarray:
    return np.ascontiguousarray(get()[e, lo:hi])


def _tensor_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    return tensor.detach().to(torch.float32).contiguous().numpy()


def _decode(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = raw.view(_ST_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":  # bfloat16 is float32's upper half
        return (arr.astype("<u4") << 16).view("<f4")
    return np.array(arr, dtype=np.float32)


def _read_folder(folder: Path) -> _Tensors:
    tensors = _Tensors()
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index (a 'weight_map' of name -> shard): {exc}") from exc
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index}: names shard '{shard}', which is not in {folder}")
            tensors.add_safetensors(folder / shard)
        missing = sorted(set(weight_map) - set(tensors.shapes))
        if missing:
            raise CheckpointError(f"{index}: tensor '{missing[0]}' is in the index but in none of its shards")
    elif (folder / "model.safetensors").is_file():
        tensors.add_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        tensors.add_pickle(folder / "pytorch_model.bin")
    else:
        pths = sorted(folder.glob("*.pth"))
        if len(pths) != 1:
            raise CheckpointError(
                f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
                + (f", and {len(pths)} .pth files (name one)" if pths else "")
            )
        tensors.add_pickle(pths[0])
    return tensors


# ---- config.json -> ModelConfig ---------------------------------------------------------------------
def _refuse(where: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {field}={value!r}: {why}")


def config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> tuple[str, dict[str, Any]]:
    """(model_type, ModelConfig fields) for a Hugging Face config.json; CheckpointError naming the
    first feature this project does not run."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if archs and archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{where}: unknown architecture {archs[0]!r}; supported: {', '.join(ARCHITECTURES)}")
    if archs:
        model_type = ARCHITECTURES[archs[0]]
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES.values():
        raise CheckpointError(
            f"{where}: unknown model_type {model_type!r}; supported: {', '.join(ARCHITECTURES.values())}"
        )
    if model_type == "minimind":  # MiniMind's config uses this project's field names (config.py)
        if cfg.get("scoring_func", "softmax") != "softmax":
            raise _refuse(where, "scoring_func", cfg["scoring_func"], "only a softmax router is supported")
        scaling = cfg.get("rope_scaling")
        if cfg.get("inference_rope_scaling") and isinstance(scaling, dict) and "rule" in scaling:
            if scaling["rule"] != "minimind":
                raise _refuse(
                    where,
                    "rope_scaling.rule",
                    scaling["rule"],
                    "MiniMind's code computes MiniMind's YaRN (rule 'minimind')",
                )
        known = {f.name for f in dataclasses.fields(ModelConfig)} | {"n_routed_experts", "norm_topk_prob"}
        # the rest (dropout, flash_attn, aux_loss_alpha, bos/eos ids, torch_dtype, ...) does not change the forward
        mm = {k: v for k, v in cfg.items() if k in known}
        mm.update(cfg.get("celerinfer_lab") or {})
        return model_type, mm
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field):
            raise _refuse(where, field, cfg[field], "biases are not supported (MiniMind's projections have none)")
    if cfg.get("use_sliding_window") or (model_type == "llama" and cfg.get("sliding_window")):
        raise _refuse(where, "use_sliding_window", True, "sliding-window attention is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(where, "hidden_act", act, "only silu (SwiGLU) is supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ("default", "yarn"):
        raise _refuse(
            where, "rope_type", rope_type, "only the default RoPE and YaRN are supported for HF architectures"
        )
    heads = cfg["num_attention_heads"]
    fields: dict[str, Any] = dict(
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)) if isinstance(rope, dict) else 1e4),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
    )
    if rope_type == "yarn":
        fields.update(inference_rope_scaling=True, rope_scaling=_yarn_from_hf(rope, cfg, where))
    if model_type == "qwen3_moe":
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise _refuse(
                where, "mlp_only_layers", cfg.get("mlp_only_layers"), "dense layers among MoE layers are not supported"
            )
        fields.update(
            use_moe=True,
            num_experts=cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"],  # v5's name
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            topk_renorm="always" if cfg.get("norm_topk_prob", False) else "never",
        )
    fields.update(cfg.get("celerinfer_lab") or {})  # what an export here kept (sizing_rule, ...)
    return model_type, fields


def _mscale(scale: float, mscale: float = 1) -> float:
    """transformers' get_mscale (_compute_yarn_parameters)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_from_hf(rope: dict[str, Any], cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """rope_scaling (rule "transformers") for a HF YaRN ``rope``, every value transformers would use
    made explicit: original_max_position_embeddings as standardize_rope_params finds it, factor None as
    max_position_embeddings / original, attention_factor derived from factor, mscale and mscale_all_dim
    when absent, beta_fast/beta_slow 32/1 when absent or zero, truncate true when absent."""
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(
            where, "partial_rotary_factor", rope["partial_rotary_factor"], "RoPE on part of a head is not supported"
        )
    orig = cfg.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
    if orig is None:
        orig = cfg["max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None and isinstance(orig, (int, float)) and orig > 0:  # else named by ModelConfig's check
        factor = cfg["max_position_embeddings"] / orig
    attention_factor = rope.get("attention_factor")
    if attention_factor is None and isinstance(factor, (int, float)):
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_mscale(factor, mscale) / _mscale(factor, mscale_all_dim))
        else:
            attention_factor = _mscale(factor)
    return {
        "type": "yarn",
        "rule": "transformers",
        "factor": factor,
        "original_max_position_embeddings": orig,
        "beta_fast": rope.get("beta_fast") or 32,
        "beta_slow": rope.get("beta_slow") or 1,
        "attention_factor": attention_factor,
        "truncate": rope.get("truncate", True),
    }


# ---- import -------------------------------------------------------------------------------------------
def _shapes_config(shapes: dict[str, tuple[int, ...]], given: dict[str, Any], era: Era, where: str) -> dict[str, Any]:
    """ModelConfig fields from the tensors' shapes (HF names), the era's defaults and ``given``."""
    try:
        vocab, hidden = shapes["model.embed_tokens.weight"]
        q_dim = shapes["model.layers.0.self_attn.q_proj.weight"][0]
        kv_dim = shapes["model.layers.0.self_attn.k_proj.weight"][0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: missing tensor {exc} (needed to tell the model's sizes)") from exc
    fields = {**era.defaults, **given}
    if "model.layers.0.self_attn.q_norm.weight" in shapes:
        fields.setdefault("head_dim", shapes["model.layers.0.self_attn.q_norm.weight"][0])
        if "num_attention_heads" not in given:
            fields["num_attention_heads"] = q_dim // fields["head_dim"]
    fields.setdefault("head_dim", q_dim // fields["num_attention_heads"])
    layers = 1 + max(int(m[1]) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n)))
    experts = {int(m[1]) for n in shapes if (m := re.match(r"model\.layers\.0\.mlp\.experts\.(\d+)\.", n))}
    shared = {int(m[1]) for n in shapes if (m := re.match(r"model\.layers\.0\.mlp\.shared_experts\.(\d+)\.", n))}
    out = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_key_value_heads=kv_dim // fields["head_dim"]
    )
    out["qk_norm"] = "model.layers.0.self_attn.q_norm.weight" in shapes
    if experts:
        out.update(use_moe=True, num_experts=len(experts), n_shared_experts=len(shared))
        out["moe_intermediate_size"] = shapes["model.layers.0.mlp.experts.0.gate_proj.weight"][0]
        out["intermediate_size"] = out["moe_intermediate_size"]
        fields.setdefault("num_experts_per_tok", 2 if era.names == "v1" else 1)
    else:
        out["intermediate_size"] = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    out.update(rope_pairing=era.rope_pairing, topk_renorm=era.topk_renorm)
    return {**out, **fields}


def _is_tied(tensors: _Tensors, embed: str, head: str) -> bool:
    """A state dict saved from a tied model holds the embedding twice (same values)."""
    return tensors.shapes[embed] == tensors.shapes[head] and np.array_equal(tensors.get(embed), tensors.get(head))


def _open(src: Path) -> _Tensors:
    """The tensors of a folder or a single checkpoint file (nothing decoded yet)."""
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if src.is_dir():
        tensors = _read_folder(src)
    else:
        tensors = _Tensors()
        if src.suffix == ".safetensors":
            tensors.add_safetensors(src)
        else:
            tensors.add_pickle(src)
    tensors.split_fused_experts(str(src))
    return tensors


def _read_config(path: Path) -> dict[str, Any] | None:
    """The config.json beside a checkpoint, or None when there is none."""
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return cfg


def _hf_names(tensors: _Tensors, where: str) -> dict[str, str]:
    """HF name -> the checkpoint's name, for every weight (buffers left out, biases refused)."""
    names = [n for n in tensors.shapes if not _IGNORED.match(n)]
    for name in names:
        if _BIAS.match(name):
            raise CheckpointError(
                f"{where}: tensor '{name}': biases are not supported (MiniMind's projections have none)"
            )
    v1 = _naming(names) == {"v1"}
    return {(_rename_v1(name, where) if v1 else name): name for name in names}


def _fields(
    src: Path, tensors: _Tensors, rename: dict[str, str], era_name: str | None, given: dict[str, Any], meta: dict
) -> dict[str, Any]:
    """ModelConfig fields: from a HF config.json, or (a bare state dict) from the shapes, the era and
    any config.json fields; ``given`` wins. Records the architecture or era in ``meta``."""
    where = str(src)
    cfg_path = (src if src.is_dir() else src.parent) / "config.json"
    cfg = _read_config(cfg_path)
    if cfg is None or not (cfg.get("architectures") or cfg.get("model_type") in ARCHITECTURES.values()):
        given = {**(cfg or {}), **given}
        meta["era"] = era_name or detect_era(list(tensors.shapes), given, where)
        return _shapes_config(
            {new: tensors.shapes[old] for new, old in rename.items()}, given, ERAS[meta["era"]], where
        )
    try:
        model_type, fields = config_from_hf(cfg, str(cfg_path))
    except KeyError as exc:
        raise CheckpointError(f"{cfg_path}: missing field {exc}") from exc
    except TypeError as exc:
        raise CheckpointError(f"{cfg_path}: a field of the wrong type: {exc}") from exc
    meta["architecture"] = model_type
    if model_type == "minimind":  # what MiniMind's config does not say, its era (from the tensors) does
        meta["era"] = era_name or detect_era(list(tensors.shapes), {}, where)
        era = ERAS[meta["era"]]
        fields.setdefault("rope_pairing", era.rope_pairing)
        fields.setdefault("sizing_rule", "minimind3" if meta["era"] == "minimind3" else "minimind2")
        fields.setdefault("qk_norm", "model.layers.0.self_attn.q_norm.weight" in rename)
        if "topk_renorm" not in fields and "norm_topk_prob" not in fields:
            fields["topk_renorm"] = era.topk_renorm
    return {**fields, **given}


def _resolve_tie(rename: dict[str, str], fields: dict[str, Any], tensors: _Tensors, where: str) -> None:
    """Tied or not, from the config and the tensors: a tied model's state dict may hold the embedding
    twice (v1, torch.save) or only under the head's name; a head of its own means untied."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    said = fields.get("tie_word_embeddings")
    if head in rename and embed not in rename and said is not False:
        rename[embed] = rename.pop(head)  # a tied model saved under the head's name
    elif head in rename and embed in rename and said is not False:
        if _is_tied(tensors, rename[embed], rename[head]):
            del rename[head]
            fields["tie_word_embeddings"] = True
        elif said is True:  # said tied, holds a head of its own: which one runs?
            raise CheckpointError(
                f"{where}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight "
                "(transformers would ignore the head; set tie_word_embeddings to false if the head is meant)"
            )
        else:
            fields["tie_word_embeddings"] = False


def _check_tensors(config: ModelConfig, rename: dict[str, str], tensors: _Tensors, where: str) -> dict[str, str]:
    """Every weight the config implies is there with its shape, and nothing else: model-file name ->
    checkpoint name, in file order."""
    expected = weight_shapes(config)
    for name, shape in expected.items():
        if name not in rename:
            raise CheckpointError(f"{where}: missing tensor '{name}' (the config needs it, shape {list(shape)})")
        actual = tuple(tensors.shapes[rename[name]])
        if actual != shape:
            raise CheckpointError(
                f"{where}: tensor '{rename[name]}' has shape {list(actual)}, the config implies {list(shape)}"
            )
    extra = sorted(set(rename) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor '{rename[extra[0]]}' (not a weight of this config)")
    return {name: rename[name] for name in expected}


def _plan(
    src: Path, era_name: str | None, given: dict[str, Any]
) -> tuple[ModelConfig, dict[str, str], _Tensors, dict[str, Any]]:
    """(config, model-file name -> checkpoint name, the tensors, meta) for ``src``, nothing decoded yet."""
    where = str(src)
    tensors = _open(src)
    rename = _hf_names(tensors, where)
    meta: dict[str, Any] = {"imported_from": where}
    fields = _fields(src, tensors, rename, era_name, given, meta)
    _resolve_tie(rename, fields, tensors, where)
    try:
        config = ModelConfig.from_dict(fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return config, _check_tensors(config, rename, tensors, where), tensors, meta


def import_checkpoint(
    src: str | Path,
    output: str | Path | None = None,
    *,
    era: str | None = None,
    config: dict[str, Any] | None = None,
    sidecar: bool = False,
    batch_size: int = 2,
    seq_len: int = 8,
    padding: str = "left",
    seed: int = 0,
) -> Model:
    """A model from a checkpoint (a HF folder, a .safetensors, .bin or .pth file): its weights, a
    config mapped from config.json (or from the tensors' shapes, the era and ``config``'s fields for
    a bare state dict), random inputs (``batch_size`` x ``seq_len``, ``padding``, ``seed``) and the
    RoPE cache. With ``output``, the weights stream one at a time into that model file (``sidecar``:
    into its safetensors sidecar) and the model is loaded back from it, memory-mapped with a sidecar.
    Raises CheckpointError naming what is wrong."""
    if era is not None and era not in ERAS:
        raise CheckpointError(f"era={era!r}: unknown; known eras: {', '.join(ERAS)}")
    src = Path(src)
    cfg, names, tensors, meta = _plan(src, era, dict(config or {}))
    seq_len = min(seq_len, cfg.max_position_embeddings)
    ids, mask = random_inputs(cfg, batch_size, seq_len, seed, padding=padding)
    cos, sin = rope_cache(cfg)

    def weights() -> Iterator[tuple[str, np.ndarray]]:
        for name, old in names.items():
            array = tensors.get(old)
            if not np.isfinite(array).all():  # refused before the writer commits: nothing is left behind
                raise CheckpointError(f"{src}: tensor '{old}' contains NaN or Inf")
            yield name, array

    if output is not None:
        write_model_file(output, cfg, weights(), ids, mask, cos, sin, meta, sidecar=sidecar)
        del tensors  # unmap the checkpoint before the model file's weights are mapped and checked
        return load_model(output)
    model = Model(cfg, dict(weights()), ids, mask, cos, sin, meta)
    try:
        model.check(str(src))
    except ModelFileError as exc:
        raise CheckpointError(str(exc)) from exc
    return model


# ---- export -------------------------------------------------------------------------------------------
_HF_ONLY = ("sizing_rule",)  # ModelConfig fields with no HF name, kept under "celerinfer_lab"


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The transformers config.json of a model (Llama, Qwen3 or Qwen3-MoE by its features);
    CheckpointError naming a feature transformers has no equivalent for."""
    c = config
    if c.rope_pairing != "half":
        raise CheckpointError(
            "rope_pairing='interleaved': transformers' Llama/Qwen3 rotate half-split pairs (rotate_half)"
        )
    scaling = c.rope_scaling if c.inference_rope_scaling else None
    if scaling is not None and scaling.get("rule", "minimind") != "transformers":
        raise CheckpointError(
            "inference_rope_scaling with rope_scaling.rule 'minimind': MiniMind's YaRN is not transformers' "
            "(MiniMind scales only past original_max_position_embeddings, clamps the ramp to head_dim//2 - 1 and "
            "defaults the attention factor to 1); export it with format 'minimind'"
        )
    if c.use_moe and c.n_shared_experts:
        raise CheckpointError(f"n_shared_experts={c.n_shared_experts}: Qwen3-MoE has no shared experts")
    if c.use_moe and c.topk_renorm == "k>1":
        raise CheckpointError(
            "topk_renorm='k>1': Qwen3-MoE renormalises always or never (norm_topk_prob); "
            f"set topk_renorm to {'always' if c.num_experts_per_tok > 1 else 'never'}, the same model for k={c.num_experts_per_tok}"
        )
    if c.use_moe and not c.qk_norm:
        raise CheckpointError("use_moe without qk_norm: transformers' MoE decoder here (Qwen3-MoE) always has q/k norm")
    arch = "Qwen3MoeForCausalLM" if c.use_moe else "Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM"
    out: dict[str, Any] = dict(
        architectures=[arch],
        model_type=ARCHITECTURES[arch],
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        rope_parameters=_hf_rope_parameters(c.rope_theta, scaling),
        tie_word_embeddings=c.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        use_sliding_window=False,
        torch_dtype="float32",
        celerinfer_lab={k: getattr(c, k) for k in _HF_ONLY},
    )
    if c.use_moe:
        out.update(
            num_experts=c.num_experts,
            num_local_experts=c.num_experts,  # transformers 5's name for it
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.topk_renorm == "always",
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    return out


def _hf_rope_parameters(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """transformers' rope_parameters: default, or YaRN with every value of a rule-"transformers" rope_scaling."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate")
    defaults = {"beta_fast": 32, "beta_slow": 1, "truncate": True}
    return {"rope_type": "yarn", "rope_theta": theta, **{k: scaling.get(k, defaults.get(k)) for k in keys}}


def minimind_config(config: ModelConfig) -> dict[str, Any]:
    """MiniMind's own HF config.json (model_type "minimind"): this project's fields are MiniMind's
    (``inference_rope_scaling``, ``rope_scaling`` with MiniMind's keys)."""
    if config.rope_pairing != "half":
        raise CheckpointError("rope_pairing='interleaved': MiniMind's HF format (model_minimind.py) uses rotate_half")
    if config.inference_rope_scaling and (config.rope_scaling or {}).get("rule", "minimind") != "minimind":
        raise CheckpointError(
            "rope_scaling.rule='transformers': MiniMind's precompute_freqs_cis computes MiniMind's YaRN, not "
            "transformers'; export it with format 'hf'"
        )
    if config.inference_rope_scaling:
        # MiniMindConfig rebuilds rope_scaling from its own constants whenever inference_rope_scaling
        # is on, whatever config.json says: other values would silently become MiniMind's.
        given = {k: v for k, v in (config.rope_scaling or {}).items() if k != "rule"}
        changed = sorted(k for k in DEFAULT_YARN if given.get(k, DEFAULT_YARN[k]) != DEFAULT_YARN[k])
        if changed:
            raise CheckpointError(
                f"rope_scaling {', '.join(f'{k}={given[k]!r}' for k in changed)}: MiniMind's MiniMindConfig "
                f"replaces rope_scaling with its own constants {DEFAULT_YARN} when it loads a folder"
            )
    return {"architectures": ["MiniMindForCausalLM"], "model_type": "minimind", **config.to_dict()}


def export_checkpoint(model: Model, out_dir: str | Path, fmt: str = "hf") -> Path:
    """Write ``model`` as a Hugging Face folder (config.json + model.safetensors, float32) at
    ``out_dir``; returns the folder. ``fmt``: "hf" (Llama/Qwen3/Qwen3-MoE, loadable by transformers'
    AutoModelForCausalLM) or "minimind" (MiniMindForCausalLM's config)."""
    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"format={fmt!r}: must be one of {EXPORT_FORMATS}")
    cfg = hf_config(model.config) if fmt == "hf" else minimind_config(model.config)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    shapes = weight_shapes(model.config)
    model.check_sidecar()
    write_safetensors(out / "model.safetensors", shapes, ((n, model.weights[n]) for n in shapes))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
