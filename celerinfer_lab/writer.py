"""Write model files: the JSON (and its safetensors sidecar), streamed one tensor at a time.

A generator never holds more than one tensor; the same arguments give the same bytes.
"""
from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np

from .config import ModelConfig
from .errors import SidecarError
from .modelfile import DTYPES, FORMAT_NAME, FORMAT_VERSION, _dumps, _preview, weight_shapes


def _write_tensor(f: BinaryIO, name: str, array: np.ndarray, dtype: str) -> None:
    """Write encode_tensor's object straight to f, with no copy of the data besides its base64."""
    arr = np.ascontiguousarray(array, dtype=DTYPES[dtype])
    head = _dumps({"name": name, "shape": list(arr.shape), "dtype": dtype, "encoding": "base64"})
    f.write(head[:-1].encode() + b',"data":"')
    f.write(base64.b64encode(arr.reshape(-1).view(np.uint8)))
    f.write(b'","preview":' + _dumps(_preview(arr)).encode() + b"}")


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
) -> None:
    """Stream a model file to ``path``: ``weights`` may be a generator yielding one tensor at a time.

    ``sidecar``: the weights go to ``<stem>.safetensors`` beside the JSON file (memory-mapped on
    load, so large models load without parsing base64); the JSON keeps their names and shapes.
    Output is deterministic: the same inputs give the same bytes.
    """
    path = Path(path)
    if sidecar:
        side = path.with_suffix(".safetensors")
        shapes = weight_shapes(config)
        write_safetensors(side, shapes, weights, on_tensor)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(b'{"format":"%s","format_version":%d,\n' % (FORMAT_NAME.encode(), FORMAT_VERSION))
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
        if sidecar:
            f.write(b'"sidecar":{"file":%s,"format":"safetensors"},\n' % _dumps(side.name).encode())
        f.write(b'"weights":{')
        if sidecar:  # the JSON keeps each weight's name and shape; the bytes are in the sidecar
            for i, (name, shape) in enumerate(shapes.items()):
                entry = {"name": name, "shape": list(shape), "dtype": "float32", "encoding": "sidecar"}
                f.write(b'%s\n%s:%s' % (b"," if i else b"", _dumps(name).encode(), _dumps(entry).encode()))
        else:
            for i, (name, array) in enumerate(weights):
                f.write(b'%s\n%s:' % (b"," if i else b"", _dumps(name).encode()))
                _write_tensor(f, name, array, "float32")
                if on_tensor:
                    on_tensor(name)
        f.write(b"\n}}\n")
    tmp.replace(path)  # a crash mid-write never leaves a truncated file under the real name


def write_safetensors(path: str | Path, shapes: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, np.ndarray]],
                      on_tensor: Callable[[str], None] | None = None) -> None:
    """Write float32 tensors, in the order of ``shapes``, one at a time."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        expected = iter(shapes.items())
        for name, array in tensors:
            want, shape = next(expected, (None, None))
            arr = np.ascontiguousarray(array, dtype="<f4")
            if name != want or tuple(arr.shape) != tuple(shape):
                raise SidecarError(f"{path}: tensor {name} {list(arr.shape)} arrived where {want} {list(shape)} was declared")
            f.write(arr.reshape(-1).view(np.uint8))
            if on_tensor:
                on_tensor(name)
    tmp.replace(path)
