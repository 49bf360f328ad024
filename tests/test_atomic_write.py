"""Writing a model is atomic (issue 11): JSON and sidecar appear at the path complete or not at all.

A kill at any point leaves the old model or the new one, loadable and never mixed; concurrent
writers to one path leave exactly one of their models; nothing is left behind after the next write;
outputs that cannot be written, or models too large to write, are refused with a named error.

Kills are SIGKILLs of forked writers (the test process has numpy and the package loaded already,
so a trial costs milliseconds, not a 2 s interpreter start), at injected points (the child patches
its own copy of the writer to kill itself there: each phase is hit for sure) and at random delays
from outside; two more trials kill the real `celerinfer-lab generate` mid-write.
"""

import errno
import math
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from celerinfer_lab import ModelConfig, cli, generate_model, load_model, writer
from celerinfer_lab.errors import ModelFileError, UsageError

TINY = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=32,
)
BIGGER = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=64,
)  # 3.5M parameters: a write takes some 20-60 ms


def make(seed: int, **shape):
    return generate_model(ModelConfig(**{**TINY, **shape}), 2, 5, seed)


def write(model, path, sidecar):
    return writer.write_model_file(
        path,
        model.config,
        iter(model.weights.items()),
        model.input_ids,
        model.attention_mask,
        model.rope_cos,
        model.rope_sin,
        model.meta,
        sidecar=sidecar,
    )


def same(a, b) -> bool:
    return (
        a.config == b.config
        and a.meta == b.meta
        and a.weights.keys() == b.weights.keys()
        and all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
        and np.array_equal(a.input_ids, b.input_ids)
        and np.array_equal(a.attention_mask, b.attention_mask)
        and np.array_equal(a.rope_cos, b.rope_cos)
        and np.array_equal(a.rope_sin, b.rope_sin)
    )


def which(path, candidates) -> int:
    """The index of the one candidate the model at ``path`` equals entirely (inputs and weights)."""
    loaded = load_model(path)
    matches = [i for i, c in enumerate(candidates) if same(loaded, c)]
    assert len(matches) == 1, f"{path} is none of the candidates (a mix?)"
    return matches[0]


def only_the_model(path) -> None:
    """The folder holds the model at ``path`` and the sidecar it names, nothing else."""
    path = Path(path)
    side = writer.sidecar_named_by(path)
    assert sorted(os.listdir(path.parent)) == sorted([path.name] + ([side] if side else []))


def in_child(work, delay: float | None = None) -> int:
    """Run ``work`` in a forked child; SIGKILL it after ``delay`` s. Returns its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def killed_at(obj, name: str, nth: int):
    """Patch obj.name (in the child) to SIGKILL the process at its nth call, before the call runs."""
    original, calls = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


# Where a write is killed: (what is patched, the call that kills, the phase, with / without a sidecar).
BOTH, SIDECAR, JSON = (True, False), (True,), (False,)
KILL_POINTS = [
    (writer, "_temporary", 1, "before the first temporary exists", BOTH),
    (writer._Hashing, "write", 2, "sidecar phase: after its header", SIDECAR),
    (writer._Hashing, "write", 7, "sidecar phase: mid-weights", SIDECAR),
    (writer, "_write_json", 1, "the sidecar complete and fsync'ed, no JSON yet", BOTH),
    (writer, "_write_tensor", 2, "JSON phase: after the inputs", BOTH),
    (writer, "_write_tensor", 4, "JSON phase: mid-RoPE", BOTH),
    (writer, "_write_tensor", 9, "JSON phase: mid-weights", JSON),
    (writer, "_commit", 1, "both temporaries complete, nothing committed", BOTH),
    (os, "replace", 1, "commit: before the first rename", BOTH),
    (os, "replace", 2, "commit: the sidecar renamed into place, not the JSON", SIDECAR),
    (writer, "_clean", 1, "commit: both renamed, before the clean-up", BOTH),
]


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "json"])
def test_a_kill_at_any_point_leaves_the_old_or_the_new_model(tmp_path, sidecar):
    path = tmp_path / "m.json"
    old, new, next_one = make(1), make(2), make(3)
    outcomes = {}
    for obj, name, nth, phase, modes in KILL_POINTS:
        if sidecar not in modes:
            continue
        write(old, path, sidecar)

        def killed_write():
            killed_at(obj, name, nth)
            write(new, path, sidecar)

        status = in_child(killed_write)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (phase, status)
        outcomes[phase] = ("old", "new")[which(path, [old, new])]  # loads, and is one of them entirely
        assert outcomes[phase] == ("new" if name == "_clean" else "old"), (phase, outcomes[phase])
        write(next_one, path, sidecar)  # the next write cleans up what the killed one left
        assert which(path, [next_one]) == 0
        only_the_model(path)
    print(outcomes)


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "json"])
def test_random_kills_from_outside(tmp_path, sidecar):
    path = tmp_path / "m.json"
    old, new = make(1, **BIGGER), make(2, **BIGGER)
    start = time.perf_counter()
    write(new, path, sidecar)
    duration = time.perf_counter() - start
    rng, seen = random.Random(11), {"old": 0, "new": 0}
    for _trial in range(12):
        write(old, path, sidecar)
        in_child(lambda: write(new, path, sidecar), delay=rng.uniform(0, 1.5 * duration))
        seen[("old", "new")[which(path, [old, new])]] += 1
    write(old, path, sidecar)
    only_the_model(path)
    print(f"write {duration * 1e3:.0f} ms, outcomes {seen}")


def test_killing_the_command_mid_write(tmp_path):
    """The real command, SIGKILLed while its sidecar streams, then while its JSON streams."""
    path = tmp_path / "m.json"
    shape = ["--hidden", "512", "--layers", "4", "--heads", "4", "--kvh", "2", "--vocab", "512", "--max-pos", "64"]
    old = generate_model(
        ModelConfig(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=64,
        ),
        2,
        5,
        1,
    )
    for sidecar, phase in ((True, ".sidecar.tmp"), (False, ".m.json.")):
        write(old, path, sidecar)
        proc = subprocess.Popen(
            [sys.executable, "-m", "celerinfer_lab.cli", "generate", *shape, "--seed", "2", "--force", "-o", str(path)]
            + (["--sidecar"] if sidecar else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not any(phase in name for name in os.listdir(tmp_path)) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        proc.stderr.close()
        assert which(path, [old]) == 0  # killed mid-write: the old model, whole
        write(old, path, sidecar)
        only_the_model(path)


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "json"])
def test_concurrent_writers_leave_exactly_one_model(tmp_path, sidecar):
    path = tmp_path / "m.json"
    models = [make(seed, **BIGGER) for seed in range(8)]
    winners = []
    for _round in range(3):
        read_end, write_end = os.pipe()
        pids = []
        for m in models:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(write_end)
                    os.read(read_end, 1)  # all start at once
                    write(m, path, sidecar)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(read_end)
        os.close(write_end)  # EOF: go
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses
        winners.append(which(path, models))
        only_the_model(path)
    print(f"winners {winners}")


def test_concurrent_commands(tmp_path):
    """Four `celerinfer-lab generate --sidecar` to one path at once (each starts its own interpreter:
    the eight-writer rounds above are forked): all succeed, one of their models remains."""
    path = tmp_path / "m.json"
    shape = ["--hidden", "128", "--layers", "2", "--heads", "4", "--kvh", "2", "--vocab", "256", "--max-pos", "32"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celerinfer_lab.cli",
                "generate",
                *shape,
                "--seed",
                str(seed),
                "--force",
                "--sidecar",
                "-o",
                str(path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.startswith(f"wrote {path}"), err
    config = ModelConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=32,
    )
    which(path, [generate_model(config, 2, 5, seed) for seed in range(4)])
    only_the_model(path)


# ---- names, determinism, clean-up ---------------------------------------------------------------------
def test_sidecar_is_content_addressed_and_output_deterministic(tmp_path):
    a, b = tmp_path / "a" / "m.json", tmp_path / "b" / "m.json"
    for path in (a, b):
        generate_model(ModelConfig(**TINY), 2, 5, 7, output=path, sidecar=True)
    side = writer.sidecar_named_by(a)
    assert side == writer.sidecar_named_by(b) and side.startswith("m.") and side.endswith(".safetensors")
    import hashlib

    data = (a.parent / side).read_bytes()
    assert side == f"m.{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    assert a.read_bytes() == b.read_bytes() and data == (b.parent / side).read_bytes()
    import json

    assert json.loads(a.read_text())["sidecar"] == {"file": side, "format": "safetensors", "bytes": len(data)}
    mtime = (a.parent / side).stat().st_mtime_ns  # the same model again: the sidecar already there is kept
    generate_model(ModelConfig(**TINY), 2, 5, 7, output=a, sidecar=True)
    assert (a.parent / side).stat().st_mtime_ns == mtime
    only_the_model(a)


def test_plain_write_removes_the_replaced_sidecar(tmp_path):
    path = tmp_path / "m.json"
    write(make(1), path, True)
    write(make(2), path, False)
    only_the_model(path)
    assert which(path, [make(2)]) == 0


def test_models_sharing_a_stem_keep_their_sidecars(tmp_path):
    write(make(1), tmp_path / "m.bak", True)
    write(make(2), tmp_path / "m.json", True)
    write(make(3), tmp_path / "m.json", True)
    assert which(tmp_path / "m.bak", [make(1)]) == 0 and which(tmp_path / "m.json", [make(3)]) == 0
    assert len(os.listdir(tmp_path)) == 4


def test_the_sidecar_of_the_old_naming_goes_with_its_model(tmp_path):
    """A model written before sidecars were hashed names m.safetensors: replacing it removes it."""
    path = tmp_path / "m.json"
    write(make(1), path, True)
    hashed = writer.sidecar_named_by(path)
    (tmp_path / hashed).rename(tmp_path / "m.safetensors")
    path.write_text(path.read_text().replace(hashed, "m.safetensors"))
    assert which(path, [make(1)]) == 0
    write(make(2), path, True)
    only_the_model(path)


def test_an_interrupted_write_removes_its_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    old = make(1)
    write(old, path, True)

    def interrupt(*_args):
        raise KeyboardInterrupt

    for name in ("_write_tensor", "_commit"):
        with monkeypatch.context() as patch:
            patch.setattr(writer, name, interrupt)
            with pytest.raises(KeyboardInterrupt):
                write(make(2), path, True)
        assert which(path, [old]) == 0
        only_the_model(path)


def test_stale_temporaries_of_live_writers_are_kept(tmp_path):
    path = tmp_path / "m.json"
    live = tmp_path / f".m.json.{os.getppid()}.0123abcd.tmp"  # a writer that is still running
    dead = tmp_path / ".m.json.999999999.0123abcd.sidecar.tmp"  # no such pid
    other = tmp_path / ".n.json.999999999.0123abcd.tmp"  # another target's
    for f in (live, dead, other):
        f.write_bytes(b"x")
    write(make(1), path, True)
    assert live.exists() and other.exists() and not dead.exists()


# ---- refusals -----------------------------------------------------------------------------------------
def call(capsys, *args):
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result, *words):
    code, _out, err = result
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and all(w in err for w in words), err
    return err


TINY_FLAGS = ["--hidden", "32", "--layers", "1", "--heads", "4", "--kvh", "2", "--vocab", "64", "--max-pos", "32"]


def test_output_names_refused(tmp_path, capsys):
    one_line_error(
        call(capsys, "generate", *TINY_FLAGS, "--sidecar", "-o", tmp_path / "x.safetensors"),
        "x.safetensors",
        ".safetensors",
    )
    one_line_error(call(capsys, "generate", *TINY_FLAGS, "-o", tmp_path), "is a folder")
    one_line_error(call(capsys, "generate", *TINY_FLAGS, "--sidecar", "-o", tmp_path), "is a folder")
    one_line_error(call(capsys, "generate", *TINY_FLAGS, "--seed", "-1", "-o", tmp_path / "m.json"), "seed=-1")
    assert os.listdir(tmp_path) == []
    with pytest.raises(UsageError, match="ends in .safetensors"):
        generate_model(ModelConfig(**TINY), output=tmp_path / "x.safetensors", sidecar=True)
    with pytest.raises(UsageError, match="is a folder"):
        write(make(1), tmp_path, False)
    assert os.listdir(tmp_path) == []


def test_an_existing_model_or_its_sidecar_needs_force(tmp_path, capsys):
    path = tmp_path / "m.json"
    assert call(capsys, "generate", *TINY_FLAGS, "--sidecar", "-o", path)[0] == 0
    side = writer.sidecar_named_by(path)
    one_line_error(call(capsys, "generate", *TINY_FLAGS, "--sidecar", "-o", path), str(path), side, "--force")
    path.unlink()  # the sidecar alone would be replaced too
    one_line_error(call(capsys, "generate", *TINY_FLAGS, "-o", path), side, "--force")
    code, out, _ = call(capsys, "generate", *TINY_FLAGS, "--sidecar", "--seed", "9", "--force", "-o", path)
    new_side = writer.sidecar_named_by(path)
    assert code == 0 and f"sidecar {new_side}" in out and new_side != side
    only_the_model(path)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (as root), unmounted afterwards; skipped where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_model_larger_than_the_free_space_is_refused_before_writing(small_disk, capsys):
    path = small_disk / "m.json"
    err = one_line_error(
        call(capsys, "generate", "--hidden", "256", "--layers", "2", "-o", path, "--sidecar"),
        f"cannot write {path}",
        "free",
    )
    assert "MB" in err and os.listdir(small_disk) == []


def test_a_full_disk_mid_write_is_a_named_error(small_disk, capsys, monkeypatch):
    path = small_disk / "m.json"
    old = make(1)
    write(old, path, False)  # some 60 kB: the next write fills the disk
    from celerinfer_lab import generate

    for module in (writer, generate):  # get past the free-space check: a real ENOSPC
        monkeypatch.setattr(module, "check_disk_room", lambda *args: None)
    for sidecar in ([], ["--sidecar"]):
        one_line_error(
            call(capsys, "generate", "--hidden", "256", "--layers", "1", "--force", "-o", path, *sidecar),
            f"error: cannot write {path}: No space left on device",
        )
        assert which(path, [old]) == 0
        only_the_model(path)


def test_enospc_at_fsync_is_a_named_error(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted this is the full-disk test: a disk can also fail at fsync."""
    path = tmp_path / "m.json"
    old = make(1)
    write(old, path, True)

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.os, "fsync", full)
    with pytest.raises(ModelFileError, match=f"cannot write {path}: No space left on device$"):
        write(make(2), path, True)
    monkeypatch.undo()
    assert which(path, [old]) == 0
    only_the_model(path)


def test_huge_models_are_refused_before_any_allocation(tmp_path, capsys):
    """Refused with a named error, fast: by a size limit (limits.py), for memory or for disk space.
    The two the issue measured run under a 2 GB address-space limit."""
    cases = {  # the flags, and the words of the refusal
        "hidden": (["--hidden", "1000000000"], "hidden_size"),
        "layers": (["--layers", "100000000"], "num_hidden_layers"),
        "memory": (
            ["--hidden", "65536", "--heads", "64", "--kvh", "64", "--vocab", "4194304"],
            "does not fit in memory",
        ),
        "disk": (["--hidden", "4096", "--heads", "32", "--kvh", "8", "--layers", "1024"], "free"),
        "batch": (["--batch-size", "1000000000"], "batch_size"),
    }
    start = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [
                "prlimit",
                "--as=2000000000",
                sys.executable,
                "-m",
                "celerinfer_lab.cli",
                "generate",
                *cases[name][0],
                "--sidecar",
                "-o",
                str(tmp_path / f"{name}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("hidden", "layers")
    }
    results = {
        name: call(capsys, "generate", *flags, "-o", tmp_path / f"{name}.json")
        for name, (flags, _) in cases.items()
        if name not in procs
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[name] = proc.returncode, out, err
    for name, result in results.items():
        one_line_error(result)
        err = result[2]
        assert cases[name][1] in err or "does not fit in memory" in err or " free" in err, (name, err)
    assert time.monotonic() - start < 60 and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(qk_norm=True),
        dict(tie_word_embeddings=False),
        dict(use_moe=True, num_experts=3, num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=96),
        dict(use_moe=True, num_experts=4, num_experts_per_tok=1, vocab_size=16),
    ],
)
def test_arithmetic_sizes_match_the_weight_table(overrides):
    """tensor_count and largest_tensor count without enumerating (for huge configs); they must equal
    what the weight table itself says."""
    from celerinfer_lab.modelformat import weight_shapes
    from celerinfer_lab.writer import largest_tensor, tensor_count

    config = ModelConfig(
        **{
            **dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=64,
                max_position_embeddings=32,
            ),
            **overrides,
        }
    )
    shapes = weight_shapes(config)
    assert tensor_count(config) == len(shapes)
    assert largest_tensor(config)[2] == 4 * max(math.prod(s) for s in shapes.values())
