"""mypy over the package, with the configuration in pyproject.toml ([tool.mypy]), and the package's lazy
names typed: the ``if TYPE_CHECKING:`` imports in __init__.py are the names __getattr__ serves."""

import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

import celerinfer_lab


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory):
    """One mypy cache for both runs: the second reuses what the first learnt of torch, numpy and
    pandas (~50 of a cold run's ~55 s) and checks the package's own modules again, as their paths differ."""
    return tmp_path_factory.mktemp("mypy-cache")


def run_mypy(cwd, cache, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: it is in the test extras (pip install -e '.[test]')")
    command = [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_mypy_finds_nothing(mypy_cache):
    """The command CI runs: `python -m mypy` in the checkout (the packages and rules from pyproject.toml)."""
    result = run_mypy(REPO, mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


# Each planted error and the file it goes in; each is caught by a different part of the configuration.
PLANTED = {
    # the basics: an Optional used as if it could not be None
    "writer.py": "def _planted_optional(size: int | None) -> int:\n    return size * 2\n",
    # disallow_untyped_defs, in an existing module
    "cli.py": "def _planted_untyped(args):\n    return args\n",
    # check_untyped_defs: the body of an unannotated function is checked; and a new module must be annotated too
    "_planted.py": "def planted_body():\n    return len(1)\n",
}


def test_mypy_catches_planted_errors(tmp_path, mypy_cache):
    """The check can fail: the same configuration on a copy of the package with three errors planted."""
    shutil.copytree(REPO / "celerinfer_lab", tmp_path / "celerinfer_lab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    for name, code in PLANTED.items():
        with open(tmp_path / "celerinfer_lab" / name, "a") as f:
            f.write("\n\n" + code)
    result = run_mypy(tmp_path, mypy_cache)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert 'Unsupported operand types for * ("None" and "int")' in out, out
    assert "celerinfer_lab/cli.py" in out and "Function is missing a type annotation" in out, out
    assert "celerinfer_lab/_planted.py" in out and 'Argument 1 to "len" has incompatible type "int"' in out, out
    assert "celerinfer_lab/_planted.py:3: error: Function is missing a return type annotation" in out, out


# ---- the lazy names: what mypy sees is what __getattr__ returns ----------------------------------
def type_checking_imports(source: str) -> dict[str, str]:
    """public name -> module, from the ``from .module import name`` lines under ``if TYPE_CHECKING:``."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.level == 1:
                    found.update({alias.name: stmt.module for alias in stmt.names})
    return found


def exports_out_of_step(source: str, exports: dict[str, str]) -> list[str]:
    typed = type_checking_imports(source)
    return [
        f"{name}: __getattr__ takes it from {exports.get(name)}, the TYPE_CHECKING imports from {typed.get(name)}"
        for name in sorted(set(typed) | set(exports))
        if typed.get(name) != exports.get(name)
    ]


def test_type_checking_imports_are_the_lazy_names():
    source = (REPO / "celerinfer_lab" / "__init__.py").read_text()
    assert not exports_out_of_step(source, celerinfer_lab._EXPORTS)
    assert set(celerinfer_lab._EXPORTS) == set(celerinfer_lab.__all__)


def test_the_step_check_catches_a_missing_and_a_misplaced_name():
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from .config import ModelConfig
            from .reader import weight_shapes
    """)
    exports = {"ModelConfig": "config", "weight_shapes": "modelfile", "load_model": "reader"}
    assert exports_out_of_step(source, exports) == [
        "load_model: __getattr__ takes it from reader, the TYPE_CHECKING imports from None",
        "weight_shapes: __getattr__ takes it from modelfile, the TYPE_CHECKING imports from reader",
    ]
