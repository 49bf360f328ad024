"""The binary sidecar: weights in a safetensors file beside the JSON model file, memory-mapped.

safetensors is a plain layout (8-byte little-endian header length N, a JSON header of
name -> {dtype, shape, data_offsets}, then the raw bytes), read by the `safetensors` package,
by base_line_micro (cpp/tools/model_file.hpp) and here. Reading checks the whole header before
anything is mapped (docs/model-file.md, "What a reader checks", step 5): offsets are integers
that tile the data section exactly, so no tensor reaches outside the file or overlaps another.
The map is watched: a sidecar truncated or rewritten on disk under a loaded model is reported
(``SidecarWatch.check``) before a forward touches it, instead of killing the process (SIGBUS).
Writing is in writer.py.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import SidecarError
from .strict_json import parse_strict_json

__all__ = [
    "SidecarError",
    "SidecarHeader",
    "SidecarWatch",
    "read_header",
    "open_sidecar",
    "map_tensors",
    "sidecar_path",
]


@dataclass(frozen=True)
class SidecarHeader:
    path: Path
    size: int  # bytes of the whole file
    data_start: int  # 8 + N
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (shape, start, end), offsets into the data
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> its safetensors dtype (ITEMSIZE's keys)


# The dtypes a sidecar holds and their bytes per element: F32 weights, BF16 bfloat16 bits, U8 Q8_0 blocks.
ITEMSIZE = {"F32": 4, "BF16": 2, "U8": 1}
_VIEW = {"F32": "<f4", "BF16": "<u2", "U8": "u1"}


def sidecar_path(folder: Path, name: object, where: str) -> Path:
    """The sidecar a model file names: a plain file name in the model file's folder, nothing else."""
    if not (isinstance(name, str) and name and name not in (".", "..") and "/" not in name and "\0" not in name):
        raise SidecarError(f"{where}: sidecar.file {name!r} must be a plain file name in the model file's folder")
    return folder / name


def read_header(f: BinaryIO, path: Path, where: str, expected_size: int | None = None) -> SidecarHeader:
    """Read and check the header of the open sidecar ``f`` (only its first 8 + N bytes are read)."""
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise SidecarError(f"{where}: sidecar {path.name} is not a regular file")
    size = info.st_size
    if expected_size is not None and size != expected_size:
        raise SidecarError(
            f"{where}: sidecar {path.name} is {size} bytes, the model file says {expected_size} "
            f"(truncated, or not this model's sidecar)"
        )
    head = os.pread(f.fileno(), 8, 0)
    if len(head) < 8:
        raise SidecarError(f"{where}: sidecar {path.name} is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise SidecarError(
            f"{where}: sidecar {path.name}: header length {n} runs past the end of the file ({size} bytes)"
        )
    if n % 8:
        raise SidecarError(
            f"{where}: sidecar {path.name}: header length {n} is not a multiple of 8 (the tensors would not be aligned)"
        )
    raw = os.pread(f.fileno(), n, 8)
    header = parse_strict_json(raw, f"{where}: sidecar {path.name} header")
    dtypes: dict[str, str] = {}
    entries = _check_entries(header, size - 8 - n, f"{where}: sidecar {path.name}", dtypes)
    return SidecarHeader(path, size, 8 + n, entries, dtypes)


def open_sidecar(
    path: Path, where: str, expected_size: int | None = None
) -> tuple[SidecarHeader, dict[str, np.ndarray], SidecarWatch]:
    """Open, check and map the sidecar at ``path``: (header, name -> read-only float32 array, watch).

    One open file serves the check, the map and the watch, so the file checked is the file mapped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SidecarError(f"{where}: the sidecar file {path.name} is missing") from None
    except IsADirectoryError:
        raise SidecarError(f"{where}: sidecar {path.name} is not a regular file") from None
    with f:
        header = read_header(f, path, where, expected_size)
        arrays = map_tensors(f, header)
        watch = SidecarWatch(f, path, where)
    return header, arrays, watch


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entries(
    header: object, data_size: int, where: str, dtypes: dict[str, str] | None = None
) -> dict[str, tuple[tuple[int, ...], int, int]]:
    if not isinstance(header, dict):
        raise SidecarError(f"{where}: the header must be a JSON object")
    entries: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise SidecarError(f"{where}: __metadata__ must be a JSON object")
            continue
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):  # more keys: ignored,
            raise SidecarError(
                f"{where}: tensor {name!r} must be {{dtype, shape, data_offsets}}"
            )  # as safetensors does
        if not (isinstance(info["dtype"], str) and info["dtype"] in ITEMSIZE):
            raise SidecarError(
                f"{where}: tensor {name!r} has dtype {info['dtype']!r}; model weights are F32, BF16 or U8 (Q8_0)"
            )
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise SidecarError(f"{where}: tensor {name!r}: shape must be a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise SidecarError(
                f"{where}: tensor {name!r}: data_offsets {offsets!r} must be two integers "
                f"0 <= start <= end <= {data_size} (the data section's size)"
            )
        start, end = offsets
        itemsize = ITEMSIZE[info["dtype"]]
        if end - start != itemsize * math.prod(shape):
            raise SidecarError(
                f"{where}: tensor {name!r} spans {end - start} bytes, its shape {shape} of {info['dtype']} "
                f"needs {itemsize * math.prod(shape)}"
            )
        entries[name] = (tuple(shape), start, end)
        if dtypes is not None:
            dtypes[name] = info["dtype"]
    position = 0  # the tensors, in file order, must tile the data section: no gap, no overlap
    for name, (_, start, end) in sorted(entries.items(), key=lambda item: (item[1][1], item[1][2])):
        if start != position:
            what = "overlaps the tensor before it" if start < position else f"leaves a gap of {start - position} bytes"
            raise SidecarError(f"{where}: tensor {name!r} at bytes {start}..{end} {what}")
        position = end
    if position != data_size:
        raise SidecarError(
            f"{where}: the tensors end at byte {position} of the data, the file holds {data_size} "
            f"(trailing bytes, or a truncated header)"
        )
    return entries


class SidecarWatch:
    """Keeps the mapped file open and tells whether it changed on disk since it was mapped.

    A file replaced by rename or deleted is harmless (the map keeps the old inode); a file
    truncated or rewritten in place is not: reading past the new end raises SIGBUS, and a
    rewrite changes weights under the model. ``check`` compares the open file's size and
    modification time with those at load.
    """

    def __init__(self, f: BinaryIO, path: Path, where: str) -> None:
        self.path, self.where = path, where
        self._fd = os.dup(f.fileno())
        weakref.finalize(self, os.close, self._fd)
        info = os.fstat(self._fd)
        self._stamp = (info.st_size, info.st_mtime_ns)

    def check(self) -> None:
        info = os.fstat(self._fd)
        if (info.st_size, info.st_mtime_ns) != self._stamp:
            change = "truncated" if info.st_size < self._stamp[0] else "rewritten"
            raise SidecarError(
                f"{self.where}: the sidecar {self.path.name} was {change} on disk after the model was "
                f"loaded; reading it now could crash the process: reload the model"
            )


def map_tensors(f: BinaryIO, header: SidecarHeader) -> dict[str, np.ndarray]:
    """Every tensor of a checked sidecar (open as ``f``) as a read-only memory-mapped array: float32,
    uint16 (BF16: bfloat16 bits) or uint8 (U8: Q8_0 blocks)."""
    mapped = np.memmap(f, dtype=np.uint8, mode="r", shape=(header.size,))
    base = header.data_start
    return {
        name: mapped[base + start : base + end].view(_VIEW[header.dtypes.get(name, "F32")]).reshape(shape)
        for name, (shape, start, end) in header.tensors.items()
    }
