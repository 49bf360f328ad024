"""base_line_micro: built with CMake from the same headers; same logits as the cppyy path."""

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import small_model

from celerinfer_lab import load_model
from celerinfer_lab.standalone import run_standalone


@pytest.fixture(scope="session")
def binary(standalone_binary):
    return standalone_binary


@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(qk_norm=True, rope_pairing="interleaved", tie_word_embeddings=False),
        dict(use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=1, topk_renorm="k>1"),
        dict(inference_rope_scaling=True, rope_scaling={"original_max_position_embeddings": 16, "factor": 4.0}),
    ],
)
def test_standalone_equals_cppyy(binary, native, tmp_path, variant):
    model = small_model(batch_size=3, seq_len=9, padding="mixed", **variant)
    model.save(tmp_path / "m.json")
    for kernels in ("readable", "fast"):
        result = run_standalone(
            binary, tmp_path / "m.json", tmp_path / kernels, warmup=0, repeat=2, env={"KERNELS": kernels}
        )
        cppyy_logits = native.forward(load_model(tmp_path / "m.json"), kernels=kernels).logits
        if kernels == "readable":  # same headers, same summation order: g++ -O3 and cling give the same bits
            np.testing.assert_array_equal(result.logits, cppyy_logits)
        else:  # the fast kernels may contract and reassociate differently under the two compilers
            np.testing.assert_allclose(result.logits, cppyy_logits, rtol=0, atol=1e-5)
        assert result.load_ms > 0 and result.forward_ms > 0 and f"kernels: {kernels}" in result.stdout


def test_standalone_takes_a_bf16_kv_cache(binary, native, tmp_path):
    """KV_CACHE=bf16 rounds each key and value as it joins the cache, as cppyy's kv_cache="bf16":
    the same logits as that path, and not those of the float32 cache; another value is refused."""
    model = small_model(batch_size=2, seq_len=9, padding="mixed")
    model.save(tmp_path / "m.json")
    runs = {
        kv: run_standalone(binary, tmp_path / "m.json", tmp_path / kv, 0, 1, {"KV_CACHE": kv}) for kv in ("f32", "bf16")
    }
    cppyy_bf16 = native.forward(model, kernels="fast", kv_cache="bf16").logits
    np.testing.assert_allclose(runs["bf16"].logits, cppyy_bf16, rtol=0, atol=1e-5)
    assert "kv cache: bf16" in runs["bf16"].stdout and "kv cache: f32" in runs["f32"].stdout
    assert np.abs(runs["bf16"].logits - runs["f32"].logits).max() > 1e-4  # the rounding is there
    env = {**os.environ, "KV_CACHE": "fp8"}
    r = subprocess.run(
        [str(binary), str(tmp_path / "m.json"), str(tmp_path / "x")], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "KV_CACHE=fp8: must be f32 or bf16" in r.stderr, r.stderr


def test_standalone_reproduces_original_fixture(binary, v0_dir, tmp_path):
    result = run_standalone(binary, v0_dir / "minimind.json", tmp_path)
    np.testing.assert_allclose(result.logits, np.load(v0_dir / "logits_torch.npy"), rtol=0, atol=1e-5)
    assert "load:" in result.stdout and "forward: median" in result.stdout


def _mutate(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: d["weights"].pop(Q), f"missing tensor '{Q}'"),
        (
            lambda d: d["weights"][Q].update(shape=[32, 128]),
            f"tensor '{Q}' has shape [32, 128], the config implies [64, 64]",
        ),
        (lambda d: d["weights"][Q].update(data=d["weights"][Q]["data"][:-4]), "bytes but shape and dtype need 16384"),
        (lambda d: d["weights"][Q].update(dtype="int4"), "unknown dtype 'int4'"),
        (lambda d: d["weights"][Q].update(dtype="bfloat16"), "dtype 'bfloat16' is only for the weights a bf16 model"),
        (lambda d: d["weights"][Q].update(data="@" + d["weights"][Q]["data"][1:]), "not valid base64"),
        (
            lambda d: d["config"].update(num_key_value_heads=3),
            "num_attention_heads=8 is not a multiple of num_key_value_heads=3",
        ),
        (
            lambda d: d["weights"].update({"model.layers.0.bogus.weight": d["weights"][Q]}),
            "unexpected tensor 'model.layers.0.bogus.weight'",
        ),
        (lambda d: d.pop("rope"), "missing field 'rope'"),
    ],
)
def test_standalone_bad_files(binary, tmp_path, edit, expected):
    path = tmp_path / "m.json"
    small_model().save(path)
    _mutate(path, edit)
    r = subprocess.run([str(binary), str(path), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and expected in r.stderr, r.stderr


def test_standalone_truncated_and_missing(binary, tmp_path):
    path = tmp_path / "m.json"
    small_model().save(path)
    path.write_bytes(path.read_bytes()[:3000])
    r = subprocess.run([str(binary), str(path), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    r = subprocess.run([str(binary), str(tmp_path / "nope.json"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot open" in r.stderr
    r = subprocess.run([str(binary)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_the_bench_builds_base_line_micro_once_per_source(tmp_path, monkeypatch):
    """cached_standalone keeps each build in the data folder by source digest: the same sources are
    copied, not built again; an edit (not a build folder) is a new digest and a new build."""
    import shutil

    from celerinfer_lab import standalone
    from celerinfer_lab.paths import DEFAULT_CPP_DIR

    cpp = tmp_path / "cpp"
    shutil.copytree(DEFAULT_CPP_DIR, cpp, ignore=shutil.ignore_patterns("build*"))
    monkeypatch.setenv("CELERINFER_LAB_DATA", str(tmp_path / "data"))
    builds = []
    build = standalone.build_standalone
    monkeypatch.setattr(standalone, "build_standalone", lambda *a, **k: builds.append(a) or build(*a, **k))
    first = standalone.cached_standalone(cpp, tmp_path / "b1")
    second = standalone.cached_standalone(cpp, tmp_path / "b2")
    assert len(builds) == 1 and second == tmp_path / "b2" / "base_line_micro"
    assert first.read_bytes() == second.read_bytes() and second.stat().st_mode & 0o111
    assert subprocess.run([str(second), "--check", "/nonexistent.json"], capture_output=True).returncode != 0
    digest = standalone.source_digest(cpp)
    (cpp / "build-mine").mkdir()
    (cpp / "build-mine" / "CMakeCache.txt").write_text("a build folder: not a source")
    assert standalone.source_digest(cpp) == digest
    (cpp / "tools" / "base_line_micro.cpp").write_text(
        (cpp / "tools" / "base_line_micro.cpp").read_text() + "\n// edited\n"
    )
    assert standalone.source_digest(cpp) != digest
    assert sorted(p.name for p in (tmp_path / "data" / "bin").iterdir()) == [f"base_line_micro-{digest}"]
