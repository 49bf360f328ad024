"""The fast kernels and the KV cache: equal to the reference at every trace point, decode equals
the full forward, greedy generation gives the same tokens on every side."""

import numpy as np
import pytest
import torch
from conftest import small_model
from hypothesis import HealthCheck, given, settings

from celerinfer_lab import compare, load_native, reference_forward, trace_points
from celerinfer_lab.compare import compare_decode
from celerinfer_lab.reference import ReferenceModel, decode_steps, greedy_generate
from celerinfer_lab.testing import model_cases


@pytest.fixture(scope="module")
def fast():
    return load_native(kernels="fast")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=model_cases())
def test_fast_kernels_equal_reference_at_every_trace_point(fast, model):
    report = compare(model, fast)
    assert report.agrees, report.to_text()
    # Without a trace the fused attention runs: its logits must agree as well.
    real = model.attention_mask.astype(bool)
    cpp, ref = fast.forward(model).logits[real], reference_forward(model).logits[real]
    assert np.linalg.norm(cpp - ref) / np.linalg.norm(ref) <= 1e-5


@pytest.mark.parametrize("kernels", ["readable", "fast"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(padding="mixed"),
        dict(use_moe=True, num_experts=3, num_experts_per_tok=2, n_shared_experts=1, qk_norm=True, seq_len=20),
    ],
)
def test_traced_runs_execute_the_untraced_kernels(fast, kernels, variant):
    """Observe, never substitute: traced and untraced logits are bit-identical, prefill and decode."""
    variant = {"batch_size": 2, "seq_len": 9, **variant}
    model = small_model(**variant)
    prepared = fast.prepare(model, kernels)
    plain, traced = prepared.forward(), prepared.forward(trace=True)
    assert np.array_equal(plain.logits, traced.logits)
    assert "model.layers.0.self_attn.scores" in traced.trace and "model.layers.0.self_attn.probs" in traced.trace
    feed = np.random.default_rng(0).integers(0, model.config.vocab_size, (model.batch_size, 3))
    untraced_steps, traced_steps = prepared.decode_steps(feed), prepared.decode_steps(feed, trace=True)
    for a, b in zip(untraced_steps, traced_steps, strict=True):
        assert np.array_equal(a.logits, b.logits)


@pytest.mark.parametrize("kernels", ["readable", "fast"])
def test_teacher_forcing_reaches_inside_the_attention(fast, kernels):
    """A teacher's probs replace the kernel's own (fused or not): uniform probabilities over the
    causal keys make each context row the mean of the values it sees."""
    model = small_model(batch_size=1, seq_len=6, num_attention_heads=4, num_key_value_heads=4)
    prepared = fast.prepare(model, kernels)
    trace = prepared.forward(trace=True).trace
    S = model.seq_len
    uniform = np.tril(np.ones((S, S), np.float32)) / np.arange(1, S + 1, dtype=np.float32)[:, None]
    probs = np.broadcast_to(uniform, trace["model.layers.0.self_attn.probs"].shape).copy()
    forced = prepared.forward(teacher={"model.layers.0.self_attn.probs": probs}).trace
    v = trace["model.layers.0.self_attn.v_proj"].reshape(1, S, 4, -1)
    expected = (np.cumsum(v, axis=1) / np.arange(1, S + 1)[None, :, None, None]).reshape(1, S, -1)
    np.testing.assert_allclose(forced["model.layers.0.self_attn.context"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trace["model.layers.0.self_attn.context"], expected, atol=1e-3)  # the teacher mattered
    np.testing.assert_array_equal(forced["model.layers.0.self_attn.probs"], trace["model.layers.0.self_attn.probs"])


def test_fast_judged_against_readable(fast):
    report = compare(small_model(batch_size=2, seq_len=20, qk_norm=True), fast, kernels="fast", baseline="readable")
    assert report.agrees, report.to_text()
    assert "fast" in report.subject


@pytest.mark.parametrize("kernels", ["readable", "fast"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(
            use_moe=True,
            num_experts=3,
            num_experts_per_tok=2,
            n_shared_experts=1,
            qk_norm=True,
            rope_pairing="interleaved",
        ),
    ],
)
def test_kv_cache_decode_equals_full_forward(fast, kernels, variant):
    model = small_model(batch_size=2, seq_len=12, padding="left", **variant)
    prompt, rest = model.input_ids[:, :7], model.input_ids[:, 7:]
    full = reference_forward(model).logits
    real = model.attention_mask.astype(bool)
    steps = fast.prepare(model, kernels).decode_steps(rest, prompt, model.attention_mask[:, :7])
    incremental = np.concatenate([r.logits for r in steps], axis=1)
    ref_steps = decode_steps(ReferenceModel(model), prompt, model.attention_mask[:, :7], rest)
    ref_incremental = np.concatenate([lg for lg, _ in ref_steps], axis=1)
    np.testing.assert_allclose(incremental[real], full[real], rtol=0, atol=2e-5)
    np.testing.assert_allclose(ref_incremental[real], full[real], rtol=0, atol=2e-5)


def test_decode_traces_have_the_contract_shapes(fast):
    model = small_model(batch_size=2, seq_len=5)
    results = fast.prepare(model, "fast").decode_steps(np.ones((2, 3), np.int64), trace=True)
    assert len(results) == 4
    for past, r in zip([0, 5, 6, 7], results):
        T = 5 if past == 0 else 1
        points = trace_points(model.config, 2, T, past)
        assert list(r.trace) == [p.name for p in points]
        assert all(r.trace[p.name].shape == p.shape for p in points)
    assert results[2].trace["model.layers.0.self_attn.scores"].shape == (2, 8, 1, 7)


@pytest.mark.parametrize("kernels", ["readable", "fast"])
def test_greedy_generation_same_tokens(fast, kernels):
    model = small_model(batch_size=3, seq_len=6, padding="mixed", vocab_size=96)
    expected = greedy_generate(ReferenceModel(model), model.input_ids, model.attention_mask, 12)
    tokens = fast.prepare(model, kernels).generate(12)
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.shape == (3, 12)


def test_debugger_compares_decode_steps(fast):
    model = small_model(batch_size=2, seq_len=6)
    reports = compare_decode(model, fast, steps=3, kernels="fast")
    assert len(reports) == 4 and all(r.agrees for r in reports), [r.summary() for r in reports]
    assert reports[2].points[-1].shape == (2, 1, 128)
    broken = compare_decode(model, load_native(fault="rope_pairing_swapped"), steps=2)
    assert all(r.culprit is not None and r.culprit.name == "model.layers.0.self_attn.rope_q" for r in broken)
    assert "RoPE pairing swapped" in broken[1].diagnosis


def test_threads_setting(fast):
    model = small_model(batch_size=2, seq_len=40, hidden_size=128, intermediate_size=512)
    base, default = fast.forward(model, kernels="fast").logits, fast.threads
    fast.set_threads(1)
    try:
        assert fast.threads == 1
        np.testing.assert_allclose(fast.forward(model, kernels="fast").logits, base, rtol=0, atol=1e-5)
    finally:
        fast.set_threads(default)
    with pytest.raises(Exception, match="threads must be 1..256"):
        fast.set_threads(0)


def test_thread_count_changes_under_a_prepared_model(fast):
    """Workspaces outlive set_threads(): more threads than when they were made, then fewer (idle
    workers beyond the count), mid-decode too. Each output element is summed by one thread in the
    same order whatever the split, so the logits stay bit-identical."""
    model = small_model(batch_size=2, seq_len=40, hidden_size=128, intermediate_size=512)
    prepared, default = fast.prepare(model, kernels="fast"), fast.threads
    base, tokens = prepared.forward().logits, prepared.generate(6)
    try:
        for threads in (default + 4, default + 1, 1, default):
            fast.set_threads(threads)
            np.testing.assert_array_equal(prepared.forward().logits, base, err_msg=f"{threads} threads")
        switched = prepared.generate(6, after_prefill=lambda: fast.set_threads(default + 3))
        np.testing.assert_array_equal(switched, tokens)
    finally:
        fast.set_threads(default)


def test_calls_from_python_threads(fast):
    """The pool takes one job at a time (a call made while it is busy runs on its own thread),
    and one prepared model serialises its calls: concurrent callers get the serial answers."""
    from concurrent.futures import ThreadPoolExecutor

    models = [small_model(batch_size=2, seq_len=24, hidden_size=128, intermediate_size=512, seed=s) for s in (1, 2)]
    prepared = [fast.prepare(m, kernels="fast") for m in models]
    expected = [p.forward().logits for p in prepared]
    jobs = [i % 2 for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: prepared[i].forward().logits, jobs))
    for i, logits in zip(jobs, results):
        np.testing.assert_array_equal(logits, expected[i])


def test_float64_decode_is_the_oracle():
    model = small_model(batch_size=1, seq_len=4)
    out = decode_steps(ReferenceModel(model, torch.float64), model.input_ids, model.attention_mask, np.array([[3, 5]]))
    assert out[0][0].dtype == np.float64 and len(out) == 3


def test_decode_attention_at_long_context(fast):
    """The decode path of the fused attention (fewer than 8 new tokens) against the oracle after a
    300-token prompt (the blocked path): 300 keys and more, GQA 4:1 on one kv head, head_dim 70 (one
    context pass of five vectors, the last partial), left padding. Its companion is the catalogue fault
    fast_decode_context_tail (a context row's partial last vector not stored in this path): tests/test_faults.py shows
    compare_decode localizing it to layer 0's context at step 1, the prefill agreeing."""
    model = small_model(
        batch_size=2,
        seq_len=300,
        padding="left",
        hidden_size=280,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=304,
        intermediate_size=32,
        num_hidden_layers=1,
        vocab_size=64,
    )
    reports = compare_decode(model, fast, steps=1, kernels="fast")
    assert len(reports) == 2 and all(r.agrees for r in reports), [r.summary() for r in reports]
    assert reports[1].point("model.layers.0.self_attn.scores").shape == (2, 4, 1, 301)  # 1 query, 301 keys


def test_short_prompts_take_the_decode_attention_with_a_full_cache(fast):
    """A prompt of fewer than 8 tokens runs the decode attention (the tiny default model's path):
    score rows of 1 to 5 keys softmaxed side by side (softmax_short_rows), and value rows read as
    whole vectors even at head_dim 10. The cache is exactly the prompt long, so the last value row's
    whole-vector read reaches the cache buffer's guard tail (NaN sentinels): those lanes must never
    reach a stored context value. Left padding puts masked keys in the short rows. (That the read
    stays inside the buffer is not something this test can see: reads leave the guard alone.)"""
    model = small_model(
        batch_size=2, seq_len=5, padding="left", hidden_size=40, num_attention_heads=4, num_key_value_heads=2
    )
    assert model.config.head_dim == 10
    report = compare(model, fast, kernels="fast")
    assert report.agrees, report.to_text()
    untraced = fast.forward(model, kernels="fast").logits
    assert np.isfinite(untraced).all()
    real = model.attention_mask.astype(bool)
    ref = reference_forward(model).logits[real]
    assert np.linalg.norm(untraced[real] - ref) / np.linalg.norm(ref) <= 1e-5


def test_gemm_rows_have_the_same_bits_whatever_the_row_count(fast):
    """fast::linear cuts the rows into 8-row tiles, a short tail (1 to 3 rows) evened out with the
    tile before it (10 rows: 5 + 5, not 8 + 2). Whichever tile computes a row, each output is the
    same sum over k in the same order: row r of an N-row call has the bits of the same row computed
    alone, for every N up to 29 (each tail shape), and agrees with a float64 product. 72 outputs
    run a panel triple and two panels (the last partial), 104 two triples and one panel (partial)."""
    ns = fast.ns
    rng = np.random.default_rng(3)
    for out in (72, 104):
        check_row_bits(ns, rng.standard_normal((out, 64)).astype(np.float32), rng)


def check_row_bits(ns, W, rng):
    out = W.shape[0]
    packed = ns.fast.pack(W, out, 64)
    for rows in range(1, 30):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        y = np.full((rows, out), np.nan, np.float32)
        ns.fast.linear(y, x, packed, rows)
        for r in range(rows):
            alone = np.full((1, out), np.nan, np.float32)
            ns.fast.linear(alone, np.ascontiguousarray(x[r : r + 1]), packed, 1)
            assert np.array_equal(y[r], alone[0]), (rows, r)
        np.testing.assert_allclose(y, x.astype(np.float64) @ W.T.astype(np.float64), rtol=1e-4, atol=1e-4)
