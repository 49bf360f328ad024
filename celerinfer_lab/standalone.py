"""Build and run the standalone C++ program base_line_micro (CMake, g++ -O3, nlohmann/json)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StandaloneError  # noqa: E402,F401  (defined in errors.py, re-exported here)
from .paths import DEFAULT_CPP_DIR


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


def run_standalone(
    binary: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    warmup: int = 1,
    repeat: int = 10,
    env: dict | None = None,
) -> StandaloneResult:
    """Run ``base_line_micro model_path out_dir`` and read its logits and times. ``env``: more
    variables (KERNELS=readable|fast, THREADS=n)."""
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
