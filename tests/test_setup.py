"""The setup files agree with each other: environment.yml installs what pyproject declares, and
.ci/run runs the README's test command."""

import tomllib

import pytest
import yaml
from conftest import REPO
from packaging.specifiers import SpecifierSet


def python_satisfies(version: str, requires: str) -> bool:
    """Whether a Python version ("3.11", "3.9.2") meets a requires-python (">=3.11"), compared as
    versions, not as strings ("3.9" >= "3.11" is True as strings). packaging comes with pytest."""
    return SpecifierSet(requires).contains(version)


@pytest.mark.parametrize(
    "version,requires,ok",
    [
        ("3.11", ">=3.11", True),
        ("3.12", ">=3.11", True),
        ("3.11.7", ">=3.11", True),
        ("3.10", ">=3.11", False),
        ("3.9", ">=3.11", False),  # as strings "3.9" >= "3.11" is True: the check this replaces said yes
        ("3.100", ">=3.11", True),  # as strings "3.100" >= "3.11" is False
        ("4.0", ">= 3.11", True),
        ("3.12", ">=3.11,<3.12", False),
    ],
)
def test_python_versions_compare_as_numbers(version, requires, ok):
    assert python_satisfies(version, requires) is ok


def test_environment_yml_installs_the_package_with_pyproject_extras():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    requires = pyproject["project"]["requires-python"]
    assert python_satisfies(python.split("=")[-1], requires), f"environment.yml's {python} is not {requires}"
    pip_deps = next(d["pip"] for d in deps if isinstance(d, dict))
    # llama (llama-cpp-python, minutes of compiling) is opt-in everywhere: setup.sh builds it only
    # with CELERINFER_LAB_LLAMA=1, conda users add it by hand (README "llama.cpp in the same run").
    extras = set(pyproject["project"]["optional-dependencies"]) - {"llama"}
    editable = [d for d in pip_deps if d.startswith("-e .")]
    assert editable, "environment.yml must install this package"
    named = editable[0].split("[")[1].rstrip("]").split(",") if "[" in editable[0] else []
    assert set(named) == extras, f"environment.yml installs extras {named}, pyproject has {sorted(extras)}"
    # The CPU build of torch is pinned first, so the editable install never pulls a CUDA build.
    torch_pins = [d for d in pip_deps if d.startswith("torch")]
    assert torch_pins and "==" in torch_pins[0] and pip_deps.index(torch_pins[0]) < pip_deps.index(editable[0])
    # Nothing else is listed twice: pyproject is the one list of Python dependencies. Besides
    # pip options, only the torch pin and the package.
    assert {d for d in pip_deps if not d.startswith("--")} == {torch_pins[0], editable[0]}
    # The torch pin is the one setup.sh installs, from the same CPU wheel index.
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f"TORCH={torch_pins[0]}" in setup
    index = setup.split("TORCH_CPU_INDEX=")[1].split()[0]
    assert f"--extra-index-url {index}" in pip_deps


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in readme
