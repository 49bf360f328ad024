"""llama.cpp as the bench's third engine (celerinfer_lab/llama_cpp_engine.py): the GGUF export's
numerics checked against the float64 reference through llama.cpp itself, and `bench --engines
torch,cpp,llama.cpp`. The tests that run llama.cpp need llama-cpp-python (the `llama` extra; .ci/run
installs it); the rest check what happens without it and the bad flags."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import celerinfer_lab as cl
from celerinfer_lab import bench, llama_cpp_engine
from celerinfer_lab.errors import UsageError
from celerinfer_lab.llama_cpp_engine import LlamaCppModel, llama_cpp_missing, prompt_tokens
from celerinfer_lab.reference import greedy_generate

needs_llama = pytest.mark.skipif(llama_cpp_missing() is not None, reason=str(llama_cpp_missing()))
CONFIG = cl.ModelConfig(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    vocab_size=256,
    max_position_embeddings=64,
)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celerinfer_lab.cli", *args], capture_output=True, text=True)


def reference_logits(model: cl.Model) -> np.ndarray:
    return cl.ReferenceModel(model, dtype=torch.float64).forward()[0].numpy()[0]


def llama_logits(model: cl.Model, gguf_type: str, work: Path) -> np.ndarray:
    """Every prompt position's logits from llama.cpp running ``model`` as a GGUF of ``gguf_type``."""
    engine = LlamaCppModel(model, gguf_type, work, threads=1, logits_all=True)
    try:
        engine.prefill()
        return engine.logits()
    finally:
        engine.close()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@needs_llama
def test_f32_gguf_in_llama_cpp_computes_the_reference(tmp_path: Path) -> None:
    """The GGUF export (names, Q/K permutation, RoPE base, norm eps, tied head) is what llama.cpp
    needs to compute this model: its F32 logits agree with the float64 reference to float32
    precision at every position."""
    model = cl.generate_model(CONFIG, batch_size=1, seq_len=24, seed=3)
    got = llama_logits(model, "f32", tmp_path)
    want = reference_logits(model)
    assert got.shape == want.shape
    assert rel_l2(got, want) < 3e-6, rel_l2(got, want)  # 3.2e-7 measured
    assert (got.argmax(-1) == want.argmax(-1)).all()


@needs_llama
def test_the_check_sees_a_missing_rope_permutation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Companion: a GGUF written without the converter's Q/K row permutation rotates the wrong pairs
    in llama.cpp, and the comparison above sees it."""
    monkeypatch.setattr("celerinfer_lab.gguf_export._permute", lambda w, heads: w)
    model = cl.generate_model(CONFIG, batch_size=1, seq_len=24, seed=3)
    got = llama_logits(model, "f32", tmp_path)
    assert rel_l2(got, reference_logits(model)) > 1e-3


@needs_llama
@pytest.mark.parametrize("gguf_type, weights, bound", [("f16", "f32", 5e-3), ("q8_0", "q8", 5e-2)])
def test_reduced_gguf_types_stay_close(tmp_path: Path, gguf_type: str, weights: str, bound: float) -> None:
    """F16 and Q8_0 also round llama.cpp's activations (to f16, to Q8_0 blocks), so they are judged
    by how close they stay, not at float32 precision: F16 against the float32 model (9e-4 measured),
    Q8_0 against the reference on the same Q8_0 weights decoded (1.6e-2 measured: what rounding the
    activations to 8 bits costs, which this project's q8 set does not do)."""
    model = cl.generate_model(CONFIG, batch_size=1, seq_len=24, seed=3)
    got = llama_logits(model, gguf_type, tmp_path)
    assert 0 < rel_l2(got, reference_logits(model.as_format(weights))) < bound


@needs_llama
def test_llama_cpp_decode_is_greedy_on_its_logits(tmp_path: Path) -> None:
    model = cl.generate_model(CONFIG, batch_size=1, seq_len=8, seed=5)
    engine = LlamaCppModel(model, "f32", tmp_path, threads=1, decode=6, logits_all=True)
    try:
        engine.prefill()
        first = int(engine.logits()[-1].argmax())
        tokens, seconds, steps_ms = engine.decode(6)
    finally:
        engine.close()
    assert len(tokens) == 6 and tokens[0] == first and seconds > 0
    assert len(steps_ms) == 5 and all(ms > 0 for ms in steps_ms) and sum(steps_ms) <= seconds * 1e3
    want = greedy_generate(cl.ReferenceModel(model, dtype=torch.float64), model.input_ids, model.attention_mask, 6)
    assert tokens == [int(t) for t in want[0]]  # each step fed back the token it chose


@needs_llama
def test_llama_cpp_takes_every_core_by_default(tmp_path: Path) -> None:
    """As the C++ and PyTorch do; llama-cpp-python alone would take half (measured: minimind2 decode at
    42.6 tok/s on one of two cores, against 87 with both)."""
    model = cl.generate_model(CONFIG, batch_size=1, seq_len=4, seed=1)
    engine = LlamaCppModel(model, "f32", tmp_path)
    try:
        assert engine.llm.n_threads == os.cpu_count() and engine.llm.n_threads_batch == os.cpu_count()
    finally:
        engine.close()
    engine = LlamaCppModel(model, "f32", tmp_path, threads=1)
    try:
        assert engine.llm.n_threads == 1
    finally:
        engine.close()


@needs_llama
def test_bench_with_llama_cpp(tmp_path: Path) -> None:
    """The README's command on the tiny model: llama.cpp's rows beside PyTorch and the C++."""
    out = tmp_path / "bench.json"
    done = cli(
        "bench", "--batch-size", "1", "--seq-len", "8", "--repeat", "2", "--warmup", "1", "--decode", "4",
        "--engines", "torch,cpp,llama.cpp", "--llama-types", "f32,q8_0", "--threads", "1", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())["llama_cpp"]
    assert set(record) == {"f32", "q8_0"}
    assert record["f32"]["forward_ms"] > 0 and record["f32"]["decode_tok_s"] > 0
    assert record["f32"]["logits_rel_l2"] < 1e-5 and record["f32"]["top1_agreement"] == 1.0
    assert "llama.cpp (f32)" in done.stdout and "llama.cpp (q8_0)" in done.stdout


@needs_llama
def test_bench_save_keeps_llama_cpp_samples(tmp_path: Path) -> None:
    """The benchmark history gets llama.cpp's figures with every sample, beside the C++'s."""
    from celerinfer_lab.history import BenchStore

    store = tmp_path / "history.sqlite"
    done = cli(
        "bench", "--batch-size", "1", "--seq-len", "8", "--repeat", "3", "--warmup", "1", "--decode", "4",
        "--engines", "torch,cpp,llama.cpp", "--llama-types", "f32", "--threads", "1", "--no-standalone",
        "--save", "--store", str(store),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    samples = BenchStore(store).latest().samples
    # 3 steps per decode pass, 3 interleaved passes by default
    assert len(samples["llama.cpp prefill (f32)"]) == 3 and len(samples["llama.cpp decode step (f32)"]) == 3 * 3
    assert "cpp prefill (fast)" in samples


@pytest.mark.parametrize("amx", (True, False))
def test_a_build_with_amx_loads_without_extra_buffer_types(amx: bool) -> None:
    """ggml's AMX buffer type segfaults on our Q8_0 models (Intel Xeon with AMX; llama.cpp#20824):
    with a build that has AMX, models load with ``use_extra_bufts`` off, and the defaults come back
    after; a build without AMX keeps them. (On an AMX machine test_reduced_gguf_types_stay_close
    runs the real Q8_0 that crashed.)"""

    class Params:
        use_extra_bufts = True

    module = types.SimpleNamespace(llama_model_default_params=Params)
    info = b"CPU : AVX512 = 1 | " + (b"AMX_INT8 = 1 | " if amx else b"") + b"REPACK = 1 | "
    fake = types.SimpleNamespace(llama_cpp=module, llama_print_system_info=lambda: info)
    with llama_cpp_engine._without_amx(fake):
        assert module.llama_model_default_params().use_extra_bufts is not amx
    assert module.llama_model_default_params is Params


def test_without_llama_cpp_the_bench_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(llama_cpp_engine, "llama_cpp_missing", lambda: "llama-cpp-python is not installed")
    model = cl.generate_model(CONFIG, batch_size=1, seq_len=4, seed=1)
    with contextlib.ExitStack() as stack:
        got, engines = bench._measure_llama_cpp(
            model, ["f32"], tmp_path, 1, 0, 1, 0, "f32", np.zeros((1, 4, 256)), stack
        )
    assert got == {"skipped": "llama-cpp-python is not installed"} and engines == {}
    lines = bench._llama_cpp_lines({"llama_cpp": got, "kernels": ["fast"]}, bench.time_call(lambda: None, 0, 1))
    assert lines == ["llama.cpp: skipped — llama-cpp-python is not installed"]


def test_llama_cpp_runs_one_unpadded_sequence() -> None:
    with pytest.raises(UsageError, match="batch 2, need 1"):
        prompt_tokens(cl.generate_model(CONFIG, batch_size=2, seq_len=4, seed=1))
    padded = cl.generate_model(CONFIG, batch_size=1, seq_len=6, seed=1)
    padded.attention_mask[0, :2] = 0
    with pytest.raises(UsageError, match="padding"):
        prompt_tokens(padded)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engines", "cpp,llama.cpp"], "torch and cpp always run"),
        (["--engines", "torch,cpp,onnx"], "torch and cpp always run"),
        (["--engines", "torch,cpp,llama.cpp", "--llama-types", "f32,q4_0"], "q4_0"),
        (["--engines", "torch,cpp,llama.cpp", "--batch-size", "2"], "need 1 with the llama.cpp engine"),
    ],
)
def test_bench_engine_flags_are_checked(flags: list[str], message: str) -> None:
    done = cli("bench", "--repeat", "1", *flags)
    assert done.returncode == 2, done.stderr[-1000:]
    assert message in done.stderr and "Traceback" not in done.stderr
