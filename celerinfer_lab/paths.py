"""The C++ source tree on disk: where this project's cpp/ is, how to find its headers in a folder,
how to copy it and edit a file of the copy. Plain files only (no cppyy, no compiler): the engine
(native.py), the fault catalogue (faults.py) and the standalone build (standalone.py) all use it.
Also where the project keeps what it measures across runs (``data_dir``: the benchmark history)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UsageError

DEFAULT_CPP_DIR = Path(__file__).resolve().parents[1] / "cpp"
HEADER = "celerinfer/celerinfer.hpp"
REPO_ROOT = DEFAULT_CPP_DIR.parent


def data_dir() -> Path:
    """Where results kept across runs live: $CELERINFER_LAB_DATA, else $XDG_DATA_HOME/celerinfer-lab
    (~/.local/share/celerinfer-lab): per user and machine, so a fresh clone or a second worktree sees
    the same history. Not created here."""
    if os.environ.get("CELERINFER_LAB_DATA"):
        return Path(os.environ["CELERINFER_LAB_DATA"])
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "celerinfer-lab"


def include_dir(cpp_dir: Path) -> Path:
    """Accept the cpp/ folder or its include/ folder."""
    for candidate in (cpp_dir / "include", cpp_dir):
        if (candidate / HEADER).is_file():
            return candidate
    raise FileNotFoundError(f"{cpp_dir}: no {HEADER} under it or under its include/ folder")


def copy_cpp(dest: str | Path, source: str | Path | None = None) -> Path:
    """Copy the C++ (headers, tools, CMakeLists.txt) to ``dest`` to edit it freely; returns dest.
    An existing copy is overwritten with the project's current files."""
    source = Path(source) if source is not None else DEFAULT_CPP_DIR
    dest = Path(dest)
    if dest.resolve() == source.resolve():
        raise UsageError(f"{dest}: copying the C++ onto itself")
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("include", "tools", "CMakeLists.txt"):
        src = source / item
        if src.is_dir():
            shutil.copytree(src, dest / item, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / item)
    return dest


def edit_source(path: str | Path, old: str, new: str) -> None:
    """Replace the one occurrence of ``old`` in a source file by ``new`` (for notebooks and tests)."""
    path = Path(path)
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise UsageError(f"{path}: expected exactly one occurrence of {old!r}, found {count}")
    path.write_text(text.replace(old, new))
