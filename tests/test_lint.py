"""ruff over the package, the tests and the scripts, with the rules in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is in the test extras (pip install -e '.[test]')")
    result = subprocess.run(
        [ruff, "check", "celerinfer_lab", "tests", "scripts"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_finds_nothing_to_change():
    """The code is laid out the one way ``ruff format`` lays it out (pyproject.toml [tool.ruff])."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: it is in the test extras (pip install -e '.[test]')")
    result = subprocess.run(
        [ruff, "format", "--check", "celerinfer_lab", "tests", "scripts"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, "run `ruff format` on:\n" + result.stdout + result.stderr


def test_ruff_would_catch_an_undefined_name(tmp_path):
    """The check can fail: the same rules on a file with an undefined name."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return undefined_name\n")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--config", str(REPO / "pyproject.toml"), str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "F821" in result.stdout, result.stdout + result.stderr
