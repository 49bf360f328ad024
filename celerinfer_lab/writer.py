"""Write model files: the JSON (and its safetensors sidecar), streamed one tensor at a time, atomically.

A generator never holds more than one tensor; the same arguments give the same bytes and names.

A model (JSON and sidecar together) appears at its path complete or not at all:

* every file is written to a temporary of its own in the target folder,
  ``.{name}.{pid}.{8 hex}.tmp`` (the sidecar's ends ``.sidecar.tmp``), flushed and fsync'ed;
* the sidecar is content-addressed, ``<stem>.<first 16 hex of its sha256>.safetensors`` (the hash
  is computed while it streams), and the JSON names it with its size;
* the commit runs under an exclusive ``flock`` on the target folder: the sidecar is renamed into
  place, then the JSON, the folder is fsync'ed, then the sidecars of this target that the JSON now
  at the path does not name (the replaced model's, a killed run's) and the temporaries of this
  target whose writer is dead are removed.

So a kill at any point leaves the old JSON naming the old sidecar (still there) or the new JSON
naming the new one, never a mix; concurrent writers to one path never interleave their commits
(the last to commit wins, its JSON naming its own sidecar). A write that fails or is interrupted
removes its own temporaries; any OSError (a full disk, a read-only folder) is a ModelFileError
"cannot write PATH: reason".
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

from . import schema
from .config import ModelConfig
from .errors import ModelFileError, SidecarError, UsageError
from .modelformat import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    REDUCED_DTYPES,
    SAFETENSORS_DTYPES,
    _dumps,
    _preview,
    stored_nbytes,
    stored_shape,
    weight_shapes,
)
from .quantize import check_weight_format, decode, encode

try:
    import fcntl
except ImportError:  # not POSIX: commits are not serialised between processes
    fcntl = None  # type: ignore[assignment]  # mypy checks the POSIX branch, where the module exists

HEX = 16  # hex digits of the sha256 in a sidecar's name
LOCK_FILE = ".celerinfer-lab.lock"  # only where a folder cannot be flock'ed (some network filesystems)


@dataclass(frozen=True)
class Written:
    """What write_model_file committed: the JSON file and its sidecar (None without), with sizes."""

    path: Path
    json_bytes: int
    sidecar: Path | None = None
    sidecar_bytes: int = 0


# ---- sizes, counted per row of the weight table (a config of a million layers is never enumerated) --
def tensor_count(config: ModelConfig) -> int:
    """How many weights ``weight_shapes(config)`` holds."""
    return schema.tensor_count(config)


def largest_tensor(config: ModelConfig) -> tuple[str, tuple[int, ...], int]:
    """(a name, shape, bytes) of the largest float32 weight."""
    name, shape = schema.largest_weight(config)
    return name, shape, math.prod(shape) * 4


def _b64(nbytes: int) -> int:
    return 4 * math.ceil(nbytes / 3)


def weight_bytes(config: ModelConfig, weight_format: str = "f32") -> int:
    """Bytes of all weights as a file in ``weight_format`` stores them (reduced weights in bf16 or
    Q8_0, the rest float32), counted per row of the weight table."""
    check_weight_format(weight_format)
    total = 0
    for row in schema.WEIGHTS:
        n, shape = schema.instances(config, row), schema.shape_of(config, row)
        reduced = weight_format != "f32" and row.reduced is not None and schema.has_feature(config, row.reduced)
        total += n * stored_nbytes(REDUCED_DTYPES[weight_format][0] if reduced else "float32", shape)
    return total


def weight_dtypes(config: ModelConfig, weight_format: str) -> dict[str, str]:
    """Each weight's TENSOR dtype in a file of ``weight_format``, in file order."""
    check_weight_format(weight_format)
    reduced = {name for name, _ in schema.reduced_weights(config)} if weight_format != "f32" else set()
    return {name: REDUCED_DTYPES[weight_format][0] if name in reduced else "float32" for name in weight_shapes(config)}


def file_sizes(
    config: ModelConfig, batch_size: int, seq_len: int, sidecar: bool, weight_format: str = "f32"
) -> tuple[int, int]:
    """Upper estimates of the JSON's and the sidecar's sizes in bytes (0 for no sidecar)."""
    n, weights = tensor_count(config), weight_bytes(config, weight_format)
    rope = config.max_position_embeddings * config.head_dim * 4
    tokens = batch_size * seq_len
    json_bytes = 8192 + _b64(tokens * 4) + _b64(tokens) + 2 * (_b64(rope) + 1024)  # head, inputs, rope
    if sidecar:
        return json_bytes + 250 * n, 8 + 150 * n + weights
    return json_bytes + 700 * n + _b64(weights) + 4 * n, 0


def human_bytes(nbytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def check_disk_room(
    path: str | Path, config: ModelConfig, batch_size: int, seq_len: int, sidecar: bool, weight_format: str = "f32"
) -> None:
    """Raise ModelFileError when the model would not fit in the free space of ``path``'s folder (the
    nearest existing one). The old model stays until the new one is complete, so all of it must fit."""
    path = Path(path)
    folder = next((p for p in path.absolute().parents if p.is_dir()), None)
    if folder is None:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    json_bytes, side_bytes = file_sizes(config, batch_size, seq_len, sidecar, weight_format)
    if json_bytes + side_bytes > free:
        raise ModelFileError(
            f"cannot write {path}: the model needs about {human_bytes(json_bytes + side_bytes)}, "
            f"{folder} has {human_bytes(free)} free"
        )


def check_target(path: str | Path, sidecar: bool) -> Path:
    """Refuse (UsageError) an output that is a folder, or that ends in .safetensors with a sidecar."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output={str(path)!r} is a folder: give a file name, e.g. {path / 'model.json'}")
    if sidecar and path.suffix.lower() == ".safetensors":
        raise UsageError(
            f"output={str(path)!r} ends in .safetensors: with a sidecar that is the JSON file's name "
            f"(the weights go to {path.stem}.<hash>.safetensors beside it); give e.g. "
            f"{path.with_suffix('.json')}"
        )
    return path


# ---- which sidecars belong to a target -------------------------------------------------------------
def _sidecar_pattern(path: Path) -> re.Pattern:
    return re.compile(re.escape(path.stem) + r"\.[0-9a-f]{%d}\.safetensors" % HEX)


def _temp_pattern(path: Path) -> re.Pattern:
    return re.compile(r"\." + re.escape(path.name) + r"\.(\d+)\.[0-9a-f]{8}(?:\.sidecar)?\.tmp")


_SIDECAR_KEY = re.compile(rb'"sidecar":\{"file":("(?:[^"\\]|\\.)*")')


def sidecar_named_by(path: str | Path) -> str | None:
    """The sidecar file name a model file written by this project names, or None.

    Reads only up to the ``"weights"`` object (this writer puts ``sidecar`` at the head, older
    versions put it before the weights); base64 holds no quote, so the scan cannot misfire."""
    tail = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                text = tail + chunk
                found = _SIDECAR_KEY.search(text)
                if found:
                    try:
                        name = json.loads(found.group(1))
                    except ValueError:
                        return None
                    return name if isinstance(name, str) else None
                if b'"weights":' in text:
                    return None
                tail = text[-64:]
    except OSError:
        return None
    return None


def _named_by_siblings(path: Path, names: list[str]) -> set[str]:
    """The sidecars named by the other model files of ``path``'s stem in its folder (m.json and
    m.bak share the stem m: each keeps the sidecar it names)."""
    pattern, temps = _sidecar_pattern(path), _temp_pattern(path)
    named = {
        sidecar_named_by(path.parent / name)
        for name in names
        if name != path.name
        and Path(name).stem == path.stem
        and not pattern.fullmatch(name)
        and not temps.fullmatch(name)
        and (path.parent / name).is_file()
    }
    return {name for name in named if name is not None}


def sidecars_of(path: str | Path, keep: Iterable[str] = ()) -> list[Path]:
    """The sidecars ``<stem>.<16 hex>.safetensors`` beside ``path`` that a write to ``path`` replaces:
    all but those in ``keep`` and those another model file of the same stem in the folder names."""
    path = Path(path)
    pattern = _sidecar_pattern(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    keep = set(keep) | _named_by_siblings(path, names)
    return sorted(path.parent / name for name in names if pattern.fullmatch(name) and name not in keep)


# ---- streaming ----------------------------------------------------------------------------------
class _Hashing:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.f.write(view)
        self.size += view.nbytes


def stored_form(name: str, array: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The bytes a file stores for weight ``name`` of TENSOR ``dtype`` and logical ``shape``: a float
    array is encoded (bfloat16, q8_0; float32 as itself); an array already in the stored form (uint16
    bfloat16 bits, uint8 Q8_0 blocks, as Model.stored holds them) is written as it is."""
    fmt = {"bfloat16": "bf16", "q8_0": "q8"}.get(dtype)
    arr = np.asarray(array)
    if fmt is None:
        return np.ascontiguousarray(arr, dtype=DTYPES[dtype])
    if arr.dtype.kind == "f":
        return encode(arr, fmt, name)
    want = stored_shape(dtype, shape)
    if arr.dtype != REDUCED_DTYPES[fmt][1] or tuple(arr.shape) != want:
        raise ModelFileError(
            f"tensor '{name}': a stored {dtype} weight must be {REDUCED_DTYPES[fmt][1]} of shape {list(want)}, "
            f"got {arr.dtype} {list(arr.shape)}"
        )
    return np.ascontiguousarray(arr)


def _stored_preview(stored: np.ndarray, dtype: str, shape: tuple[int, ...]) -> list[int | float | None]:
    """The first values of a stored weight, decoded (a person reads numbers, not bytes)."""
    if dtype == "bfloat16":
        return _preview(decode(stored.reshape(-1)[:16], "bf16", (min(16, stored.size),)))
    if dtype == "q8_0":
        return _preview(decode(stored[:1], "q8", (min(1, shape[0]), shape[1])))
    return _preview(stored)


def _write_tensor(f: BinaryIO, name: str, array: np.ndarray, dtype: str, shape: tuple[int, ...] | None = None) -> None:
    """Write encode_tensor's object straight to f, with no copy of the data besides its base64. A
    weight of a reduced dtype (bfloat16, q8_0) gets its logical ``shape`` and the stored bytes."""
    shape = tuple(np.shape(array)) if shape is None else shape
    arr = stored_form(name, array, dtype, shape)
    head = _dumps({"name": name, "shape": list(shape), "dtype": dtype, "encoding": "base64"})
    f.write(head[:-1].encode() + b',"data":"')
    f.write(base64.b64encode(arr.reshape(-1).view(np.uint8).data))  # .data: the array's bytes as a memoryview
    f.write(b'","preview":' + _dumps(_stored_preview(arr, dtype, shape)).encode() + b"}")


def _stream_safetensors(
    f: BinaryIO,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, np.ndarray]],
    on_tensor: Callable[[str], None] | None,
    where: Path,
    dtypes: dict[str, str] | None = None,
) -> tuple[str, int]:
    """Write tensors, in the order of ``shapes``, one at a time; (sha256 hex, size in bytes). ``dtypes``:
    each one's TENSOR dtype (default float32): bfloat16 is BF16 of its shape, q8_0 U8 [out, ceil(in/32) * 34]."""
    dtypes = dtypes or {}
    header, offset = {}, 0
    for name, shape in shapes.items():
        dtype = dtypes.get(name, "float32")
        size = stored_nbytes(dtype, shape)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(stored_shape(dtype, shape)),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    out = _Hashing(f)
    out.write(struct.pack("<Q", len(raw)) + raw)
    expected = iter(shapes.items())
    for name, array in tensors:
        want, shape = next(expected, (None, ()))
        logical = tuple(np.shape(array)) if np.asarray(array).dtype.kind == "f" else tuple(shape)
        if name != want or logical != tuple(shape):
            raise SidecarError(
                f"{where}: tensor {name} {list(np.shape(array))} arrived where {want} "
                f"{list(shape) if shape else None} was declared"
            )
        arr = stored_form(name, array, dtypes.get(name, "float32"), tuple(shape))
        out.write(arr.reshape(-1).view(np.uint8).data)
        if on_tensor:
            on_tensor(name)
    missing = next(expected, None)
    if missing is not None:
        raise SidecarError(f"{where}: the tensors ended before {missing[0]}")
    return out.sha.hexdigest(), out.size


def _write_json(
    f: BinaryIO,
    config: ModelConfig,
    weights: Iterable[tuple[str, np.ndarray]],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    rope_cos: np.ndarray,
    rope_sin: np.ndarray,
    meta: dict | None,
    on_tensor: Callable[[str], None] | None,
    side: tuple[str, int] | None,
    dtypes: dict[str, str],
    weight_format: str,
) -> None:
    f.write(b'{"format":"%s","format_version":%d,\n' % (FORMAT_NAME.encode(), FORMAT_VERSION))
    if weight_format != "f32":  # absent: float32, as every file before the formats
        f.write(b'"weight_format":%s,\n' % _dumps(weight_format).encode())
    if side:  # at the head, so sidecar_named_by finds it without reading the file
        f.write(b'"sidecar":%s,\n' % _dumps({"file": side[0], "format": "safetensors", "bytes": side[1]}).encode())
    f.write(b'"meta":%s,\n"config":%s,\n' % (_dumps(meta or {}).encode(), _dumps(config.to_dict()).encode()))
    sections = (
        ("inputs", [("input_ids", input_ids, "int32"), ("attention_mask", attention_mask, "uint8")]),
        ("rope", [("cos", rope_cos, "float32"), ("sin", rope_sin, "float32")]),
    )
    for section, tensors in sections:
        f.write(b'"%s":{' % section.encode())
        for i, (key, array, dtype) in enumerate(tensors):
            f.write(b'%s"%s":' % (b"," if i else b"", key.encode()))
            _write_tensor(f, key if section == "inputs" else f"rope_{key}", array, dtype)
        f.write(b"},\n")
    f.write(b'"weights":{')
    if side:  # the JSON keeps each weight's name and shape; the bytes are in the sidecar
        for i, (name, shape) in enumerate(weight_shapes(config).items()):
            entry = {"name": name, "shape": list(shape), "dtype": dtypes.get(name, "float32"), "encoding": "sidecar"}
            f.write(b"%s\n%s:%s" % (b"," if i else b"", _dumps(name).encode(), _dumps(entry).encode()))
    else:
        shapes = weight_shapes(config) if weight_format != "f32" else {}
        for i, (name, array) in enumerate(weights):
            f.write(b"%s\n%s:" % (b"," if i else b"", _dumps(name).encode()))
            _write_tensor(f, name, array, dtypes.get(name, "float32"), shapes.get(name))
            if on_tensor:
                on_tensor(name)
    f.write(b"\n}}\n")


# ---- temporaries, the lock, the commit ------------------------------------------------------------
@contextlib.contextmanager
def _temporary(path: Path, temps: list[Path], kind: str = "") -> Iterator[BinaryIO]:
    """A new file ``.{name}.{pid}.{random}{kind}.tmp`` beside ``path``, flushed and fsync'ed on exit."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{kind}.tmp")
        temps.append(tmp)  # before it exists: an interrupt right after the open still removes it
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            temps.pop()
    with os.fdopen(fd, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[int]:
    """An exclusive flock on the folder itself (no lock file to leave behind or to race over);
    where the filesystem refuses to flock a folder, on a lock file in it. Yields the folder's fd."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    lock_fd = None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.lockf(lock_fd, fcntl.LOCK_EX)
        yield fd
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        os.close(fd)  # releases the flock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    try:  # a killed process its parent has not reaped yet is dead for us
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _clean(path: Path, keep: set[str]) -> None:
    """Under the lock: remove this target's unnamed sidecars and its dead writers' temporaries."""
    doomed = sidecars_of(path, keep)
    temps = _temp_pattern(path)
    with contextlib.suppress(OSError):
        for name in os.listdir(path.parent):
            found = temps.fullmatch(name)
            if found and int(found.group(1)) != os.getpid() and not _alive(int(found.group(1))):
                doomed.append(path.parent / name)
    for leftover in doomed:
        with contextlib.suppress(OSError):
            leftover.unlink()


def _commit(path: Path, json_tmp: Path, side: tuple[Path, str] | None) -> None:
    """Rename the sidecar's temporary (``side``: it and its final name) and the JSON's into place, then clean up."""
    side_name = side[1] if side else None
    with _folder_lock(path.parent) as folder_fd:
        legacy = path.with_suffix(".safetensors").name  # the name this writer used before sidecars were hashed
        replaced_legacy = path.is_file() and sidecar_named_by(path) == legacy
        if side is not None:
            side_tmp, final = side[0], path.with_name(side[1])
            if final.is_file() and final.stat().st_size == side_tmp.stat().st_size:
                side_tmp.unlink()  # content-addressed: these bytes are already there (keep a reader's map valid)
            else:
                os.replace(side_tmp, final)
        os.replace(json_tmp, path)
        try:
            os.fsync(folder_fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        _clean(path, {side_name} if side_name else set())
        if replaced_legacy and legacy != side_name:
            with contextlib.suppress(OSError):
                if legacy not in _named_by_siblings(path, os.listdir(path.parent)):
                    path.with_name(legacy).unlink()


def _cannot_write(path: Path, exc: OSError, temps: list[Path]) -> ModelFileError:
    what = exc.strerror or str(exc)
    named = exc.filename is not None and str(exc.filename) not in {str(path)} | {str(t) for t in temps}
    return ModelFileError(f"cannot write {path}: {what}" + (f" ({exc.filename})" if named else ""))


# ---- the entry points -------------------------------------------------------------------------------
def write_model_file(
    path: str | Path,
    config: ModelConfig,
    weights: Iterable[tuple[str, np.ndarray]],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    rope_cos: np.ndarray,
    rope_sin: np.ndarray,
    meta: dict | None = None,
    on_tensor: Callable[[str], None] | None = None,
    sidecar: bool = False,
    weight_format: str = "f32",
) -> Written:
    """Stream a model file to ``path``, atomically: ``weights`` may be a generator yielding one
    tensor at a time. Returns what it wrote (paths and sizes).

    ``sidecar``: the weights go to ``<stem>.<16 hex of their sha256>.safetensors`` beside the JSON
    file (memory-mapped on load, so large models load without parsing base64); the JSON keeps
    their names and shapes and names the sidecar with its size. Output is deterministic: the same
    inputs give the same bytes and names. The folder must exist. A path that is a folder, or ends
    in .safetensors with a sidecar, is a UsageError; a model that does not fit in the folder's free
    space, or any OSError while writing, a ModelFileError (nothing is left behind).

    ``weight_format`` "bf16" or "q8": the reduced weights (schema.reduced_weights) are stored in that
    format (quantize.py), the rest in float32; ``weights`` may yield them as float32 (encoded here) or
    already in the stored form (uint16 bfloat16 bits, uint8 Q8_0 blocks: written as they are)."""
    path = check_target(path, sidecar)
    check_weight_format(weight_format)
    check_disk_room(path, config, int(np.shape(input_ids)[0]), int(np.shape(input_ids)[-1]), sidecar, weight_format)
    dtypes = weight_dtypes(config, weight_format) if weight_format != "f32" else {}
    temps: list[Path] = []
    try:
        staged: tuple[Path, str] | None = None  # the sidecar's temporary and final name
        side: tuple[str, int] | None = None  # the sidecar's name and size, as the JSON records them
        if sidecar:
            with _temporary(path, temps, ".sidecar") as f:
                digest, size = _stream_safetensors(f, weight_shapes(config), weights, on_tensor, path, dtypes)
            side_name = f"{path.stem}.{digest[:HEX]}.safetensors"
            staged, side = (temps[-1], side_name), (side_name, size)
        with _temporary(path, temps) as f:
            _write_json(
                f,
                config,
                weights,
                input_ids,
                attention_mask,
                rope_cos,
                rope_sin,
                meta,
                on_tensor,
                side,
                dtypes,
                weight_format,
            )
            json_bytes = f.tell()
        _commit(path, temps[-1], staged)
    except OSError as exc:
        raise _cannot_write(path, exc, temps) from exc
    finally:  # committed temporaries are gone already; a failed or interrupted write's are removed
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    if side is None:
        return Written(path, json_bytes)
    return Written(path, json_bytes, path.with_name(side[0]), side[1])


def write_safetensors(
    path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, np.ndarray]],
    on_tensor: Callable[[str], None] | None = None,
) -> str:
    """Write float32 tensors, in the order of ``shapes``, one at a time, atomically (a temporary
    renamed into place); returns the file's sha256 (hex)."""
    path = Path(path)
    temps: list[Path] = []
    try:
        with _temporary(path, temps, ".sidecar") as f:
            digest, _size = _stream_safetensors(f, shapes, tensors, on_tensor, path)
        os.replace(temps[-1], path)
    except OSError as exc:
        raise _cannot_write(path, exc, temps) from exc
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return digest
