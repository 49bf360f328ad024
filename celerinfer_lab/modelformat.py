"""The model file's format, shared by the reader and the writer: its name and version, the dtypes a
tensor may have, the weights a config implies (schema.py's, re-exported), the JSON text of small
objects. Below writer.py, reader.py and modelfile.py (which re-exports every name here)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .quantize import q8_row_bytes
from .schema import iter_weight_shapes, weight_shapes  # noqa: F401  (defined in schema.py, re-exported here)

FORMAT_NAME = "celerinfer-lab"
FORMAT_VERSION = 1
PREVIEW_LEN = 16
DTYPES: dict[str, np.dtype] = {  # file dtype name -> little-endian numpy dtype
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
}


# ---- tensors -------------------------------------------------------------------------------------
def _preview(arr: np.ndarray) -> list[int | float | None]:
    """The first values, for people. NaN/Inf are written as null: a model file is strict JSON."""
    flat = arr.reshape(-1)[:PREVIEW_LEN]
    if arr.dtype.kind != "f":
        return [int(v) for v in flat]
    return [float(v) if np.isfinite(v) else None for v in flat]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# ---- reduced-precision weights (quantize.py's formats) ---------------------------------------------
# A bf16/q8 model file says "weight_format" at its top; its reduced weights (schema.reduced_weights)
# then have this TENSOR dtype, every other weight a float dtype. The stored bytes are quantize.py's:
# bfloat16 bits (uint16, the weight's shape) and Q8_0 blocks (uint8 [out, ceil(in/32) * 34]).
REDUCED_DTYPES: dict[str, tuple[str, np.dtype]] = {  # weight_format -> (TENSOR dtype, numpy dtype of the bytes)
    "bf16": ("bfloat16", np.dtype("<u2")),
    "q8": ("q8_0", np.dtype("u1")),
}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "q8_0": "U8"}  # a sidecar tensor's dtype there


def stored_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a tensor's stored bytes: q8_0 [out, in] is uint8 [out, ceil(in/32) * 34]; else ``shape``."""
    if dtype == "q8_0":
        return (shape[0], q8_row_bytes(shape[1]))
    return tuple(shape)


def stored_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of ``dtype`` (a DTYPES name, bfloat16 or q8_0) and logical ``shape``."""
    if dtype == "q8_0":
        return shape[0] * q8_row_bytes(shape[1])
    itemsize = 2 if dtype == "bfloat16" else DTYPES[dtype].itemsize
    return math.prod(shape) * itemsize


def stored_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a tensor's stored bytes."""
    if dtype == "bfloat16":
        return np.dtype("<u2")
    return np.dtype("u1") if dtype == "q8_0" else DTYPES[dtype]
