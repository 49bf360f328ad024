"""The binary sidecar: weights in a safetensors file beside the JSON model file, memory-mapped.

safetensors is a plain layout (8-byte little-endian header length N, a JSON header of
name -> {dtype, shape, data_offsets}, then the raw bytes), read by the `safetensors` package,
by base_line_micro (cpp/tools/model_file.hpp) and here: ``parse_safetensors_header`` is this
package's one parser of that header (checkpoint.py reads other writers' files with it). Reading a
sidecar checks the whole header before anything is mapped (docs/model-file.md, "What a reader
checks", step 5): offsets are integers that tile the data section exactly, so no tensor reaches
outside the file or overlaps another.
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
from typing import BinaryIO, Callable, Mapping

import numpy as np

from .errors import ModelFileError, SidecarError
from .strict_json import parse_strict_json

__all__ = [
    "SidecarError",
    "SidecarHeader",
    "SidecarWatch",
    "read_header",
    "parse_safetensors_header",
    "SAFETENSORS_DTYPES",
    "TensorEntry",
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


# Every dtype safetensors defines, with its bytes per element (safetensors' Dtype enum).
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets into the data section (after the 8 + N header bytes)
    end: int


def parse_safetensors_header(
    read: Callable[[int, int], bytes],
    size: int,
    where: str,
    error: type[ModelFileError],
    dtypes: Mapping[str, int],
    dtype_rule: str,
    *,
    exact_tiling: bool,
    aligned: bool,
) -> tuple[int, dict[str, TensorEntry]]:
    """The one safetensors header parser: (data_start, name -> entry) of a file of ``size`` bytes whose
    bytes ``read(offset, length)`` returns; only the first 8 + N bytes are read.

    Checked for every caller: the 8-byte length N inside the file, the header strict JSON (a JSON
    object, ``__metadata__`` an object and skipped), each entry {dtype, shape, data_offsets} with the
    shape non-negative integers and the offsets integers 0 <= start <= end <= the data's size, spanning
    exactly shape x the dtype's size. The contracts differ in: ``dtypes`` (the dtypes allowed, with
    their sizes; ``dtype_rule`` says why others are refused), ``exact_tiling`` (the tensors, in file
    order, cover the data section with no gap, no overlap, no trailing byte: the sidecar, which
    this project writes) and ``aligned`` (N a multiple of 8, so float32 tensors are aligned in a
    memory map). Raises ``error`` naming ``where``."""
    head = read(0, 8)
    if len(head) < 8:
        raise error(f"{where}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise error(f"{where}: header length {n} runs past the end of the file ({size} bytes)")
    if aligned and n % 8:
        raise error(f"{where}: header length {n} is not a multiple of 8 (the tensors would not be aligned)")
    try:
        header = parse_strict_json(read(8, n), f"{where} header")
    except ModelFileError as exc:
        raise error(str(exc)) from None
    data_size = size - 8 - n
    entries = _check_entries(header, data_size, where, error, dtypes, dtype_rule)
    if exact_tiling:
        _check_tiling(entries, data_size, where, error)
    return 8 + n, entries


def read_header(f: BinaryIO, path: Path, where: str, expected_size: int | None = None) -> SidecarHeader:
    """Read and check the header of the open sidecar ``f`` (only its first 8 + N bytes are read):
    F32, BF16 (bfloat16 bits) or U8 (Q8_0 blocks) tensors tiling the data section exactly, the file of the size the model file says."""
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise SidecarError(f"{where}: sidecar {path.name} is not a regular file")
    size = info.st_size
    if expected_size is not None and size != expected_size:
        raise SidecarError(
            f"{where}: sidecar {path.name} is {size} bytes, the model file says {expected_size} "
            f"(truncated, or not this model's sidecar)"
        )
    data_start, entries = parse_safetensors_header(
        lambda offset, length: os.pread(f.fileno(), length, offset),
        size,
        f"{where}: sidecar {path.name}",
        SidecarError,
        ITEMSIZE,
        "model weights are F32, BF16 or U8 (Q8_0)",
        exact_tiling=True,
        aligned=True,
    )
    tensors = {name: (e.shape, e.start, e.end) for name, e in entries.items()}
    dtypes = {name: e.dtype for name, e in entries.items()}
    return SidecarHeader(path, size, data_start, tensors, dtypes)


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
    header: object,
    data_size: int,
    where: str,
    error: type[ModelFileError],
    dtypes: Mapping[str, int],
    dtype_rule: str,
) -> dict[str, TensorEntry]:
    if not isinstance(header, dict):
        raise error(f"{where}: the header must be a JSON object")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise error(f"{where}: __metadata__ must be a JSON object")
            continue
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):  # more keys: ignored,
            raise error(f"{where}: tensor {name!r} must be {{dtype, shape, data_offsets}}")  # as safetensors does
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (isinstance(dtype, str) and dtype in dtypes):
            raise error(f"{where}: tensor {name!r} has dtype {dtype!r}; {dtype_rule}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise error(f"{where}: tensor {name!r} has shape {shape!r}: not a list of sizes (non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            offsets = None  # the message below
        elif 0 <= offsets[0] <= offsets[1] and offsets[1] > data_size:
            raise error(
                f"{where}: tensor {name!r}: data_offsets {offsets!r} run past the data section ({data_size} bytes): "
                f"the tensor does not fit in the file (truncated?)"
            )
        if offsets is None or not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise error(
                f"{where}: tensor {name!r}: data_offsets {info['data_offsets']!r} must be two integers "
                f"0 <= start <= end <= {data_size} (the data section's size)"
            )
        start, end = offsets
        needed = dtypes[dtype] * math.prod(shape)
        if end - start != needed:
            raise error(
                f"{where}: tensor {name!r} spans {end - start} bytes, its shape {shape} of {dtype} needs {needed}"
            )
        entries[name] = TensorEntry(dtype, tuple(shape), start, end)
    return entries


def _check_tiling(entries: dict[str, TensorEntry], data_size: int, where: str, error: type[ModelFileError]) -> None:
    position = 0  # the tensors, in file order, must tile the data section: no gap, no overlap
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start != position:
            what = (
                "overlaps the tensor before it" if e.start < position else f"leaves a gap of {e.start - position} bytes"
            )
            raise error(f"{where}: tensor {name!r} at bytes {e.start}..{e.end} {what}")
        position = e.end
    if position != data_size:
        raise error(
            f"{where}: the tensors end at byte {position} of the data, the file holds {data_size} "
            f"(trailing bytes, or a truncated header)"
        )


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
