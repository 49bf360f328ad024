"""Bad input to every command is one line `error: ...` and exit status 2, never a traceback; the
error classes form one family; nothing is left behind or overwritten by surprise."""

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, small_model, stop_process

from celerinfer_lab import cli, errors
from celerinfer_lab.errors import CelerInferError, UsageError
from celerinfer_lab.writer import sidecar_named_by


def run(*args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "celerinfer_lab.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def call(capsys, *args):
    """The CLI in this process (fast): exit code, stdout, stderr. An escaping exception fails the test."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(result, *words):
    code, _out, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(("error:", "celerinfer-lab")) and "error:" in lines[-1], err
    for word in words:
        assert word in lines[-1], (word, err)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.json"
    small_model().save(path)
    return path


# ---- the family ------------------------------------------------------------------------------
def test_one_family_keeps_the_old_bases_and_homes():
    from celerinfer_lab import config, faults, modelfile, native, sidecar, standalone

    assert config.ConfigError is errors.ConfigError and modelfile.ModelFileError is errors.ModelFileError
    assert sidecar.SidecarError is errors.SidecarError and faults.FaultError is errors.FaultError
    assert native.NativeError is errors.NativeError and native.NativeCompileError is errors.NativeCompileError
    assert standalone.StandaloneError is errors.StandaloneError
    for cls, old in (
        (errors.ConfigError, ValueError),
        (errors.ModelFileError, ValueError),
        (errors.SidecarError, ValueError),
        (errors.FaultError, ValueError),
        (errors.UsageError, ValueError),
        (errors.NativeError, RuntimeError),
        (errors.NativeCompileError, RuntimeError),
        (errors.StandaloneError, RuntimeError),
        (errors.UsageTypeError, TypeError),
    ):
        assert issubclass(cls, CelerInferError) and issubclass(cls, old), cls
    assert issubclass(errors.SidecarError, errors.ModelFileError)
    assert issubclass(errors.NativeCompileError, errors.NativeError)


def test_get_fault_and_check_inputs_raise_named_errors(native):
    import numpy as np

    from celerinfer_lab.faults import get_fault

    with pytest.raises(errors.FaultError, match="unknown fault"):
        get_fault("nonesuch")
    with pytest.raises(errors.FaultError):
        get_fault(["not", "a", "name"])
    prepared = native.prepare(small_model())
    for ids, mask, cls, match in (
        (np.zeros(3, np.int64), None, UsageError, "shape"),
        (np.zeros((2, 3), np.float32), None, TypeError, "integers"),
        (np.zeros((2, 3), np.int64), np.ones((2, 4)), UsageError, "attention_mask has shape"),
        (np.full((2, 3), 999), None, UsageError, "outside the vocabulary"),
    ):
        with pytest.raises(cls, match=match) as info:
            prepared.check_inputs(ids, mask)
        assert isinstance(info.value, UsageError)


def test_cli_padding_modes_match_generate():
    from celerinfer_lab.generate import PADDING_MODES

    assert cli.PADDING_MODES == PADDING_MODES


def test_cli_import_stays_light():
    code = "import sys, celerinfer_lab.cli; print(sorted(m for m in ('matplotlib', 'celerinfer_lab.bench', 'cppyy') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ---- generate ----------------------------------------------------------------------------------
def test_generate_bad_arguments(capsys, tmp_path):
    out = tmp_path / "m.json"
    assert_usage_error(call(capsys, "generate", "--seed", "-1", "-o", out), "seed=-1")
    assert_usage_error(call(capsys, "generate", "-o", tmp_path), "is a folder", str(tmp_path))
    assert_usage_error(call(capsys, "generate", "--hidden", "0", "-o", out), "hidden_size")
    assert_usage_error(call(capsys, "generate", "--batch-size", "0", "-o", out), "batch_size")
    assert_usage_error(call(capsys, "generate", "--seq-len", "0", "-o", out), "seq_len")
    assert_usage_error(call(capsys, "generate", "--heads", "8", "--kvh", "3", "-o", out), "num_key_value_heads")
    assert_usage_error(call(capsys, "generate", "--pad-lengths", "a,b", "-o", out), "--pad-lengths", "comma-separated")
    assert_usage_error(
        call(capsys, "generate", "--padding", "left", "--pad-lengths", "0,9", "-o", out), "pad_lengths[1]=9"
    )
    assert_usage_error(call(capsys, "generate", "--padding", "left", "--pad-lengths", "0", "-o", out), "pad_lengths")
    assert_usage_error(call(capsys, "generate", "--hidden", "x", "-o", out), "--hidden", "'x'")
    assert_usage_error(call(capsys, "generate", "--preset", "nonesuch"), "--preset")
    assert_usage_error(call(capsys, "generate", "-o", "/dev/full/m.json"), "/dev/full")
    assert not out.exists()


def test_generate_creates_folders_and_refuses_to_overwrite(capsys, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.json"
    code, stdout, err = call(capsys, "generate", "-o", out)
    assert code == 0 and out.exists() and f"wrote {out}" in stdout, err
    before = out.read_bytes()
    assert_usage_error(call(capsys, "generate", "--seed", "5", "-o", out), str(out), "--force")
    assert out.read_bytes() == before
    code, _, err = call(capsys, "generate", "--seed", "5", "-o", out, "--force")
    assert code == 0 and out.read_bytes() != before, err
    assert not list(out.parent.glob("*.partial"))


def test_generate_reports_json_and_sidecar_sizes(capsys, tmp_path):
    out = tmp_path / "m.json"
    code, stdout, _ = call(capsys, "generate", "-o", out, "--sidecar")
    side = out.with_name(sidecar_named_by(out))  # m.<16 hex of its sha256>.safetensors
    assert code == 0 and side.exists()
    assert (
        f"{out.stat().st_size / 1e3:.1f} kB JSON" in stdout and f"{side.stat().st_size / 1e6:.1f} MB sidecar" in stdout
    )
    assert "0.0 MB" not in stdout
    out.unlink()  # the sidecar alone is in the way too
    assert_usage_error(call(capsys, "generate", "-o", out, "--sidecar"), side.name, "--force")


def test_full_disk_is_a_named_error(tmp_path):
    def small_files():  # a file-size limit: writes past 100 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "m.json"
    r = run("generate", "-o", out, preexec_fn=small_files)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"error: cannot write {out}: File too large"
    assert list(tmp_path.iterdir()) == []  # no half-written file left


# ---- reading model files -------------------------------------------------------------------------
def test_bad_model_files(capsys, tmp_path, model_path):
    missing = tmp_path / "nonesuch.json"
    for command in ("info", "torch-forward", "compare"):
        assert_usage_error(call(capsys, command, missing), str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert_usage_error(call(capsys, "info", bad), "not valid JSON")
    assert_usage_error(call(capsys, "info", tmp_path), str(tmp_path))
    side = tmp_path / "s.json"
    assert call(capsys, "generate", "-o", side, "--sidecar")[0] == 0
    sidecar = side.with_name(sidecar_named_by(side))
    sidecar.unlink()
    assert_usage_error(call(capsys, "info", side), sidecar.name)
    assert_usage_error(call(capsys, "compare"), "no model file")


def test_forward_bad_numbers(capsys, model_path, monkeypatch):
    assert_usage_error(call(capsys, "torch-forward", model_path, "--repeat", "0"), "--repeat 0")
    assert_usage_error(call(capsys, "torch-forward", model_path, "--warmup", "-1"), "--warmup -1")
    assert_usage_error(call(capsys, "torch-forward", model_path, "--threads", "0"), "--threads 0")
    monkeypatch.setenv("WARMUP", "lots")
    assert_usage_error(call(capsys, "torch-forward", model_path), "WARMUP='lots'")


def test_unknown_names(capsys, model_path):
    assert_usage_error(call(capsys, "compare", model_path, "--fault", "nonesuch"), "unknown fault 'nonesuch'")
    assert_usage_error(
        call(capsys, "cpp-forward", model_path, "--kernels", "nonesuch"), "unknown kernel set 'nonesuch'"
    )
    assert_usage_error(call(capsys, "nonesuch"), "invalid choice")
    assert_usage_error(call(capsys, "info", model_path, "--bogus"), "unrecognized arguments: --bogus")


def test_bench_bad_arguments(capsys, tmp_path):
    assert_usage_error(call(capsys, "bench", 64, 2, 8, 2, 128, 5), "expected 7 numbers", "got 6")
    assert_usage_error(call(capsys, "bench", 64, 2, 8, 2, 128, 5, 2, "--preset", "minimind2-small"), "--preset")
    assert_usage_error(call(capsys, "bench", "--seed", "-1"), "--seed -1")
    assert_usage_error(call(capsys, "bench", "--repeat", "0"), "--repeat 0")
    assert_usage_error(call(capsys, "bench", 64, 2, 8, 3, 128, 5, 2), "num_key_value_heads")


def test_one_line_even_through_a_subprocess(tmp_path):
    r = run("generate", "--seed", "-1", "-o", tmp_path / "m.json")
    assert r.returncode == 2 and r.stderr == "error: seed=-1: must be an integer >= 0\n"


# ---- nothing left behind --------------------------------------------------------------------------
def test_bench_removes_its_temporary_folder(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = run(
        "bench",
        16,
        1,
        2,
        1,
        32,
        3,
        1,
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--json",
        tmp_path / "b.json",
        env={"TMPDIR": str(tmp)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp.glob("celerinfer-bench-*")), list(tmp.iterdir())  # (test_bench.py: --work-dir is kept)


def test_notebook_01_writes_into_scratch():
    text = (REPO / "notebooks" / "01_quickstart.ipynb").read_text()
    assert 'model.save(\\"scratch/quickstart.json\\")' in text
    assert "notebooks/scratch/" in (REPO / ".gitignore").read_text().splitlines()


def test_tolerance_margin_help():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tolerance_margin.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "usage:" in r.stdout and "EXAMPLES" in r.stdout


# ---- lab ----------------------------------------------------------------------------------------
def test_lab_command_line(capsys, tmp_path):
    command = cli.lab_command(None, ["--no-browser"], as_root=True)
    assert command[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={REPO / 'notebooks'}" in command and command[-2:] == ["--allow-root", "--no-browser"]
    assert "--allow-root" not in cli.lab_command(tmp_path, [], as_root=False)
    assert cli.lab_command(tmp_path, ["--allow-root"], as_root=True).count("--allow-root") == 1
    code, out, err = call(capsys, "lab", tmp_path, "--print-command", "--port", "9999")
    assert code == 0 and f"--ServerApp.root_dir={tmp_path}" in out and out.strip().endswith("--port 9999"), err
    assert ("--allow-root" in out) == (os.geteuid() == 0)
    assert_usage_error(call(capsys, "lab", tmp_path / "nonesuch"), "nonesuch", "no such folder")


def test_lab_serves_the_notebooks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celerinfer_lab.cli",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path)},
    )
    try:
        deadline, page = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5) as response:
                    page = response.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no answer"
        assert "JupyterLab" in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5) as response:
            assert "01_quickstart.ipynb" in response.read().decode()  # the notebooks folder is the root
    finally:
        stop_process(proc)
