"""The C++ headers generated from Python tables, and the command that writes them.

Each entry of ``GENERATED`` is a header under cpp/include/celerinfer/ and the function that returns
its text. ``python -m celerinfer_lab.cpp_tables`` rewrites them all; tests/test_trace_schema.py
fails while a committed header differs from its generator's output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .paths import DEFAULT_CPP_DIR
from .trace import trace_points_header

GENERATED: dict[str, Callable[[], str]] = {"trace_points.hpp": trace_points_header}


def header_path(name: str, cpp_dir: Path = DEFAULT_CPP_DIR) -> Path:
    return cpp_dir / "include" / "celerinfer" / name


def stale_headers(cpp_dir: Path = DEFAULT_CPP_DIR) -> list[str]:
    """The generated headers whose file under ``cpp_dir`` differs from their generator's output."""
    stale = []
    for name, generate in GENERATED.items():
        path = header_path(name, cpp_dir)
        if not path.is_file() or path.read_text() != generate():
            stale.append(name)
    return stale


def main(cpp_dir: Path = DEFAULT_CPP_DIR) -> None:
    for name, generate in GENERATED.items():
        path = header_path(name, cpp_dir)
        tmp = path.with_name(path.name + ".tmp")  # atomic: a build never reads half a header
        tmp.write_text(generate())
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
