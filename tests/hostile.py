"""Crafting hostile model files for the tests: tiny valid models, then one edit each.

Used by test_hostile_files.py (one test per measured bad-input class) and test_fuzz.py (the
seed corpus the mutation fuzzers start from).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from celerinfer_lab import ModelConfig, generate_model


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
    )
    return ModelConfig(**{**base, **overrides})


def write_model(
    folder: Path, name: str = "m.json", sidecar: bool = False, seed: int = 1, weights: str = "f32", **overrides
) -> Path:
    path = Path(folder) / name
    generate_model(tiny_config(**overrides), 2, 4, seed, output=path, sidecar=sidecar, weights=weights)
    return path


def load_doc(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_doc(path: Path, doc: dict) -> None:
    Path(path).write_text(json.dumps(doc))


def sidecar_of(path: Path) -> Path:
    return Path(path).parent / load_doc(path)["sidecar"]["file"]


def read_sidecar(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_sidecar(model_path: Path, header: dict, data: bytes, header_bytes: bytes | None = None) -> None:
    """Replace the model's sidecar (header padded to 8 bytes) and keep the JSON's byte count in step,
    so the check under test is the one that fires."""
    side = sidecar_of(model_path)
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    if header_bytes is None:
        raw += b" " * (-len(raw) % 8)
    side.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    doc = load_doc(model_path)
    doc["sidecar"]["bytes"] = side.stat().st_size
    save_doc(model_path, doc)
