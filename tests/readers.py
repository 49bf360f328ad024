"""Both model-file readers as verdicts, for differential tests: Python's load_model and the C++
reader through ``base_line_micro --check`` (tests/test_fuzz.py, tests/test_cpp_fuzz.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from celerinfer_lab import ModelFileError, load_model


def python_verdict(path: Path) -> tuple[str, str]:
    """("ok", "") or ("refused", message); any exception other than ModelFileError propagates."""
    try:
        load_model(path)
    except ModelFileError as exc:
        return "refused", str(exc)
    return "ok", ""


def cpp_verdicts(binary: Path, files: list[Path]) -> dict[str, tuple[str, str]]:
    """One `base_line_micro --check` over many files: path -> (verdict, message). A crash or a
    sanitizer report fails the caller's test."""
    out = {}
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "halt_on_error=1"}
    for start in range(0, len(files), 200):
        chunk = [str(f) for f in files[start : start + 200]]
        run = subprocess.run([str(binary), "--check", *chunk], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode in (0, 2), f"base_line_micro --check crashed ({run.returncode}):\n{run.stderr[-4000:]}"
        assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-4000:]
        for line in run.stdout.split("\n")[:-1]:  # not splitlines(): a message may hold a form feed
            verdict, name, *message = line.split("\t", 2)
            out[name] = (verdict, message[0] if message else "")
    missing = [str(f) for f in files if str(f) not in out]
    assert not missing, f"base_line_micro --check printed no verdict for {missing[:3]}"
    return out


def differential(binary: Path, files: list[Path], python: dict[str, tuple[str, str]] | None = None) -> int:
    """Assert both readers give every file the same verdict; return how many both refused."""
    python = python if python is not None else {str(f): python_verdict(f) for f in files}
    cpp = cpp_verdicts(binary, files)
    disagree = [(f, python[f], cpp[f]) for f in python if python[f][0] != cpp[f][0]]
    lines = [f"{f}\n  python: {p[0]} {p[1][:200]}\n  c++:    {c[0]} {c[1][:200]}" for f, p, c in disagree[:10]]
    assert not disagree, f"the readers disagree on {len(disagree)} of {len(files)} files:\n" + "\n".join(lines)
    return sum(v == "refused" for v, _ in python.values())
