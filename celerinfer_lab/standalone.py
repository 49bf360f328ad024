"""Build and run the standalone C++ program base_line_micro (CMake, g++ -O3, nlohmann/json)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StandaloneError  # noqa: E402,F401  (defined in errors.py, re-exported here)
from .paths import DEFAULT_CPP_DIR, data_dir


@dataclass
class StandaloneResult:
    logits: np.ndarray
    load_ms: float
    forward_ms: float  # median
    stdout: str


def build_standalone(cpp_dir: str | Path | None = None, build_dir: str | Path | None = None) -> Path:
    """Configure and build base_line_micro (incremental); return the binary's path."""
    cpp_dir = Path(cpp_dir) if cpp_dir else DEFAULT_CPP_DIR
    build_dir = Path(build_dir) if build_dir else cpp_dir / "build"
    for cmd in (
        ["cmake", "-S", str(cpp_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StandaloneError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return build_dir / "base_line_micro"


def source_digest(cpp_dir: str | Path | None = None) -> str:
    """16 hex over what a build of ``cpp_dir`` depends on: every file below it (build folders left
    out), the compiler CMake picks ($CXX), and this machine's CPU (the build is -march=native)."""
    from .fingerprint import machine_fingerprint

    cpp_dir = Path(cpp_dir) if cpp_dir else DEFAULT_CPP_DIR
    h = hashlib.sha256()
    for path in sorted(p for p in cpp_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(cpp_dir)
        if rel.parts[0].startswith("build"):
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(os.environ.get("CXX", "").encode() + b"\0" + machine_fingerprint()["id"].encode())
    return h.hexdigest()[:16]


def cached_standalone(cpp_dir: str | Path | None = None, build_dir: str | Path | None = None) -> Path:
    """base_line_micro in ``build_dir``, built once per source digest: a binary built before from the same
    sources (kept in the data folder's bin/) is copied there instead of building again (~25 s, one
    translation unit). The bench's default work folder is a new temporary one each run, so without
    this every bench built it anew."""
    cpp_dir = Path(cpp_dir) if cpp_dir else DEFAULT_CPP_DIR
    build_dir = Path(build_dir) if build_dir else cpp_dir / "build"
    kept = data_dir() / "bin" / f"base_line_micro-{source_digest(cpp_dir)}"
    binary = build_dir / "base_line_micro"
    if kept.is_file():
        build_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kept, binary)
        return binary
    build_standalone(cpp_dir, build_dir)
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = kept.with_name(f"{kept.name}.{os.getpid()}.partial")  # another process may be keeping its own
    shutil.copy2(binary, partial)
    os.replace(partial, kept)
    return binary


def run_standalone(
    binary: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    warmup: int = 1,
    repeat: int = 10,
    env: dict | None = None,
) -> StandaloneResult:
    """Run ``base_line_micro model_path out_dir`` and read its logits and times. ``env``: more
    variables (KERNELS=fast|readable|bf16|..., THREADS=n, KV_CACHE=f32|bf16)."""
    env = {**os.environ, "WARMUP": str(warmup), "REPEAT": str(repeat), **(env or {})}
    result = subprocess.run([str(binary), str(model_path), str(out_dir)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise StandaloneError(f"base_line_micro exited {result.returncode}: {result.stderr.strip()}")
    load = re.search(r"^load: ([\d.]+) ms", result.stdout, re.M)
    forward = re.search(r"^forward: median ([\d.]+) ms", result.stdout, re.M)
    if not (load and forward):
        raise StandaloneError(f"base_line_micro printed no timings:\n{result.stdout}")
    return StandaloneResult(
        np.load(Path(out_dir) / "logits_cpp.npy"), float(load.group(1)), float(forward.group(1)), result.stdout
    )
