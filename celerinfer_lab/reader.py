"""Read a model file, checking all of its layout before a single weight is decoded.

The checks and their order are docs/model-file.md, "What a reader checks, in order"; the C++
reader (cpp/tools/model_file.hpp) makes the same ones, and tests/test_fuzz.py runs both over a
fuzz corpus to prove they accept the same files. A file first becomes a ``_Table`` (config plus
the JSON object of every tensor, under MiniMind's names, in either layout); the table is checked
against the config and the file's size; only then is anything decoded.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, ModelConfig
from .errors import ModelFileError
from .modelfile import Model, check_input_values
from .modelformat import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    REDUCED_DTYPES,
    SAFETENSORS_DTYPES,
    iter_weight_shapes,
    stored_dtype,
    stored_nbytes,
    stored_shape,
    weight_shapes,
)
from .quantize import WEIGHT_FORMATS, decode
from .schema import reduced_weights, v0_layer_names, v0_top_names
from .sidecar import SidecarHeader, open_sidecar, sidecar_path
from .strict_json import parse_strict_json

_FLOAT_DTYPES = [name for name, dtype in DTYPES.items() if dtype.kind == "f"]
_INT_DTYPES = [name for name, dtype in DTYPES.items() if dtype.kind in "iu"]
_FORMAT_OF = {dtype: fmt for fmt, (dtype, _) in REDUCED_DTYPES.items()}  # "bfloat16" -> "bf16", "q8_0" -> "q8"


@dataclass
class _Table:
    """A parsed file before decoding: the config and each tensor's JSON object."""

    config: ModelConfig
    weights: dict[str, Any]  # state-dict name -> TENSOR object
    inputs: dict[str, Any]
    rope: dict[str, Any]
    meta: dict
    source_format: str
    sidecar: dict | None = None  # the JSON's "sidecar" object (format 1)
    sidecar_header: SidecarHeader | None = None
    sidecar_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    weight_format: str = "f32"  # the top-level "weight_format" (absent: f32)
    reduced: set[str] = field(default_factory=set)  # the weights stored in it (filled by _check_weight_table)


def load_model(path: str | Path, allow_nonfinite: bool = False) -> Model:
    """Load a model file (this project's format or the original CelerInfer layout), fully checked.

    ``allow_nonfinite``: accept NaN/Inf in weights and the RoPE cache (for studying NaN
    behaviour); refused by default. Raises ModelFileError (SidecarError for the sidecar) naming
    the file and the field or tensor."""
    path = Path(path)
    where = str(path)
    raw = _read_bytes(path)
    doc = parse_strict_json(raw, where)
    if not isinstance(doc, dict):
        raise ModelFileError(f"{where}: top level must be a JSON object, got {_json_type(doc)}")
    if "format_version" in doc:
        table = _table_v1(doc, where)
    elif isinstance(doc.get("weights"), dict) and "layers" in doc["weights"]:
        table = _table_v0(doc, where)
    else:
        raise ModelFileError(
            f"{where}: not a model file: no 'format_version' (this project's format) and no "
            f"'weights.layers' (original CelerInfer layout)"
        )
    watch = None
    if table.sidecar is not None:
        expected_size = table.sidecar.get("bytes")
        side = sidecar_path(path.parent, table.sidecar["file"], where)
        table.sidecar_header, table.sidecar_arrays, watch = open_sidecar(side, where, expected_size)
    _check_weight_table(table, where)
    _check_input_table(table, where)
    weights, stored = {}, {}
    for name, obj in table.weights.items():
        weights[name], bytes_ = _weight_values(table, name, obj, where, allow_nonfinite)
        if bytes_ is not None:
            stored[name] = bytes_
    model = Model(
        config=table.config,
        weights=weights,
        input_ids=_decode(table.inputs["input_ids"], f"{where}: tensor 'input_ids'").astype(np.int64),
        attention_mask=_decode(table.inputs["attention_mask"], f"{where}: tensor 'attention_mask'").astype(np.int64),
        rope_cos=_float_values(table.rope["cos"], f"{where}: rope cos", allow_nonfinite),
        rope_sin=_float_values(table.rope["sin"], f"{where}: rope sin", allow_nonfinite),
        meta=table.meta,
        source_format=table.source_format,
        sidecar_watch=watch,
        weight_format=table.weight_format,
        stored=stored,
    )
    check_input_values(model, where)
    return model


# ---- step 1-3: the file, its layout and its config ------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a folder, not a model file") from None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _section(doc: dict, key: str, where: str, required: bool = True) -> dict:
    if key not in doc:
        if required:
            raise ModelFileError(f"{where}: missing field '{key}'")
        return {}
    if not isinstance(doc[key], dict):
        raise ModelFileError(f"{where}: field '{key}' must be a JSON object, got {_json_type(doc[key])}")
    return doc[key]


def _config(raw: dict, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(raw)
    except (ConfigError, TypeError) as exc:  # TypeError: a field the dataclass does not take
        raise ModelFileError(f"{where}: config: {exc}") from None


def _table_v1(doc: dict, where: str) -> _Table:
    if doc.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{where}: format is {_short(doc.get('format'))}, expected {FORMAT_NAME!r}")
    version = doc["format_version"]
    if not (type(version) is int and version == FORMAT_VERSION):
        raise ModelFileError(
            f"{where}: format_version {_short(version)} is not supported (this version reads {FORMAT_VERSION})"
        )
    meta = _section(doc, "meta", where, required=False)
    config = _config(_section(doc, "config", where), where)
    inputs, rope = _section(doc, "inputs", where), _section(doc, "rope", where)
    weights = _section(doc, "weights", where)
    weight_format = doc.get("weight_format", "f32")
    if not (isinstance(weight_format, str) and weight_format in WEIGHT_FORMATS):
        raise ModelFileError(
            f"{where}: weight_format {_short(weight_format)} is not one of {', '.join(map(repr, WEIGHT_FORMATS))}"
        )
    sidecar = None
    if "sidecar" in doc:
        sidecar = doc["sidecar"]
        if not (
            isinstance(sidecar, dict)
            and set(sidecar) <= {"file", "format", "bytes"}
            and "file" in sidecar
            and sidecar.get("format") == "safetensors"
        ):
            raise ModelFileError(f'{where}: sidecar must be {{"file": NAME, "format": "safetensors", "bytes": SIZE}}')
        size = sidecar.get("bytes", 0)
        if not (type(size) is int and size >= 0):
            raise ModelFileError(f"{where}: sidecar.bytes {_short(size)} must be an integer >= 0")
    return _Table(config, dict(weights), inputs, rope, meta, FORMAT_NAME, sidecar, weight_format=weight_format)


# Original CelerInfer names -> MiniMind state-dict names (from the weight table).
_V0_TOP = v0_top_names()
_V0_LAYER = v0_layer_names()
_V0_REQUIRED = v0_top_names(required=True)  # lm_head: only when untied


def _same_tensor(a: Any, b: Any) -> bool:
    """Tensor objects of the same dtype, shape and bytes (the original generator stored a tied
    lm_head as a copy). base64 strings that differ only in unused trailing bits hold the same bytes."""
    if not (isinstance(a, dict) and isinstance(b, dict) and all(k in a and k in b for k in ("dtype", "shape", "data"))):
        return False
    if not (
        isinstance(a["dtype"], str)
        and a["dtype"] == b["dtype"]
        and _is_shape(a["shape"])
        and a["shape"] == b["shape"]
        and isinstance(a["data"], str)
        and isinstance(b["data"], str)
    ):
        return False
    if a["data"] == b["data"]:
        return True
    if len(a["data"]) != len(b["data"]):
        return False
    try:
        return base64.b64decode(a["data"], validate=True) == base64.b64decode(b["data"], validate=True)
    except (binascii.Error, ValueError):
        return False


def _table_v0(doc: dict, where: str) -> _Table:
    """The original tool's layout: weights.{tok_embedding, final_rms, lm_head, layers[{wq, ...}]}."""
    meta = _section(doc, "meta", where, required=False)
    if "sidecar" in doc:  # the original tool wrote none; ignoring one would load other weights than meant
        raise ModelFileError(f"{where}: sidecar: only this project's format (format_version 1) has a sidecar")
    if "weight_format" in doc:  # its weights are float; ignoring the field would misread reduced ones
        raise ModelFileError(f"{where}: weight_format: only this project's format (format_version 1) has one")
    raw_config = dict(_section(doc, "config", where))
    if "head_dim" not in raw_config and "head_dim" in meta:
        raw_config["head_dim"] = meta["head_dim"]
    w = _section(doc, "weights", where)
    for key in w:
        if key not in _V0_TOP and key != "layers":
            raise ModelFileError(
                f"{where}: unexpected tensor 'weights.{key}' (the original layout has {', '.join(_V0_TOP)} and layers)"
            )
    for key in _V0_REQUIRED:
        if key not in w:
            raise ModelFileError(f"{where}: missing tensor 'weights.{key}'")
    if "tie_word_embeddings" not in raw_config:
        raw_config["tie_word_embeddings"] = "lm_head" not in w or _same_tensor(w["lm_head"], w["tok_embedding"])
    config = _config(raw_config, where)
    weights = {new: w[old] for old, new in _V0_TOP.items() if old in w}
    if config.tie_word_embeddings and "lm_head" in w:
        if not _same_tensor(w["lm_head"], w["tok_embedding"]):
            raise ModelFileError(f"{where}: tie_word_embeddings is true but lm_head differs from tok_embedding")
        del weights["lm_head.weight"]
    layers = w["layers"]
    if not isinstance(layers, list):
        raise ModelFileError(f"{where}: weights.layers must be a list, got {_json_type(layers)}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ModelFileError(f"{where}: weights.layers[{i}] must be a JSON object, got {_json_type(layer)}")
        for old in layer:
            if old not in _V0_LAYER:
                raise ModelFileError(f"{where}: unexpected tensor 'weights.layers[{i}].{old}'")
        for old, new in _V0_LAYER.items():
            if old not in layer:
                raise ModelFileError(f"{where}: missing tensor 'weights.layers[{i}].{old}'")
            weights[f"model.layers.{i}.{new}"] = layer[old]
    return _Table(config, weights, _section(doc, "inputs", where), _section(doc, "rope", where), meta, "celerinfer-v0")


# ---- step 4-5: the tensor table, against the config, the file and the sidecar ---------------------
def _check_weight_table(table: _Table, where: str) -> None:
    # One implied name at a time: a config the file does not hold (a million experts in a 5 KB
    # file) fails at its first missing tensor instead of building every name first.
    for name, shape in iter_weight_shapes(table.config):
        if name not in table.weights:
            raise ModelFileError(f"{where}: missing tensor '{name}' (the config needs it, shape {list(shape)})")
    expected = weight_shapes(table.config)  # now no larger than the file's own table
    if table.weight_format != "f32":
        table.reduced = {name for name, _ in reduced_weights(table.config)}
    for name, obj in table.weights.items():
        if name not in expected:
            raise ModelFileError(f"{where}: unexpected tensor '{name}' (not a weight of this config)")
        tw = f"{where}: tensor '{name}'"
        if isinstance(obj, dict) and obj.get("encoding") == "sidecar":
            _check_sidecar_entry(table, name, obj, expected[name], tw)
        else:
            _check_tensor_header(obj, tw, "weight", expected[name], _reduced_dtype(table, name))
    if table.sidecar_header is not None:
        for name in table.sidecar_header.tensors:
            obj = table.weights.get(name)
            if not (isinstance(obj, dict) and obj.get("encoding") == "sidecar"):
                raise ModelFileError(
                    f"{where}: the sidecar holds tensor {name!r}, which the model file does not "
                    f"mark as a sidecar tensor"
                )


def _reduced_dtype(table: _Table, name: str) -> str | None:
    """The TENSOR dtype the file's weight_format gives weight ``name``; None: a float dtype (not reduced)."""
    return REDUCED_DTYPES[table.weight_format][0] if name in table.reduced else None


def _check_weight_dtype(dtype: Any, reduced_dtype: str | None, where: str) -> None:
    """A reduced weight has exactly its format's dtype; bfloat16 and q8_0 are for reduced weights only."""
    if reduced_dtype is not None and dtype != reduced_dtype:
        raise ModelFileError(
            f"{where}: dtype {_short(dtype)}, but the file's weight_format is {_FORMAT_OF[reduced_dtype]!r}: "
            f"its reduced weights (projections, experts, head) must be {reduced_dtype}"
        )
    if reduced_dtype is None and isinstance(dtype, str) and dtype in _FORMAT_OF:
        raise ModelFileError(
            f"{where}: dtype {dtype!r} is only for the weights a {_FORMAT_OF[dtype]} model reduces, in a file whose "
            f"weight_format is {_FORMAT_OF[dtype]!r}; this weight stays a float type (norms and the router always do)"
        )


def _check_sidecar_entry(table: _Table, name: str, obj: dict, shape: tuple[int, ...], where: str) -> None:
    if table.sidecar_header is None:
        raise ModelFileError(f"{where}: encoding 'sidecar' but the file names no sidecar")
    want = _reduced_dtype(table, name)
    _check_weight_dtype(obj.get("dtype"), want, where)
    dtype = want or "float32"
    if obj.get("dtype") != dtype or obj.get("shape") != list(shape) or not _is_shape(obj.get("shape")):
        raise ModelFileError(
            f"{where}: a sidecar tensor must say dtype {dtype} and shape {list(shape)}, the file "
            f"says {_short(obj.get('dtype'))} {_short(obj.get('shape'))}"
        )
    entry = table.sidecar_header.tensors.get(name)
    if entry is None:
        raise ModelFileError(f"{where}: not in the sidecar")
    held = table.sidecar_header.dtypes.get(name, "F32")
    if held != SAFETENSORS_DTYPES[dtype]:
        raise ModelFileError(f"{where}: the sidecar holds {held}, a {dtype} weight is {SAFETENSORS_DTYPES[dtype]}")
    if entry[0] != stored_shape(dtype, shape):
        raise ModelFileError(
            f"{where}: the sidecar holds shape {list(entry[0])}, a {dtype} weight of shape {list(shape)} "
            f"is {list(stored_shape(dtype, shape))} there"
        )


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)


def _check_tensor_header(
    obj: Any, where: str, kind: str, shape: tuple[int, ...] | None, reduced_dtype: str | None = None
) -> tuple[int, ...]:
    """Check a TENSOR object without decoding it; return its shape. ``reduced_dtype``: a weight the
    file's weight_format reduces, which must have that dtype (bfloat16, q8_0)."""
    if not isinstance(obj, dict):
        raise ModelFileError(f"{where}: a tensor must be a JSON object, got {_json_type(obj)}")
    for key in ("shape", "dtype", "data"):
        if key not in obj:
            raise ModelFileError(f"{where}: tensor has no '{key}' field")
    if not _is_shape(obj["shape"]):
        raise ModelFileError(f"{where}: shape {_short(obj['shape'])} is not a list of non-negative integers")
    allowed = _FLOAT_DTYPES if kind == "float" else _INT_DTYPES
    if kind == "weight":
        _check_weight_dtype(obj["dtype"], reduced_dtype, where)
        allowed = [reduced_dtype] if reduced_dtype else _FLOAT_DTYPES
    if obj["dtype"] not in allowed:
        raise ModelFileError(
            f"{where}: dtype {_short(obj['dtype'])} is not allowed here; "
            f"{'inputs' if kind == 'int' else 'weights and the RoPE cache'} take {', '.join(allowed)}"
        )
    encoding = obj.get("encoding", "base64")
    if encoding != "base64":
        raise ModelFileError(f"{where}: unknown encoding {_short(encoding)}; only 'base64' is supported here")
    if shape is not None and tuple(obj["shape"]) != shape:
        raise ModelFileError(f"{where} has shape {obj['shape']}, the config implies {list(shape)}")
    nbytes = stored_nbytes(obj["dtype"], obj["shape"])
    data = obj["data"]
    if not isinstance(data, str):
        raise ModelFileError(f"{where}: data must be a base64 string, got {_json_type(data)}")
    if len(data) != 4 * -(-nbytes // 3):
        raise ModelFileError(
            f"{where}: data holds {len(data)} base64 characters but shape {obj['shape']} of "
            f"{obj['dtype']} needs {4 * -(-nbytes // 3)} ({nbytes} bytes)"
        )
    return tuple(obj["shape"])


def _check_input_table(table: _Table, where: str) -> None:
    config = table.config
    for key in ("input_ids", "attention_mask"):
        if key not in table.inputs:
            raise ModelFileError(f"{where}: missing tensor '{key}'")
    ids = _check_tensor_header(table.inputs["input_ids"], f"{where}: tensor 'input_ids'", "int", None)
    if len(ids) != 2 or ids[0] < 1 or ids[1] < 1:
        raise ModelFileError(f"{where}: input_ids has shape {list(ids)}, expected [batch >= 1, seq_len >= 1]")
    if ids[1] > config.max_position_embeddings:
        raise ModelFileError(
            f"{where}: seq_len {ids[1]} is longer than max_position_embeddings {config.max_position_embeddings}"
        )
    mask = _check_tensor_header(table.inputs["attention_mask"], f"{where}: tensor 'attention_mask'", "int", None)
    if mask != ids:
        raise ModelFileError(f"{where}: attention_mask has shape {list(mask)}, input_ids has {list(ids)}")
    rope_shape = (config.max_position_embeddings, config.head_dim)
    for key in ("cos", "sin"):
        if key not in table.rope:
            raise ModelFileError(f"{where}: missing tensor 'rope.{key}'")
        got = _check_tensor_header(table.rope[key], f"{where}: rope {key}", "float", None)
        if got != rope_shape:
            raise ModelFileError(
                f"{where}: rope {key} has shape {list(got)}, expected "
                f"[max_position_embeddings, head_dim] = {list(rope_shape)}"
            )


# ---- step 6: decoding and values ------------------------------------------------------------------
def _decode(obj: dict, where: str) -> np.ndarray:
    """A checked TENSOR object's values (read-only, no copy besides the base64 decode)."""
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelFileError(f"{where}: data is not valid base64 ({exc})") from None
    nbytes = stored_nbytes(obj["dtype"], obj["shape"])
    if len(raw) != nbytes:
        raise ModelFileError(
            f"{where}: data decodes to {len(raw)} bytes, shape {obj['shape']} of {obj['dtype']} needs {nbytes}"
        )
    return np.frombuffer(raw, dtype=stored_dtype(obj["dtype"])).reshape(stored_shape(obj["dtype"], obj["shape"]))


def _check_finite(array: np.ndarray, where: str, allow_nonfinite: bool) -> np.ndarray:
    """Refuse a value that is not finite in float32, what the forwards compute in: NaN, Inf, or a
    float64 past float32's range."""
    if allow_nonfinite:
        return array
    with np.errstate(over="ignore"):
        finite = np.isfinite(array.astype(np.float32, copy=False))
    if not finite.all():
        bad = np.argwhere(~finite)
        raise ModelFileError(
            f"{where} contains NaN or Inf in float32 ({len(bad)} values, the first at {[int(i) for i in bad[0]]}); "
            f"load with allow_nonfinite=True (--allow-nonfinite) to study them"
        )
    return array


def _weight_values(
    table: _Table, name: str, obj: Any, where: str, allow_nonfinite: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the weight's values, float; its stored bytes when the format reduces it, else None)."""
    if isinstance(obj, dict) and obj.get("encoding") == "sidecar":
        array = table.sidecar_arrays[name]
    else:
        array = _decode(obj, f"{where}: tensor '{name}'")
    if name not in table.reduced:
        return _check_finite(array, f"{where}: tensor '{name}'", allow_nonfinite), None
    values = decode(array, table.weight_format, tuple(obj["shape"]))
    return _check_finite(values, f"{where}: tensor '{name}'", allow_nonfinite), array


def _float_values(obj: dict, where: str, allow_nonfinite: bool) -> np.ndarray:
    return _check_finite(_decode(obj, where), where, allow_nonfinite).astype(np.float32)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
