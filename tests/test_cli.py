import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import small_model

from celerinfer_lab import load_model, reference_forward


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "celerinfer_lab.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("celerinfer-lab")
    assert script.exists() or shutil.which("celerinfer-lab"), "pip install -e . should install celerinfer-lab"


def test_torch_forward_prints_and_dumps(tmp_path):
    path = tmp_path / "m.json"
    small_model().save(path)
    r = run(
        "torch-forward",
        str(path),
        "--warmup",
        "1",
        "--repeat",
        "3",
        "--dump-dir",
        str(tmp_path / "out"),
        "--save-trace",
    )
    assert r.returncode == 0, r.stderr
    assert "median" in r.stdout and "logits: shape [2, 7, 128]" in r.stdout
    logits = np.load(tmp_path / "out" / "logits_torch.npy")
    np.testing.assert_array_equal(logits, reference_forward(load_model(path)).logits)
    trace = np.load(tmp_path / "out" / "trace_torch.npz")
    assert "model.layers.1.self_attn.probs" in trace.files


def test_torch_forward_honours_original_environment(tmp_path, v0_dir):
    r = run("torch-forward", env={"JSON_PATH": str(v0_dir / "minimind.json"), "DUMP_DIR": str(tmp_path), "WARMUP": "0"})
    assert r.returncode == 0, r.stderr
    assert re.search(r"runs\)(?: — noisy: [^\n]*)? after 0 warm-up", r.stdout), (
        r.stdout
    )  # a noisy machine says so between
    np.testing.assert_allclose(
        np.load(tmp_path / "logits_torch.npy"), np.load(v0_dir / "logits_torch.npy"), rtol=0, atol=1e-6
    )


def test_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "celerinfer-lab", "format_version": 1, "config": {')
    r = run("torch-forward", str(bad))
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = run("torch-forward")
    assert r.returncode == 2 and "JSON_PATH" in r.stderr


def test_info_lists_trace_points(tmp_path):
    path = tmp_path / "m.json"
    small_model(qk_norm=True).save(path)
    r = run("info", str(path), "--trace-points")
    assert r.returncode == 0 and "model.layers.0.self_attn.q_norm" in r.stdout and "[2, 7, 8, 8]" in r.stdout


def test_forwards_take_a_bf16_kv_cache(tmp_path):
    """--kv-cache bf16 on torch-forward and cpp-forward: both round the prompt's keys and values as they
    join the cache (its attention reads them), so they agree with each other, not with float32."""
    path = tmp_path / "m.json"
    small_model().save(path)
    logits = {}
    for command, name in (("torch-forward", "logits_torch.npy"), ("cpp-forward", "logits_cpp.npy")):
        for kv in ("f32", "bf16"):
            out = tmp_path / f"{command}-{kv}"
            r = run(command, str(path), "--kv-cache", kv, "--dump-dir", str(out), "--warmup", "0", "--repeat", "1")
            assert r.returncode == 0, r.stderr
            assert ("bf16 KV cache" in r.stdout) == (kv == "bf16"), r.stdout
            logits[command, kv] = np.load(out / name)
    np.testing.assert_allclose(logits["cpp-forward", "bf16"], logits["torch-forward", "bf16"], rtol=0, atol=1e-4)
    assert np.abs(logits["torch-forward", "bf16"] - logits["torch-forward", "f32"]).max() > 1e-4


def test_cpp_forward_and_compare(tmp_path, cpp_copy):
    from conftest import edit_file

    path = tmp_path / "m.json"
    small_model(qk_norm=True).save(path)
    r = run("cpp-forward", str(path), "--dump-dir", str(tmp_path / "out"), "--warmup", "1", "--repeat", "3")
    assert r.returncode == 0, r.stderr
    assert "C++ forward (cppyy, fast kernels" in r.stdout and (tmp_path / "out" / "logits_cpp.npy").exists()
    r = run("cpp-forward", str(path), "--kernels", "readable", "--warmup", "0", "--repeat", "1")
    assert r.returncode == 0 and "C++ forward (cppyy, readable kernels" in r.stdout
    r = run("cpp-forward", str(path), "--kernels", "nonesuch")
    assert r.returncode == 2 and "unknown kernel set 'nonesuch'" in r.stderr and "readable, fast" in r.stderr
    r = run("compare", str(path))
    assert r.returncode == 0 and "== readable kernels" in r.stdout and "== fast kernels" in r.stdout
    assert r.stdout.count("all 41 trace points agree") == 6  # readable, fast and the four bf16/q8 sets
    assert r.stdout.count("weights: q8 (Q8_0), oracle: float64 on the decoded q8 weights") == 2
    assert (
        r.stdout.index("model.embed_tokens")
        < r.stdout.index("model.layers.0.self_attn.q_norm")
        < r.stdout.index("lm_head")
    )
    edit_file(
        cpp_copy / "include/celerinfer/ops.hpp",
        "const float scale = float(std::sqrt(double(d.hd)));",
        "const float scale = float(d.hd);",
    )
    r = run("compare", str(path), "--cpp-dir", str(cpp_copy))
    readable, fast = r.stdout.split("== fast kernels")
    assert r.returncode == 1 and "culprit (own error): model.layers.0.self_attn.scores" in readable
    assert "all 41 trace points agree" in fast  # the edit is in the readable kernels only
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert run("compare", str(bad)).returncode == 2
    r = run("compare", str(path), "--cpp-dir", str(tmp_path))
    assert r.returncode == 2 and "no celerinfer/celerinfer.hpp" in r.stderr


def test_compare_list_faults_and_fault(tmp_path):
    from celerinfer_lab.faults import FAULTS

    r = run("compare", "--list-faults")
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and [line.split()[0] for line in lines] == list(FAULTS)
    path = tmp_path / "m.json"
    small_model(batch_size=2, seq_len=8).save(path)
    r = run("compare", str(path), "--fault", "silu_as_gelu")
    assert r.returncode == 1 and "== readable kernels (fault silu_as_gelu)" in r.stdout
    assert "== fast kernels" not in r.stdout  # the fault edits the readable kernels only
    tail = r.stdout.strip().splitlines()[-2:]
    assert "culprit (own error): model.layers.0.mlp.act" in tail[0] and tail[1].startswith("diagnosis: GELU")
    r = run("compare", str(path), "--fault", "silu_as_gelu", "--kernels", "fast")
    assert r.returncode == 2 and "changes only the readable kernels" in r.stderr
    r = run("compare", str(path), "--fault", "untied_head_as_embedding")  # the model is tied: it cannot show
    assert r.returncode == 2 and "cannot show" in r.stderr and "generate --untied" in r.stderr
    r = run("compare", str(path), "--fault", "padding_mask_ignored")
    assert r.returncode == 2 and "no padding: --padding left" in r.stderr
    r = run("compare", str(path), "--fault", "no_such_fault")
    assert r.returncode == 2 and "unknown fault 'no_such_fault'" in r.stderr
