"""The C++ source tree on disk: where this project's cpp/ is, how to find its headers in a folder,
how to copy it and edit a file of the copy. Plain files only (no cppyy, no compiler): the engine
(native.py), the fault catalogue (faults.py) and the standalone build (standalone.py) all use it.
Also the project's data folder (``data_dir``), where what is measured across runs is kept (the
machine's limits, the benchmark history)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UsageError

DEFAULT_CPP_DIR = Path(__file__).resolve().parents[1] / "cpp"
HEADER = "celerinfer/celerinfer.hpp"
REPO_ROOT = DEFAULT_CPP_DIR.parent
DATA_ENV = "CELERINFER_LAB_DATA"


def data_dir() -> Path:
    """The project's data folder (not created here): ``$CELERINFER_LAB_DATA``, else
    ``$XDG_DATA_HOME/celerinfer-lab``, else ``~/.local/share/celerinfer-lab``: per user and machine, so
    a fresh clone or a second worktree sees the same history. The machine's measured limits
    (machine.py) and the benchmark history (history.py) are kept there."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "celerinfer-lab"


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
