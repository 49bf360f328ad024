"""Read and write the JSON model file (this project's format and the original CelerInfer layout).

A tensor is ``{name, shape, dtype, encoding: "base64", data, preview}``: ``data`` is the
base64 of the raw little-endian C-order bytes, ``preview`` the first values for a human. The
format is documented in docs/model-file.md and docs/model-file.schema.json.

Writing (streamed, atomic) is in writer.py; ``write_model_file`` is re-exported here.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, ModelConfig

FORMAT_NAME = "celerinfer-lab"
FORMAT_VERSION = 1
PREVIEW_LEN = 16
DTYPES = {  # file dtype name -> little-endian numpy dtype
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
}


from .errors import ModelFileError  # noqa: E402,F401  (defined in errors.py, re-exported here)


# ---- the weights a config implies -------------------------------------------------------------
def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """MiniMind state-dict names and shapes, in the order the file stores them (tied lm_head omitted)."""
    H, V = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}

    def ffn(prefix: str, inter: int) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (inter, H)
        shapes[f"{prefix}.up_proj.weight"] = (inter, H)
        shapes[f"{prefix}.down_proj.weight"] = (H, inter)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (H,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (config.q_dim, H)
        shapes[f"{p}.self_attn.k_proj.weight"] = (config.kv_dim, H)
        shapes[f"{p}.self_attn.v_proj.weight"] = (config.kv_dim, H)
        shapes[f"{p}.self_attn.o_proj.weight"] = (H, config.q_dim)
        if config.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (config.head_dim,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (H,)
        if config.use_moe:
            shapes[f"{p}.mlp.gate.weight"] = (config.num_experts, H)
            for e in range(config.num_experts):
                ffn(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
            for s in range(config.n_shared_experts):
                ffn(f"{p}.mlp.shared_experts.{s}", config.moe_intermediate_size)
        else:
            ffn(f"{p}.mlp", config.intermediate_size)
    shapes["model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


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

    def save(self, path: str | Path) -> None:
        save_model(self, path)

    def check(self, where: str = "model") -> None:
        """Check every tensor against the config; raise ModelFileError naming what is wrong."""
        _check_model(self, where)


# ---- tensors -------------------------------------------------------------------------------------
def _preview(arr: np.ndarray) -> list:
    flat = arr.reshape(-1)[:PREVIEW_LEN]
    return [float(v) for v in flat] if arr.dtype.kind == "f" else [int(v) for v in flat]


def encode_tensor(name: str, array: np.ndarray, dtype: str) -> dict[str, Any]:
    """The JSON object of one tensor (what the file holds for it)."""
    arr = np.ascontiguousarray(array, dtype=DTYPES[dtype])
    return {"name": name, "shape": list(arr.shape), "dtype": dtype, "encoding": "base64",
            "data": base64.b64encode(arr.tobytes()).decode("ascii"), "preview": _preview(arr)}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def decode_tensor(obj: Any, where: str) -> np.ndarray:
    """Decode one tensor object; ``where`` names it in errors (file and tensor name)."""
    if not isinstance(obj, dict):
        raise ModelFileError(f"{where}: a tensor must be a JSON object, got {type(obj).__name__}")
    for key in ("shape", "dtype", "data"):
        if key not in obj:
            raise ModelFileError(f"{where}: tensor has no '{key}' field")
    shape, dtype_name = obj["shape"], obj["dtype"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ModelFileError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if dtype_name not in DTYPES:
        raise ModelFileError(f"{where}: unknown dtype {dtype_name!r}; known: {', '.join(DTYPES)}")
    encoding = obj.get("encoding", "base64")
    if encoding != "base64":
        raise ModelFileError(f"{where}: unknown encoding {encoding!r}; only 'base64' is supported")
    if not isinstance(obj["data"], str):
        raise ModelFileError(f"{where}: data must be a base64 string")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelFileError(f"{where}: data is not valid base64 ({exc})") from None
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ModelFileError(
            f"{where}: data holds {len(raw)} bytes but shape {shape} of {dtype_name} needs {expected} "
            f"({math.prod(shape)} elements x {dtype.itemsize} bytes)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


# ---- writing -----------------------------------------------------------------------------------
def save_model(model: Model, path: str | Path) -> None:
    """Write ``model`` in this project's format (version FORMAT_VERSION)."""
    from .writer import write_model_file
    write_model_file(
        path, model.config, model.weights.items(), model.input_ids, model.attention_mask,
        model.rope_cos, model.rope_sin, model.meta,
    )


# ---- reading -----------------------------------------------------------------------------------
def load_model(path: str | Path) -> Model:
    """Load a model file in this project's format or the original CelerInfer layout, fully checked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
            f"the file may be truncated or not a model file"
        ) from None
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not a JSON text file ({exc.reason})") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: top level must be a JSON object, got {type(doc).__name__}")
    if "format_version" in doc:
        model = _parse_v1(doc, str(path))
    elif isinstance(doc.get("weights"), dict) and "layers" in doc["weights"]:
        model = _parse_celerinfer_v0(doc, str(path))
    else:
        raise ModelFileError(
            f"{path}: not a model file: no 'format_version' (this project's format) and no "
            f"'weights.layers' (original CelerInfer layout)"
        )
    model.check(str(path))
    return model


def _section(doc: dict, key: str, where: str) -> dict:
    if key not in doc:
        raise ModelFileError(f"{where}: missing field '{key}'")
    if not isinstance(doc[key], dict):
        raise ModelFileError(f"{where}: field '{key}' must be a JSON object")
    return doc[key]


def _config(raw: Any, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as exc:
        raise ModelFileError(f"{where}: config: {exc}") from None
    except TypeError as exc:
        raise ModelFileError(f"{where}: config: {exc}") from None


def _tensor(section: dict, key: str, where: str) -> np.ndarray:
    if key not in section:
        raise ModelFileError(f"{where}: missing tensor '{key}'")
    return decode_tensor(section[key], f"{where}: tensor '{key}'")


def _open_sidecar(doc: dict, where: str) -> dict[str, np.ndarray] | None:
    if "sidecar" not in doc:
        return None
    from .sidecar import SidecarError, read_safetensors
    info = doc["sidecar"]
    if not (isinstance(info, dict) and isinstance(info.get("file"), str) and info.get("format") == "safetensors"):
        raise ModelFileError(f"{where}: sidecar must be {{\"file\": NAME, \"format\": \"safetensors\"}}")
    try:
        return read_safetensors(Path(where).parent / info["file"])
    except SidecarError as exc:
        raise ModelFileError(f"{where}: sidecar: {exc}") from None


def _weight(obj: Any, side: dict | None, where: str, name: str) -> np.ndarray:
    if not (isinstance(obj, dict) and obj.get("encoding") == "sidecar"):
        return decode_tensor(obj, where)
    if side is None:
        raise ModelFileError(f"{where}: encoding 'sidecar' but the file names no sidecar")
    if name not in side:
        raise ModelFileError(f"{where}: not in the sidecar")
    array = side[name]
    if list(array.shape) != obj.get("shape") or obj.get("dtype") != "float32" or array.dtype != np.float32:
        raise ModelFileError(f"{where}: the JSON says {obj.get('dtype')} {obj.get('shape')}, the sidecar holds "
                             f"{array.dtype} {list(array.shape)}")
    return array


def _parse_v1(doc: dict, where: str) -> Model:
    if doc.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{where}: format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    if doc["format_version"] != FORMAT_VERSION:
        raise ModelFileError(
            f"{where}: format_version {doc['format_version']!r} is not supported (this version reads {FORMAT_VERSION})")
    config = _config(_section(doc, "config", where), where)
    inputs, rope = _section(doc, "inputs", where), _section(doc, "rope", where)
    raw_weights = _section(doc, "weights", where)
    side = _open_sidecar(doc, where)
    weights = {name: _weight(obj, side, f"{where}: tensor '{name}'", name) for name, obj in raw_weights.items()}
    return Model(
        config=config,
        weights=weights,
        input_ids=_tensor(inputs, "input_ids", where).astype(np.int64),
        attention_mask=_tensor(inputs, "attention_mask", where).astype(np.int64),
        rope_cos=_tensor(rope, "cos", where).astype(np.float32),
        rope_sin=_tensor(rope, "sin", where).astype(np.float32),
        meta=doc.get("meta") or {},
    )


# Original CelerInfer names -> MiniMind state-dict names.
_V0_TOP = {"tok_embedding": "model.embed_tokens.weight", "final_rms": "model.norm.weight", "lm_head": "lm_head.weight"}
_V0_LAYER = {
    "rms_attn": "input_layernorm.weight", "rms_ffn": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def _parse_celerinfer_v0(doc: dict, where: str) -> Model:
    """The original tool's layout: weights.{tok_embedding, final_rms, lm_head, layers[{wq, ...}]}."""
    raw_config = dict(_section(doc, "config", where))
    meta = doc.get("meta") or {}
    if "head_dim" in meta and "head_dim" not in raw_config:
        raw_config["head_dim"] = meta["head_dim"]
    w = _section(doc, "weights", where)
    weights = {new: _tensor(w, old, where) for old, new in _V0_TOP.items() if old in w or old != "lm_head"}
    layers = w["layers"]
    if not isinstance(layers, list):
        raise ModelFileError(f"{where}: weights.layers must be a list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ModelFileError(f"{where}: weights.layers[{i}] must be a JSON object")
        for old, new in _V0_LAYER.items():
            weights[f"model.layers.{i}.{new}"] = _tensor(layer, old, f"{where}: weights.layers[{i}]")
    if "tie_word_embeddings" not in raw_config:
        # The original generator wrote lm_head as a copy of the embedding for a tied model.
        head = weights.get("lm_head.weight")
        raw_config["tie_word_embeddings"] = head is None or np.array_equal(head, weights["model.embed_tokens.weight"])
    config = _config(raw_config, where)
    if config.tie_word_embeddings and "lm_head.weight" in weights:
        if not np.array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]):
            raise ModelFileError(f"{where}: tie_word_embeddings is true but lm_head differs from tok_embedding")
        del weights["lm_head.weight"]
    inputs, rope = _section(doc, "inputs", where), _section(doc, "rope", where)
    return Model(
        config=config,
        weights=weights,
        input_ids=_tensor(inputs, "input_ids", where).astype(np.int64),
        attention_mask=_tensor(inputs, "attention_mask", where).astype(np.int64),
        rope_cos=_tensor(rope, "cos", where).astype(np.float32),
        rope_sin=_tensor(rope, "sin", where).astype(np.float32),
        meta=meta,
        source_format="celerinfer-v0",
    )


# ---- checks ----------------------------------------------------------------------------------------
def _check_model(model: Model, where: str) -> None:
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
        if not np.isfinite(array).all():
            raise ModelFileError(f"{where}: tensor '{name}' contains NaN or Inf")
    _check_inputs(model, where)
    rope_shape = (config.max_position_embeddings, config.head_dim)
    for name, array in (("rope cos", model.rope_cos), ("rope sin", model.rope_sin)):
        if tuple(array.shape) != rope_shape:
            raise ModelFileError(
                f"{where}: {name} has shape {list(array.shape)}, expected [max_position_embeddings, head_dim] = {list(rope_shape)}")


def _check_inputs(model: Model, where: str) -> None:
    ids, mask, config = model.input_ids, model.attention_mask, model.config
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ModelFileError(f"{where}: input_ids has shape {list(ids.shape)}, expected [batch >= 1, seq_len >= 1]")
    if mask.shape != ids.shape:
        raise ModelFileError(f"{where}: attention_mask has shape {list(mask.shape)}, input_ids has {list(ids.shape)}")
    bad = np.argwhere((ids < 0) | (ids >= config.vocab_size))
    if len(bad):
        b, s = bad[0]
        raise ModelFileError(
            f"{where}: input_ids[{b},{s}] = {ids[b, s]} is outside the vocabulary [0, {config.vocab_size}) "
            f"({len(bad)} such ids)")
    bad = np.argwhere((mask != 0) & (mask != 1))
    if len(bad):
        b, s = bad[0]
        raise ModelFileError(f"{where}: attention_mask[{b},{s}] = {mask[b, s]}; the mask must hold only 0 and 1")
    if ids.shape[1] > config.max_position_embeddings:
        raise ModelFileError(
            f"{where}: seq_len {ids.shape[1]} is longer than max_position_embeddings {config.max_position_embeddings}")



def __getattr__(name: str):  # writer.py imports this module: re-export its entry point lazily
    if name == "write_model_file":
        from .writer import write_model_file
        return write_model_file
    raise AttributeError(name)
