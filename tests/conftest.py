"""Shared test fixtures: the original CelerInfer fixture folder and small model factories."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from parallel import (  # noqa: F401  the hooks that run the suite on two workers (parallel.py)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_protocol,
    pytest_unconfigure,
    pytest_xdist_make_scheduler,
)

from celerinfer_lab import ModelConfig, generate_model

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """../shared/fixtures beside the checkout (CI lays a copy there), or $CELERINFER_FIXTURES."""
    path = Path(os.environ.get("CELERINFER_FIXTURES", REPO.parent / "shared" / "fixtures"))
    if not path.is_dir():
        raise RuntimeError(f"test fixtures not found at {path}; set CELERINFER_FIXTURES")
    return path


@pytest.fixture(scope="session")
def v0_dir() -> Path:
    return fixtures_dir() / "celerinfer-v0"


def small_config(**overrides) -> ModelConfig:
    """The original tool's default shape, with overrides."""
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return ModelConfig(**{**base, **overrides})


def small_model(batch_size: int = 2, seq_len: int = 7, seed: int = 7, padding: str = "none", **overrides):
    return generate_model(small_config(**overrides), batch_size, seq_len, seed, padding)


@pytest.fixture(scope="session")
def native():
    """The project's C++ forward, JIT-compiled once per test session."""
    from celerinfer_lab.native import load_native

    return load_native()


TRAINED_STEPS = 30  # enough to leave random weights well behind; a step count, not a time: the same on any machine


@pytest.fixture(scope="session")
def trained_small(tmp_path_factory):
    """The small trained model (train.py), once per session: (model, tokenizer, losses, path of its
    file, saved with its tokenizer). test_train.py and test_widgets.py share it."""
    from celerinfer_lab.train import save_trained, train_small_model

    model, tokenizer, losses = train_small_model(steps=TRAINED_STEPS, seconds=None, seed=0)
    path = save_trained(model, tokenizer, tmp_path_factory.mktemp("trained") / "small.json")
    return model, tokenizer, losses, path


@pytest.fixture
def cpp_copy(tmp_path):
    """A user's own copy of the C++ headers, free to edit."""
    import shutil

    dst = tmp_path / "my_cpp"
    shutil.copytree(REPO / "cpp" / "include", dst / "include")
    return dst


def edit_file(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server started by a test; kill it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- base_line_micro builds, once per session, shared by every test that runs it ----------------
@pytest.fixture(scope="session")
def standalone_binary(tmp_path_factory) -> Path:
    """base_line_micro as the README builds it (CMake, Release), as the benches get it (cached_standalone:
    built once per source digest in the session's data folder)."""
    from celerinfer_lab.standalone import cached_standalone

    return cached_standalone(build_dir=tmp_path_factory.mktemp("standalone-build"))


_SANITIZED: dict = {}  # the sanitized build of base_line_micro: its folder and its process


def start_sanitized_build(tmp_path_factory) -> None:
    """Start building base_line_micro under AddressSanitizer + UBSan in the background, once per session
    (clang; g++ when clang is missing). One translation unit on one core, ~50 s: test_cpp_fuzz.py starts
    it before building its fuzz target, so the two builds share the two cores."""
    import shlex
    import shutil

    if _SANITIZED:
        return
    build = tmp_path_factory.mktemp("sanitized-build")
    compiler = ["-DCMAKE_CXX_COMPILER=clang++"] if shutil.which("clang++") else []
    configure = ["cmake", "-S", str(REPO / "cpp"), "-B", str(build), *compiler, "-DCELERINFER_SANITIZE=ON"]
    configure.append("-DCMAKE_BUILD_TYPE=Release")
    compile_ = ["cmake", "--build", str(build), "--target", "base_line_micro", "-j", "2"]
    script = f"{shlex.join(configure)} && {shlex.join(compile_)}"
    process = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _SANITIZED.update(build=build, process=process, script=script)


@pytest.fixture(scope="session")
def sanitized_binary(tmp_path_factory) -> Path:
    """base_line_micro under AddressSanitizer + UBSan (start_sanitized_build, waited for here)."""
    start_sanitized_build(tmp_path_factory)
    output, _ = _SANITIZED["process"].communicate()
    assert _SANITIZED["process"].returncode == 0, f"{_SANITIZED['script']} failed:\n{output[-6000:]}"
    return _SANITIZED["build"] / "base_line_micro"


@pytest.fixture(scope="session", autouse=True)
def lab_data(tmp_path_factory):
    """A data folder of the session's own (CELERINFER_LAB_DATA), for every test and the commands they
    start: the machine's limits, the tools that measure them and the standalone binaries the benches
    build (built once per source digest, then shared by the session's benches) go there, never to
    the user's."""
    path = tmp_path_factory.mktemp("lab-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELERINFER_LAB_DATA", str(path))
        yield path


@pytest.fixture(scope="session")
def quick_limits(lab_data):
    """A quick measurement of this machine's limits (machine.py), cached in the session's data folder."""
    from celerinfer_lab.machine import machine_limits

    return machine_limits(quick=True)
