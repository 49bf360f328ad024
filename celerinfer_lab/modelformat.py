"""The model file's format, shared by the reader and the writer: its name and version, the dtypes a
tensor may have, the weights a config implies (schema.py's, re-exported), the JSON text of small
objects. Below writer.py, reader.py and modelfile.py (which re-exports every name here)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

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
