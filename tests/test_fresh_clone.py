"""The README's demo command works on a fresh clone: a `git clone` of the committed HEAD into a new
folder, with nothing made beforehand (no out/ folder), runs `bash scripts/demo.sh` to the end.

The demo's set-up installs the package editable into its environment. So that it never re-points
the editable install of the Python running this suite at the temporary clone, the demo runs in a
venv of its own in tmp_path, which sees this Python's packages (torch, cppyy, ...: nothing big is
downloaded) and is activated for the subprocess only, through VIRTUAL_ENV and PATH.
The no-environment path (set-up creates the project venv .venv) is checked through set-up's
detection step alone (`--env-dir`); a whole install into a new .venv is too long for the suite.
The demo test is the one test that runs set-up's install steps, and the only check that the
README's demo command works (CI runs scripts/test.sh, not demo.sh). Its pip step is an editable
install of the clone into the throwaway venv: the thing checked (the demo runs the clone's code).
It never runs apt-get: when a Debian package set-up would install is missing, the test skips and
says which (set-up, as CI runs it, installs them before the suite).
The demo test takes about 1-2.5 minutes on 2 cores (the demo itself ~40 s, set-up ~15 s, the rest
the venv and load from other work).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a git checkout"
)


def _clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    return dest


def _base_python() -> str:
    """This Python's own interpreter outside any venv."""
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        exe = Path(sys.base_prefix) / "bin" / name
        if exe.exists():
            return str(exe)
    pytest.skip("no base interpreter found")


def _env_without_active_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")}
    return env


def _venv_sharing_this_python(where: Path) -> Path:
    """A venv that sees every package of the Python running this suite, and installs into itself."""
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(where)
    purelib = Path(
        subprocess.run(
            [str(where / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    if sys.prefix != sys.base_prefix:
        # This suite runs in a venv (.venv, say): its packages are not the base Python's
        # site-packages, so add them after the new venv's own (whose editable install comes first).
        dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
        (purelib / "zz_suite_site_packages.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n"
        )
    return where


def _celerinfer_lab_location(python: str | Path, env: dict[str, str] | None = None) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import celerinfer_lab; print(celerinfer_lab.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd="/",
    ).stdout.strip()
    return Path(out).resolve()


def test_setup_without_an_environment_would_create_the_project_venv(tmp_path):
    clone = _clone(tmp_path / "clone")
    env = _env_without_active_environment()
    env["PYTHON"] = _base_python()
    out = subprocess.run(
        ["bash", "scripts/setup.sh", "--env-dir"], cwd=clone, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == clone / ".venv"
    assert not (clone / ".venv").exists(), "--env-dir must only tell, not create"
    # .venv is git-ignored, so a created one never shows as a change.
    ignored = subprocess.run(["git", "check-ignore", ".venv/"], cwd=clone, capture_output=True, text=True)
    assert ignored.returncode == 0


def test_setup_uses_an_active_environment_as_is(tmp_path):
    env = _env_without_active_environment()
    env["VIRTUAL_ENV"] = str(tmp_path / "somevenv")
    out = subprocess.run(
        ["bash", "scripts/setup.sh", "--env-dir"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "somevenv")
    env = _env_without_active_environment()
    env["CONDA_PREFIX"] = str(tmp_path / "conda")
    out = subprocess.run(
        ["bash", "scripts/setup.sh", "--env-dir"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == str(tmp_path / "conda")
    # A python3 that runs inside a venv, with nothing activated, installs into that venv.
    venv.EnvBuilder(with_pip=False).create(tmp_path / "v")
    env = _env_without_active_environment()
    env["PYTHON"] = str(tmp_path / "v" / "bin" / "python")
    out = subprocess.run(
        ["bash", "scripts/setup.sh", "--env-dir"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert Path(out.stdout.strip()).resolve() == (tmp_path / "v").resolve()


def _missing_debian_packages() -> list[str]:
    """The Debian packages scripts/setup.sh would apt-get install here (its DEBIAN_PACKAGES, read
    from the script so the two lists cannot drift)."""
    line = next(
        text
        for text in (REPO / "scripts" / "setup.sh").read_text().splitlines()
        if text.startswith("DEBIAN_PACKAGES=(")
    )
    packages = line.split("(", 1)[1].split(")", 1)[0].split()
    assert packages, line
    return [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]


def test_demo_runs_from_a_fresh_clone_as_the_readme_says(tmp_path):
    if shutil.which("dpkg") is None:
        pytest.skip("no dpkg: set-up's Debian step cannot be checked without running it")
    missing = _missing_debian_packages()
    if missing:
        pytest.skip(f"set-up would apt-get install {missing}: run `bash scripts/setup.sh` first (no apt in the suite)")
    here_before = _celerinfer_lab_location(sys.executable)
    clone = _clone(tmp_path / "fresh clone")
    assert not (clone / "out").exists()
    venv_dir = _venv_sharing_this_python(tmp_path / "venv")
    env = _env_without_active_environment()
    env["VIRTUAL_ENV"] = str(venv_dir)
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    run = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=clone,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert f"installing into the active virtual environment {venv_dir}" in output
    # The torch forward, the C++ forward, their agreement, and the benchmark's table.
    for shown in ("torch forward", "C++ forward", "agree", "PyTorch forward", "C++ standalone"):
        assert shown in output, f"the demo's output does not show {shown!r}:\n{output[-4000:]}"
    for made in ("model.json", "bench.json"):
        assert (clone / "out" / made).is_file(), f"out/{made} missing"
    assert (clone / "out" / "bench").is_dir()
    # The demo's environment runs the clone's code; the suite's Python still runs its own.
    assert _celerinfer_lab_location(venv_dir / "bin" / "python", env).is_relative_to(clone.resolve())
    assert _celerinfer_lab_location(sys.executable) == here_before
