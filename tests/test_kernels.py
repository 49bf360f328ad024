"""Every kernel of every kernel set on its own, against the float64 reference (llama.cpp's test-backend-ops).

Map: one check_<op>(eng, kernels, shape ...) per op runs the kernel on random inputs and the reference op
(celerinfer_lab/reference.py) in float32 and float64, and fails with the op, the set and the shape named;
the test_<op> functions parametrize the checks over shapes, 1 and 2 threads, and every name in
eng.kernel_sets (read from the compiled build, so a set you register is tested too). A bf16/q8 set's
linear gets the weight's stored form (quantize.py) and is judged against float64 on its exact decoding.
To add an op: its reference in torch (any dtype), a check_<op> ending in assert_matches, a parametrized test.
Tolerance (compare.py's rule): rel_l2(kernel vs f64) <= 10 * max(rel_l2(f32 ref vs f64), 2**-22), or
max_abs <= max(1e-7, 10 * 2**-22 * scale). Outputs start as NaN and end in a sentinel tail, the KV cache
holds decoys at every position a kernel must not read: unwritten, out-of-bounds and misplaced all fail.
The last tests prove the checks can fail: faulty builds and a broken registered set, each op named.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from celerinfer_lab.compare import ABS_FLOOR, FACTOR, MASKED_BELOW, MIN_FLOOR
from celerinfer_lab.faults import DERIVED, REDUCED
from celerinfer_lab.native import load_native
from celerinfer_lab.quantize import decode, encode
from celerinfer_lab.reference import repeat_kv, rmsnorm

GUARD = 16  # sentinel floats after every output buffer (as workspace.hpp's GuardedBuffer)
SENTINEL = np.uint32(0x7FC0DEAD)  # a quiet NaN no float op produces
BUILTIN = ("readable", "fast")


# ---- the engine and its kernel sets ------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def engine():
    """This project's C++, compiled once for the module (collection needs its kernel set names)."""
    return load_native()


def pytest_generate_tests(metafunc):
    if "kernels" in metafunc.fixturenames:
        sets = engine().kernel_sets
        if metafunc.function.__name__ not in ("test_linear", "test_linears_are_the_separate_linears"):
            # The bf16/q8 sets run their parent's rmsnorm, swiglu and attention (reduced.hpp derives
            # from ReadableKernels / FastKernels): tested there once; their linear is tested here, and
            # their whole forward by tests/test_reduced_kernels.py.
            sets = [k for k in sets if k not in REDUCED]
        metafunc.parametrize("kernels", sets)


@pytest.fixture(scope="module")
def eng():
    return engine()


@contextmanager
def threads(eng, n: int):
    """The pool at n threads for the block, then the count it had (the pool is process-wide)."""
    old = eng.threads
    eng.set_threads(n)
    try:
        yield
    finally:
        eng.set_threads(old)


def make_kernels(eng, kernels: str):
    return eng.make_kernels(kernels)  # nothing prepared: prepare_linear per weight


def point_taps(eng, taps, scores: np.ndarray, probs: np.ndarray) -> None:
    """taps.scores, taps.probs = scores, probs. Through C++: cppyy's setter for a float* member
    keeps the size of the first array assigned and refuses a larger one ("buffer too large")."""
    import cppyy

    if not hasattr(cppyy.gbl, "celerinfer_test_point_taps"):
        cppyy.cppdef(
            "template <class Taps> void celerinfer_test_point_taps(Taps& t, float* s, float* p) "
            "{ t.scores = s; t.probs = p; }"
        )
    cppyy.gbl.celerinfer_test_point_taps[eng.ns.AttentionTaps](taps, scores, probs)


def call(what: str, fn, *args):
    """A kernel call; a C++ exception (a failed check, a guard) fails the test with the case named."""
    try:
        return fn(*args)
    except Exception as exc:  # cppyy raises the C++ type
        raise AssertionError(f"{what}: C++ raised {type(exc).__name__}: {exc}") from None


# ---- buffers -----------------------------------------------------------------------------------
def out_buffer(n: int) -> np.ndarray:
    """n NaNs (an entry the kernel does not write stays NaN), then GUARD sentinels."""
    buf = np.full(n + GUARD, np.nan, np.float32)
    buf[n:].view(np.uint32)[:] = SENTINEL
    return buf


def check_guard(what: str, buf: np.ndarray, n: int) -> None:
    hit = np.flatnonzero(buf[n:].view(np.uint32) != SENTINEL)
    assert hit.size == 0, f"{what}: wrote past the end of its output ({n} floats), at +{hit.tolist()}"


def check_unchanged(what: str, **inputs: tuple[np.ndarray, np.ndarray]) -> None:
    for name, (now, before) in inputs.items():
        assert np.array_equal(now, before, equal_nan=True), f"{what}: modified its input {name}"


def rms(*arrays: np.ndarray) -> float:
    values = [np.sqrt(np.mean(a[np.isfinite(a)].astype(np.float64) ** 2)) for a in arrays if np.isfinite(a).any()]
    return float(max(values, default=0.0))


def rel_l2(y: np.ndarray, x: np.ndarray) -> float:
    nx, nd = float(np.linalg.norm(x)), float(np.linalg.norm(y - x))
    return nd / nx if nx > 0 else (0.0 if nd == 0 else math.inf)


def assert_matches(
    what: str, y: np.ndarray, ref32: np.ndarray, ref64: np.ndarray, scale: float, compared: np.ndarray | None = None
) -> None:
    """The kernel's y against the float64 reference, compare.py's tolerance from the float32 one.

    No NaN/Inf where the reference is finite, anywhere (padding included); masked values (-inf, or
    <= -1e8 from the padding mask) masked on both sides; values compared where ``compared`` (a
    boolean array broadcastable to y, default everywhere) holds."""
    y, r32, x = (np.asarray(a, np.float64) for a in (y, ref32, ref64))
    assert y.shape == x.shape, f"{what}: shape {y.shape} != reference {x.shape}"
    nonfinite = np.isfinite(x) & ~np.isfinite(y)
    if nonfinite.any():
        first = tuple(int(i) for i in np.argwhere(nonfinite)[0])
        raise AssertionError(
            f"{what}: {int(nonfinite.sum())} NaN/Inf where the reference is finite (first at {first}: {y[first]})"
        )
    with np.errstate(invalid="ignore"):
        x_masked, y_masked = x <= MASKED_BELOW, y <= MASKED_BELOW  # a NaN is masked on neither side
    mismatch = x_masked != y_masked
    if mismatch.any():
        first = tuple(int(i) for i in np.argwhere(mismatch)[0])
        raise AssertionError(
            f"{what}: {int(mismatch.sum())} values masked on one side only "
            f"(first at {first}: kernel {y[first]}, reference {x[first]})"
        )
    live = ~x_masked
    if compared is not None:
        live &= np.broadcast_to(compared, y.shape)
    xs, ys, rs = x[live], y[live], r32[live]
    floor = rel_l2(rs, xs)
    tol = FACTOR * max(floor, MIN_FLOOR)
    abs_tol = max(ABS_FLOOR, FACTOR * MIN_FLOOR * scale)
    e = rel_l2(ys, xs)
    max_abs = float(np.abs(ys - xs).max(initial=0.0))
    assert not (e > tol and max_abs > abs_tol), (
        f"{what}: rel_l2 {e:.2e} > tol {tol:.2e} (float32 floor {floor:.2e}) and max_abs {max_abs:.2e} > {abs_tol:.2e}"
    )


def refs(fn, *arrays: np.ndarray):
    """fn over torch tensors, in float32 and in float64: (ref32, ref64) as numpy."""
    return tuple(
        fn(*(torch.from_numpy(np.asarray(a)).to(dt) for a in arrays)).numpy() for dt in (torch.float32, torch.float64)
    )


# ---- linear: y [rows, out] = x [rows, in] . W [out, in]^T ----------------------------------------
def check_linear(eng, kernels: str, rows: int, in_: int, out: int, seed: int = 0) -> None:
    what = f"linear [{kernels}] rows={rows} in={in_} out={out} threads={eng.threads}"
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, in_), np.float32)
    W = (rng.standard_normal((out, in_), np.float32) / np.sqrt(in_)).astype(np.float32)
    ks = make_kernels(eng, kernels)
    fmt = eng.kernel_format(kernels)
    if fmt == "f32":
        stored = W
        call(what, ks.prepare_linear, W, out, in_)
    else:  # a bf16/q8 set reads the stored form; the reference runs on its exact decoding
        stored = encode(W, fmt)
        W = decode(stored, fmt, W.shape)
        enum = {"bf16": eng.ns.WeightFormat.BF16, "q8": eng.ns.WeightFormat.Q8}[fmt]
        call(what, ks.prepare_linear_stored, W, out, in_, enum, stored, int(stored.nbytes))
    x0, W0, stored0 = x.copy(), W.copy(), stored.copy()
    y = out_buffer(rows * out)
    call(what, ks.linear, y, x, W, rows, in_, out)
    check_guard(what, y, rows * out)
    check_unchanged(what, x=(x, x0), W=(W, W0), stored=(stored, stored0))
    r32, r64 = refs(F.linear, x, W)
    assert_matches(what, y[: rows * out].reshape(rows, out), r32, r64, rms(x, r64))


# ---- rmsnorm: y = w * x / sqrt(mean(x^2) + eps), per row of n -------------------------------------
def check_rmsnorm(eng, kernels: str, rows: int, n: int, scale: float = 1.0, eps: float = 1e-5, seed: int = 0) -> None:
    """scale: the inputs' size; at 1e-3, mean(x^2) is eps's size and where eps goes shows."""
    what = f"rmsnorm [{kernels}] rows={rows} n={n} scale={scale:g} eps={eps:g} threads={eng.threads}"
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((rows, n))).astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    x0, w0 = x.copy(), w.copy()
    ks = make_kernels(eng, kernels)
    y = out_buffer(rows * n)
    call(what, ks.rmsnorm, y, x, w, rows, n, float(eps))
    check_guard(what, y, rows * n)
    check_unchanged(what, x=(x, x0), w=(w, w0))
    r32, r64 = refs(lambda a, b: rmsnorm(a, b, eps), x, w)
    assert_matches(what, y[: rows * n].reshape(rows, n), r32, r64, rms(r64))


# ---- swiglu: act = silu(gate) * up, elementwise ----------------------------------------------------
def check_swiglu(eng, kernels: str, n: int, seed: int = 0) -> None:
    what = f"swiglu [{kernels}] n={n} threads={eng.threads}"
    rng = np.random.default_rng(seed)
    gate = (3.0 * rng.standard_normal(n)).astype(np.float32)
    up = rng.standard_normal(n, np.float32)
    extremes = np.array([-100, -88, -87, -20, -0.0, 0, 20, 88, 89, 100], np.float32)  # exp's clamps
    gate[: min(n, extremes.size)] = extremes[:n]
    gate0, up0 = gate.copy(), up.copy()
    ks = make_kernels(eng, kernels)
    act = out_buffer(n)
    call(what, ks.swiglu, act, gate, up, n)
    check_guard(what, act, n)
    check_unchanged(what, gate=(gate, gate0), up=(up, up0))
    r32, r64 = refs(lambda g, u: F.silu(g) * u, gate, up)
    assert_matches(what, act[:n], r32, r64, rms(r64, up))


# ---- store_kv + attention --------------------------------------------------------------------------
def key_mask(B: int, P: int, padding: str, rng) -> np.ndarray:
    """[B, P] of 0/1. left: row b > 0 starts with a few padded keys; holes: random zeros; none."""
    mask = np.ones((B, P), np.int64)
    for b in range(1, B):
        if padding == "left":
            mask[b, : min(3 if b == 1 else 1, P - 1)] = 0
        elif padding == "holes":
            mask[b, rng.random(P) < 0.3] = 0
    return mask


def ref_attention(q, k, v, mask, T: int, n_rep: int):
    """reference.py's attention math: q [B, T, h, hd], k/v [B, P, kvh, hd], mask [B, P] ->
    (scores [B, h, T, P], probs [B, h, T, P], context [B, T, h*hd])."""
    B, _, h, hd = q.shape
    qh = q.transpose(1, 2)
    kh, vh = repeat_kv(k, n_rep).transpose(1, 2), repeat_kv(v, n_rep).transpose(1, 2)
    scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(hd)
    causal = torch.zeros_like(scores[0, 0])  # -inf above the diagonal of the new block
    causal[:, -T:] = torch.full((T, T), float("-inf"), dtype=scores.dtype).triu(1)
    scores = scores + causal + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e9
    probs = F.softmax(scores, dim=-1)
    return scores, probs, (probs @ vh).transpose(1, 2).reshape(B, T, h * hd)


def check_attention(
    eng,
    kernels: str,
    B: int,
    T: int,
    P: int,
    max_len: int,
    heads: int,
    kv_heads: int,
    hd: int,
    padding: str = "left",
    seed: int = 0,
) -> None:
    """T new queries at positions P-T ... P-1 over P keys in a cache of max_len, in layer 1 of 2.

    The P-T past keys are stored first (a call of their own, as a decode does), then the T new ones,
    into caches that hold decoys in layer 0 and at every position: reading the wrong layer or a
    position past P shows. attention runs without taps, then with them: the context must be
    bit-identical, and the recorded scores and probs must match the reference."""
    ns = eng.ns
    what = (
        f"attention [{kernels}] B={B} T={T} P={P} max_len={max_len} heads={heads} kv_heads={kv_heads} hd={hd} "
        f"padding={padding} threads={eng.threads}"
    )
    cfg = ns.Config()
    cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim = heads * hd, 2, heads, kv_heads, hd
    cfg.vocab, cfg.intermediate, cfg.max_pos = 16, 16, max_len
    # Room for T new tokens per call, or the P-T past ones when more: as a decode's workspace, sized
    # for its prompt, then fed one token at a time.
    ws_T = max(T, P - T)
    ws = call(what, ns.Workspace, cfg, B, ws_T, max_len)
    ks = make_kernels(eng, kernels)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, heads, hd), np.float32)
    k = rng.standard_normal((B, P, kv_heads, hd), np.float32)
    v = rng.standard_normal((B, P, kv_heads, hd), np.float32)
    mask = key_mask(B, P, padding, rng)
    q0, mask0 = q.copy(), mask.copy()

    def dims(t: int, p: int):
        return ns.AttnDims(B, t, p, max_len, heads, kv_heads, hd)

    for layer in (0, 1):  # decoys, 100x the real values, at every position (ws_T at a time)
        for start in range(0, max_len, ws_T):
            t = min(ws_T, max_len - start)
            decoy_k, decoy_v = (100 * rng.standard_normal((B, t, kv_heads, hd), np.float32) for _ in range(2))
            call(what + " (store_kv)", ks.store_kv, layer, decoy_k, decoy_v, dims(t, start + t), ws)
    past = P - T
    if past:
        call(
            what + " (store_kv)",
            ks.store_kv,
            1,
            np.ascontiguousarray(k[:, :past]),
            np.ascontiguousarray(v[:, :past]),
            dims(past, past),
            ws,
        )
    call(
        what + " (store_kv)",
        ks.store_kv,
        1,
        np.ascontiguousarray(k[:, past:]),
        np.ascontiguousarray(v[:, past:]),
        dims(T, P),
        ws,
    )
    call(what + " (store_kv, workspace guards)", ws.check_guards)

    n = B * T * heads * hd
    plain = out_buffer(n)
    call(what, ks.attention, plain, q, 1, mask, dims(T, P), ws, ns.AttentionTaps())
    call(what + " (workspace guards)", ws.check_guards)
    check_guard(what, plain, n)

    taps = ns.AttentionTaps()
    rec_scores, rec_probs = (np.full(B * heads * T * P, np.nan, np.float32) for _ in range(2))
    point_taps(eng, taps, rec_scores, rec_probs)
    tapped = out_buffer(n)
    call(what + " (taps)", ks.attention, tapped, q, 1, mask, dims(T, P), ws, taps)
    call(what + " (taps, workspace guards)", ws.check_guards)
    check_guard(what + " (taps)", tapped, n)
    check_unchanged(what, q=(q, q0), mask=(mask, mask0))

    (s32, p32, c32), (s64, p64, c64) = (
        ref_attention(*(torch.from_numpy(a).to(dt) for a in (q, k, v)), torch.from_numpy(mask), T, heads // kv_heads)
        for dt in (torch.float32, torch.float64)
    )
    real = mask[:, P - T :].astype(bool)  # [B, T]: the queries at real positions
    context = plain[:n].reshape(B, T, heads * hd)
    assert_matches(what, context, c32.numpy(), c64.numpy(), rms(c64.numpy(), v), real[:, :, None])
    differ = int((tapped[:n].view(np.uint32) != plain[:n].view(np.uint32)).sum())
    assert differ == 0, f"{what}: with taps set, {differ} of {n} context values differ from the run without taps"

    if not taps.wrote_scores.load() or not taps.wrote_probs.load():
        if kernels in BUILTIN:
            raise AssertionError(f"{what}: the attention taps were never called")
        pytest.skip(f"{kernels}: its attention does not call the taps (its scores and probs are unobserved)")
    shape = (B, heads, T, P)
    # Scores on every row (masked keys by class: a padded query's row is all masked); probs on real
    # queries only: a fully masked float32 row is quantised to -1e9's grid, noise in every implementation.
    assert_matches(
        what.replace("attention", "attention.scores", 1), rec_scores.reshape(shape), s32.numpy(), s64.numpy(), rms(q, k)
    )
    assert_matches(
        what.replace("attention", "attention.probs", 1),
        rec_probs.reshape(shape),
        p32.numpy(),
        p64.numpy(),
        1.0 / P,
        real[:, None, :, None],
    )


# ---- the cases -----------------------------------------------------------------------------------
# rows: 1, below / at / between / above the fast GEMM's 6-row tile; in, out: below, at and between
# multiples of 16 (the fast GEMM's panel width); 50 x 80 x 100 is large enough to be threaded.
LINEAR_ROWS = (1, 5, 6, 7, 13, 50)
# 72, 80, 17, 33: not multiples of 32, so q8 rows end in a zero-padded block.
LINEAR_SIZES = ((64, 64), (72, 100), (80, 17), (17, 33), (16, 1))


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("in_,out", LINEAR_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("rows", LINEAR_ROWS)
def test_linear(eng, kernels, rows, in_, out, n_threads):
    with threads(eng, n_threads):
        check_linear(eng, kernels, rows, in_, out)


# forward.hpp's linears: q, k and v (gate and up) of one x, one job on the fast sets at decode
# (rows <= 4), one call each elsewhere. Its outputs must be bitwise those of the separate linears:
# the same panels, the same sums; only the dispatch is shared.
def _prepared(eng, kernels: str, Ws: list[np.ndarray]) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
    """A kernel set with each of Ws prepared (a reduced set: its stored form): the set, the weights
    it reads, the stored forms (kept alive with the set)."""
    ks = make_kernels(eng, kernels)
    fmt = eng.kernel_format(kernels)
    read, keep = [], []
    for W in Ws:
        out, in_ = W.shape
        if fmt == "f32":
            call("prepare", ks.prepare_linear, W, out, in_)
            read.append(W)
        else:
            stored = encode(W, fmt)
            read.append(decode(stored, fmt, W.shape))
            keep.append(stored)
            enum = {"bf16": eng.ns.WeightFormat.BF16, "q8": eng.ns.WeightFormat.Q8}[fmt]
            call("prepare", ks.prepare_linear_stored, read[-1], out, in_, enum, stored, int(stored.nbytes))
    return ks, read, keep


def _run_linears(eng, ks, x: np.ndarray, Ws: list[np.ndarray]) -> list[np.ndarray]:
    import cppyy

    if not hasattr(cppyy.gbl, "celerinfer_test_linears"):
        cppyy.cppdef(
            "template <class KS, class LO> void celerinfer_test_linears(const KS& ks, const float* x, int rows, "
            "int in, float* y, const float* const* Ws, const int* outs, int n) {"
            " std::vector<LO> o; size_t at = 0;"
            " for (int i = 0; i < n; ++i) { o.push_back(LO{y + at, Ws[i], outs[i]}); at += size_t(rows) * outs[i]; }"
            " ks.linears(x, rows, in, o.data(), n); }"
        )
    rows, in_ = x.shape
    outs = np.array([W.shape[0] for W in Ws], np.int32)
    total = rows * int(outs.sum())
    y = out_buffer(total)
    ptrs = cppyy.gbl.std.vector["const float*"]()
    for W in Ws:
        ptrs.push_back(W)
    fn = cppyy.gbl.celerinfer_test_linears[eng.ns.KernelSet, eng.ns.LinearOut]
    call("linears", fn, ks, x, rows, in_, y, ptrs.data(), outs, len(Ws))
    check_guard("linears", y, total)
    parts, at = [], 0
    for out in outs:
        parts.append(y[at : at + rows * out].reshape(rows, out))
        at += rows * out
    return parts


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("rows", (1, 2, 4, 5, 10, 47, 48))
@pytest.mark.parametrize("shapes", (((96, 64), (32, 64), (32, 64)), ((200, 80), (200, 80)), ((17, 33),)), ids=str)
def test_linears_are_the_separate_linears(eng, kernels, rows, shapes, n_threads):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, shapes[0][1])).astype(np.float32)
    Ws = [(rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for s in shapes]
    with threads(eng, n_threads):
        ks, read, _keep = _prepared(eng, kernels, Ws)
        fused = _run_linears(eng, ks, x, read)
        for W, y in zip(read, fused):
            alone = out_buffer(rows * W.shape[0])
            call("linear", ks.linear, alone, x, W, rows, x.shape[1], W.shape[0])
            assert np.array_equal(y, alone[: y.size].reshape(y.shape)), f"{kernels}: {W.shape} differs from linear"


def test_the_linears_check_sees_a_swapped_output(eng):
    """The companion: outputs handed to the wrong matrix differ from the separate linears, bitwise."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    Ws = [(rng.standard_normal((32, 64)) / 8).astype(np.float32) for _ in range(2)]
    ks, read, _keep = _prepared(eng, "fast", Ws)
    fused = _run_linears(eng, ks, x, read[::-1])
    alone = out_buffer(32)
    ks.linear(alone, x, read[0], 1, 64, 32)
    assert not np.array_equal(fused[0], alone[:32].reshape(1, 32))


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("scale", (1.0, 1e-3))
@pytest.mark.parametrize("n", (1, 17, 64, 72, 515))
@pytest.mark.parametrize("rows", (1, 5, 13))
def test_rmsnorm(eng, kernels, rows, n, scale, n_threads):
    with threads(eng, n_threads):
        check_rmsnorm(eng, kernels, rows, n, scale)


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("n", (1, 15, 16, 17, 1000, 65536, 65553, 200003))  # > 65536: the fast set's threaded path
def test_swiglu(eng, kernels, n, n_threads):
    with threads(eng, n_threads):
        check_swiglu(eng, kernels, n)


# (B, T, P, max_len, heads, kv_heads, hd, padding)
ATTENTION_CASES = (
    # every head size, GQA (8 heads on 2 kv heads) and not (4 on 4): a prefill and a decode step
    *[(2, 17, 17, 17, h, g, hd, "left") for hd in (64, 72, 80, 96, 128) for h, g in ((8, 2), (4, 4))],
    *[(2, 1, 17, 40, h, g, hd, "left") for hd in (64, 72, 80, 96, 128) for h, g in ((8, 2), (4, 4))],
    # decode, one new token over 0 ... 39 cached keys: around the fast set's 16-key blocks, up to a full cache
    *[(2, 1, P, 40, 8, 2, 72, "left") for P in (1, 2, 15, 16, 18, 33, 40)],
    (1, 1, 40, 40, 4, 4, 64, "none"),
    (4, 1, 40, 40, 8, 2, 128, "left"),  # large enough to be threaded
    # prefill T == P: one token, below / at / above the 8-query and 16-key blocks
    *[(2, T, T, T, 4, 4, 80, "left") for T in (1, 5, 8, 9, 16, 33)],
    (3, 24, 24, 32, 8, 2, 64, "holes"),
    (1, 12, 12, 12, 4, 2, 96, "none"),
    # several new tokens over a cache (a chunked prefill): queries start mid-block
    (2, 9, 25, 40, 8, 2, 72, "left"),
    (2, 3, 20, 20, 4, 4, 64, "holes"),
)


@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize(
    "B,T,P,max_len,heads,kv_heads,hd,padding",
    ATTENTION_CASES,
    ids=[f"B{c[0]}-T{c[1]}-P{c[2]}-L{c[3]}-h{c[4]}-kv{c[5]}-hd{c[6]}-{c[7]}" for c in ATTENTION_CASES],
)
def test_attention(eng, kernels, B, T, P, max_len, heads, kv_heads, hd, padding, n_threads):
    with threads(eng, n_threads):
        check_attention(eng, kernels, B, T, P, max_len, heads, kv_heads, hd, padding)


def test_threads_restored(eng):
    before = eng.threads
    other = 2 if before == 1 else 1  # a count other than the current one, or a restore that never happens passes
    with threads(eng, other):
        assert eng.threads == other
    assert eng.threads == before


# ---- the checks can fail ---------------------------------------------------------------------------
# (fault from celerinfer_lab/faults.py, the sets it breaks, the op that must be named, a check that shows it).
# Each costs a compile (2-5 s); every check was run against the whole catalogue once by hand: each fault in
# a kernel was caught in its own sets only, the faults outside the kernels (RoPE, residuals, MoE) in none.
FAULT_CASES = (
    ("fast_attention_scale", ("fast",), "attention", lambda e, k: check_attention(e, k, 2, 1, 17, 40, 8, 2, 72)),
    ("causal_mask_missing", ("readable",), "attention", lambda e, k: check_attention(e, k, 2, 9, 9, 9, 4, 4, 64)),
    ("gqa_modulo", ("readable", "fast"), "attention", lambda e, k: check_attention(e, k, 2, 5, 5, 5, 8, 2, 64)),
    # at inputs of eps's size; at 1.0 the error is eps/2 relative, 2x the tolerance: caught, but only just
    ("rmsnorm_eps_outside_sqrt", ("readable",), "rmsnorm", lambda e, k: check_rmsnorm(e, k, 5, 72, 1e-3)),
)


@pytest.mark.parametrize("fault,broken,op,check", FAULT_CASES, ids=[c[0] for c in FAULT_CASES])
def test_a_faulty_kernel_fails_its_check(fault, broken, op, check):
    faulty = load_native(fault=fault)
    broken = tuple(broken) + tuple(k for b in broken for k in DERIVED.get(b, ()))  # bf16/q8 sets share the op
    for kernels in faulty.kernel_sets:
        if kernels in broken:
            with pytest.raises(AssertionError, match=rf"^{op}(\.\w+)? \[{kernels}\] "):
                check(faulty, kernels)
        else:
            check(faulty, kernels)  # a set whose code the fault leaves alone passes


# A user's set, registered beside the built-in ones: it must be collected and its flaws caught.
BROKEN_SET = r"""
struct BrokenKernels : ReadableKernels {
    // The last row is never written (it stays NaN).
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        CELERINFER_NS::linear(y, x, W, rows > 1 ? rows - 1 : rows, in, out);
    }
    // One value written past the end.
    void swiglu(float* act, const float* gate, const float* up, size_t n) const {
        CELERINFER_NS::swiglu(act, gate, up, n);
        act[n] = 0.0f;
    }
};
CELERINFER_REGISTER_KERNELS(BrokenKernels, "broken_for_test");
"""


def test_a_registered_set_is_tested_and_its_flaws_caught():
    broken = load_native(extra_source=BROKEN_SET)
    assert broken.kernel_sets[-1] == "broken_for_test" and set(BUILTIN) <= set(broken.kernel_sets)
    with pytest.raises(AssertionError, match=r"^linear \[broken_for_test\] rows=7 .* NaN/Inf where the reference"):
        check_linear(broken, "broken_for_test", 7, 72, 100)
    with pytest.raises(AssertionError, match=r"^swiglu \[broken_for_test\] n=17 .*wrote past the end"):
        check_swiglu(broken, "broken_for_test", 17)
    check_rmsnorm(broken, "broken_for_test", 5, 72)  # inherited from ReadableKernels: passes
    check_attention(broken, "broken_for_test", 2, 1, 17, 40, 8, 2, 72)
