"""The binary sidecar: weights in a safetensors file beside the JSON model file, memory-mapped.

safetensors is a plain layout (8-byte little-endian header length, a JSON header of
name -> {dtype, shape, data_offsets}, then the raw bytes), read by the `safetensors` package,
by base_line_micro (cpp/tools/model_file.hpp) and here. This module writes it as a stream — the
header is known from the config's shapes before any tensor exists, so a generator never holds
more than one tensor — and maps it back without a copy.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2")}


from .errors import SidecarError  # noqa: E402,F401  (defined in errors.py, re-exported here)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory-mapped numpy array (no copy)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SidecarError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SidecarError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise SidecarError(f"{path}: the sidecar file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SidecarError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    base = 8 + n
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise SidecarError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; readable: {sorted(DTYPES)}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != math.prod(shape) * dtype.itemsize or base + end > size:
            raise SidecarError(f"{path}: tensor {name!r} needs bytes {start}..{end} of the data, "
                               f"the file holds {size - base} (truncated?)")
        out[name] = mapped[base + start: base + end].view(dtype).reshape(shape)
    return out
