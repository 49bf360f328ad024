"""The bf16 and q8 kernel sets (cpp/include/celerinfer/reduced.hpp) against the precision-matched oracle.

Map: the op (linear on stored weights, every row count the GEMV and GEMM paths take, sizes that are
not multiples of 32 or 16) against float64 on the exact decoding; the whole forward through
compare() over dense / qk_norm / MoE with shared experts / tied and untied heads, and decode steps,
with no divergence at any trace point, and random configs over the property grid (hypothesis) for
bf16 and q8; the companion showing why the oracle must see the same
weights (the float32 oracle flags the quantization itself); binding and preparing errors, each named;
the Python conversions (a float32 model quantized in memory, a q8 model run by fast). The planted
bugs (faults.py's q8_neighbour_block_scale, q8_int8_read_as_uint8, reduced_gemv_odd_activation)
are localized by tests/test_faults.py.
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import numpy as np
import pytest
from conftest import small_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import assert_matches, call, check_guard, check_linear, make_kernels, out_buffer, refs, threads

from celerinfer_lab.compare import compare, compare_decode
from celerinfer_lab.errors import NativeError, UsageError
from celerinfer_lab.quantize import decode, encode
from celerinfer_lab.report import build_report
from celerinfer_lab.runs import kernel_runs, reference_runs
from celerinfer_lab.testing import model_cases

REDUCED = ("readable-bf16", "readable-q8", "bf16", "q8")
FORMAT = {"readable-bf16": "bf16", "readable-q8": "q8", "bf16": "bf16", "q8": "q8"}


# ---- the op: linear on stored weights ----------------------------------------------------------
# rows 1 ... 4: the GEMV (decode); 5 and up: the GEMM's 6-row tiles and their tails. in: below, at and
# past one q8 block (33, 40, 100: a zero-padded last block), odd (the GEMV's odd-k tail); out: panel tails.
@pytest.mark.parametrize("n_threads", (1, 2))
@pytest.mark.parametrize("in_,out", ((40, 23), (33, 17), (100, 50), (64, 48)), ids=str)
@pytest.mark.parametrize("rows", (1, 2, 3, 4, 5, 7, 13))
@pytest.mark.parametrize("kernels", REDUCED)
def test_linear_on_stored_weights(native, kernels, rows, in_, out, n_threads):
    with threads(native, n_threads):
        check_linear(native, kernels, rows, in_, out, seed=rows)


def test_a_weight_without_stored_form_runs_in_float32(native):
    """The router has no stored form in any model: a reduced set runs it from the float32 array."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((3, 40), np.float32), rng.standard_normal((17, 40), np.float32)
    for kernels in REDUCED:
        ks = native.make_kernels(kernels)
        ks.prepare_linear(W, 17, 40)
        y = np.full((3, 17), np.nan, np.float32)
        ks.linear(y, x, W, 3, 40, 17)
        np.testing.assert_allclose(y, x.astype(np.float64) @ W.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_the_kernel_sets_declare_their_formats(native):
    assert {k: native.kernel_format(k) for k in native.kernel_sets} == {
        "readable": "f32",
        "fast": "f32",
        **FORMAT,
    }
    assert "avx512f=" in native.cpu and "widening:" in native.cpu


# ---- the bf16 layout: k pairs interleaved, the same sums in the same order ----------------------
# The bf16 panels hold w[k] and w[k+1] of an output in one 32-bit word (reduced.hpp's PackedReduced).
# The layout changed, the arithmetic did not, so the kernel's output is bitwise what its documented
# order gives: the GEMV (rows <= 4) sums k, k+1, k+2, k+3 in four fused chains (a tail k into the
# first), then (a0 + a1) + (a2 + a3); the GEMM (prefill) one fused chain over k (fast::gemm_tile's).
# Emulated in float64: a bf16 weight times a float32 activation is exact in float64 (8 + 24 bits), and
# so is each chain's sum here (checked), so one rounding to float32 is the fused multiply-add's.
def _reduced_linear(native, fmt: str, x: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The `fmt` ("bf16" or "q8") set's linear of x on W's stored form: (y, the exact decoded weights)."""
    rows, in_ = x.shape
    out = W.shape[0]
    stored = encode(W, fmt)
    Wd = decode(stored, fmt, W.shape)
    ks = make_kernels(native, fmt)
    what = f"{fmt} linear rows={rows} in={in_} out={out}"
    weight_format = {"bf16": native.ns.WeightFormat.BF16, "q8": native.ns.WeightFormat.Q8}[fmt]
    call(what, ks.prepare_linear_stored, Wd, out, in_, weight_format, stored, int(stored.nbytes))
    y = out_buffer(rows * out)
    call(what, ks.linear, y, np.ascontiguousarray(x), Wd, rows, in_, out)
    check_guard(what, y, rows * out)
    return y[: rows * out].reshape(rows, out), Wd


def _fused_chains(x: np.ndarray, Wd: np.ndarray, chains: int) -> np.ndarray:
    """y[r, o] summed as the kernels do: `chains` fused chains over k (k % chains; a tail past the last
    whole group of `chains` goes to chain 0), then combined pairwise ((a0 + a1) + (a2 + a3))."""
    rows, in_ = x.shape
    acc = np.zeros((chains, rows, len(Wd)), np.float32)
    whole = in_ // chains * chains
    for k in range(in_):
        c = k % chains if k < whole else 0
        product = np.outer(x[:, k].astype(np.float64), Wd[:, k].astype(np.float64))  # exact
        exact = acc[c].astype(np.float64) + product
        assert np.all(exact - acc[c].astype(np.float64) == product), "a chain's sum is not exact in float64"
        acc[c] = exact.astype(np.float32)
    if chains == 1:
        return acc[0]
    return (acc[0] + acc[1]) + (acc[2] + acc[3])


@pytest.mark.parametrize("in_,out", ((64, 48), (101, 33), (7, 17), (2, 16)), ids=str)
@pytest.mark.parametrize("rows", (1, 2, 3, 4, 5, 7))
def test_the_bf16_linear_sums_in_its_documented_order(native, rows, in_, out):
    rng = np.random.default_rng(rows * 100 + in_)
    x = rng.standard_normal((rows, in_)).astype(np.float32)
    W = (rng.standard_normal((out, in_)) / np.sqrt(in_)).astype(np.float32)
    with threads(native, 2):
        y, Wd = _reduced_linear(native, "bf16", x, W)
    expected = _fused_chains(x, Wd, 4 if rows <= 4 else 1)
    assert np.array_equal(y.view(np.uint32), expected.view(np.uint32)), (
        f"rows={rows}: {np.count_nonzero(y != expected)} of {y.size} outputs differ from the documented order"
    )


def test_the_order_check_sees_a_different_order(native):
    """The companion: the GEMV's output is not what one chain (or unfused products) would give, so the
    check above would flag a kernel that summed in another order or read another k's weight."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 101)).astype(np.float32)
    W = (rng.standard_normal((33, 101)) / 10).astype(np.float32)
    with threads(native, 2):
        y, Wd = _reduced_linear(native, "bf16", x, W)
    assert not np.array_equal(y, _fused_chains(x, Wd, 1))
    swapped = Wd.copy()
    swapped[:, [10, 11]] = swapped[:, [11, 10]]  # an interleaving bug: k and k + 1 exchanged
    assert not np.array_equal(y, _fused_chains(x, swapped, 4))


# ---- the q8 GEMV on VNNI (rows <= 4): integer digits of the activations, judged by float64 -------
# reduced.hpp's claim, as a bound on |y - exact| per output (_err_bound): the activations rounded to
# 2^(e-31) (2^e > the block's max|x|) times the block's |w|; each block's sum rounded a few times in
# float32 (2^-22 |block sum|, and lo's conversion: 2^(e-25) max|w|); the float32 accumulation over the
# blocks (2^-24 |partial sum| per block); a subnormal ulp per block. The float32 GEMV's own bound
# has 2^-24 |partial sum| per *weight*: this one is tighter.
def _err_bound(x: np.ndarray, Wd: np.ndarray) -> np.ndarray:
    blocks = -(-x.shape[1] // 32)
    pad = ((0, 0), (0, blocks * 32 - x.shape[1]))
    xb = np.pad(x.astype(np.float64), pad).reshape(len(x), blocks, 32)
    wb = np.pad(Wd.astype(np.float64), pad).reshape(len(Wd), blocks, 32)
    sums = np.einsum("rbk,obk->rob", xb, wb)  # exact block sums [rows, out, blocks]
    xmax = np.abs(xb).max(axis=2)
    e = np.maximum(np.floor(np.log2(np.where(xmax > 0, xmax, 1.0))) + 1, -119)  # [rows, blocks]
    digits = (2.0 ** (e - 31)) @ np.abs(wb).sum(axis=2).T
    lo = (2.0 ** (e - 25)) @ np.abs(wb).max(axis=2).T
    rounding = 2.0**-22 * np.abs(sums).sum(axis=2) + 2.0**-24 * np.abs(np.cumsum(sums, axis=2)).sum(axis=2)
    return digits + lo + rounding + blocks * 2.0**-149


def _activations(kind: str, rows: int, in_: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, in_)).astype(np.float32)
    if kind == "outlier":  # one activation 1000x the rest, in every row (_weights zero it for half the outputs)
        x[:, in_ // 3] = 1000.0
    elif kind == "zeros":  # an all-zero row, and a zero block in the others
        x[0] = 0.0
        x[:, 32:64] = 0.0
    elif kind == "subnormal":  # every value below float32's smallest normal
        x *= np.float32(1e-39)
    elif kind == "huge":
        x *= np.float32(1e30)
    elif kind == "mixed":  # blocks of very different sizes in one row
        x *= np.float32(10.0) ** rng.integers(-30, 30, (rows, 1 + (in_ - 1) // 32)).repeat(32, axis=1)[:, :in_]
    return x


@pytest.mark.parametrize("kind", ("random", "outlier", "zeros", "subnormal", "huge", "mixed"))
@pytest.mark.parametrize("in_,out", ((512, 48), (100, 23), (70, 33), (66, 16)), ids=str)
@pytest.mark.parametrize("rows", (1, 2))  # the rows the VNNI GEMV takes (kVnniRows); 3, 4 widen
def test_q8_gemv_is_the_float32_product_of_the_decoded_weights(native, kind, rows, in_, out):
    rng = np.random.default_rng(rows * 1000 + in_)
    x = _activations(kind, rows, in_, rng)
    W = (rng.standard_normal((out, in_)) / np.sqrt(in_)).astype(np.float32)
    W[::2, in_ // 3] = 0.0  # an outlier's weight zero: the other activations' rounding is all that shows
    with threads(native, 2):
        y, Wd = _reduced_linear(native, "q8", x, W)
    r64 = x.astype(np.float64) @ Wd.T.astype(np.float64)
    err = np.abs(y - r64)
    assert (err <= _err_bound(x, Wd)).all(), (
        f"{kind}: error {err.max():.3g} over the bound at {np.argmax(err - _err_bound(x, Wd))}"
    )
    if kind not in ("subnormal",):  # the usual tolerance too (float32's own product flushes there)
        r32, r64t = refs(lambda a, b: a @ b.T, x, Wd)
        assert_matches(f"q8 GEMV {kind}", y, r32, r64t, float(np.sqrt(np.mean(r64**2))))


def test_the_gemv_bound_catches_24_bit_activations(native):
    """The companion: the same product with each activation rounded to 2^(e-23) (three int8 digits
    instead of four) breaks the bound where the outlier's weight is zero, so the bound would flag a
    GEMV that kept one digit fewer (and one that rounded the activations to float16 or bf16)."""
    rng = np.random.default_rng(3)
    x = _activations("outlier", 2, 512, rng)
    W = (rng.standard_normal((48, 512)) / np.sqrt(512)).astype(np.float32)
    W[::2, 512 // 3] = 0.0
    Wd = decode(encode(W, "q8"), "q8", W.shape).astype(np.float64)
    blocks = x.astype(np.float64).reshape(2, 16, 32)
    e = np.floor(np.log2(np.abs(blocks).max(axis=2, keepdims=True))) + 1  # 2^e > max|x|
    unit = 2.0 ** (e - 23)  # digits 2^(e-23) apart: |X| < 2^23, three int8 digits
    x24 = (np.round(blocks / unit) * unit).reshape(2, 512)
    err = np.abs(x24 @ Wd.T - x.astype(np.float64) @ Wd.T)
    assert (err > _err_bound(x, Wd.astype(np.float32))).any()


def test_the_q8_gemv_path_is_reported(native):
    """cpu_report says which q8 GEMV runs; on a CPU with VNNI it is the vpdpbusd one."""
    vnni = "avx512_vnni=yes" in native.cpu
    assert ("q8 decode GEMV: vpdpbusd" in native.cpu) == (vnni and bool(native.ns.use_vnni()))
    assert "q8 decode GEMV:" in native.cpu
    # the decode GEMVs prefetch their weights on Intel CPUs only (cpu.hpp reads the vendor with cpuid)
    intel = "vendor_id\t: GenuineIntel" in Path("/proc/cpuinfo").read_text()
    assert bool(native.ns.cpu_features().intel) == intel
    assert native.ns.gemv_prefetch_bytes() == (4096 if intel else 0)
    assert ("decode GEMV weights prefetched 4 KB ahead" in native.cpu) == intel


@pytest.mark.parametrize("case", ("dense-tied", "moe-shared", "qk_norm-untied"))
def test_q8_decode_steps_agree(native, case):
    """compare_decode over three steps, batch 1 and 2 (the GEMV's 1 and 2 rows) on each config."""
    for batch in (1, 2):
        model = small_model(batch_size=batch, seq_len=4, **SHAPE, **CASES[case])
        for report in compare_decode(model, native, steps=3, kernels="q8"):
            assert report.agrees, f"{case} batch {batch}:\n{report.to_text()}"


# ---- the whole forward: no divergence at any trace point -----------------------------------------
# hidden 40: rows of 40 weights end in a padded q8 block; 4 heads on 2 kv heads.
SHAPE = dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72)
CASES = {
    "dense-tied": {},
    "qk_norm-untied": dict(qk_norm=True, tie_word_embeddings=False),
    "moe-shared": dict(
        use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=24
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_every_set_agrees_with_the_precision_matched_oracle(native, case):
    model = small_model(batch_size=2, seq_len=6, padding="left", **SHAPE, **CASES[case])
    comparison = compare(model, native, kernels="all")
    for kernels in REDUCED:
        report = comparison[kernels]
        assert report.agrees, f"{kernels} on {case}:\n{report.to_text()}"
        fmt = FORMAT[kernels]
        assert report.meta["model"].weight_format == fmt
        assert f"oracle: float64 on the decoded {fmt} weights" in report.summary()


# Never flags a correct kernel: random configs over the property grid (testing.model_cases: sizes
# below, at and past one q8 block, GQA, MoE, YaRN, qk_norm, both pairings, padding) and each fast
# reduced set at every trace point. The long run: python scripts/tolerance_margin.py N --kernels q8.
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=model_cases(), kernels=st.sampled_from(["bf16", "q8"]))
def test_random_configs_agree_with_the_precision_matched_oracle(native, model, kernels):
    report = compare(model, native, kernels=kernels, precision="off")
    assert report.agrees, f"{kernels}:\n{report.to_text()}"


@pytest.mark.parametrize("kernels", REDUCED)
def test_decode_steps_agree(native, kernels):
    model = small_model(batch_size=2, seq_len=5, **SHAPE, tie_word_embeddings=False)
    for report in compare_decode(model, native, steps=1, kernels=kernels):
        assert report.agrees, report.to_text()


def test_the_float32_oracle_would_flag_the_quantization(native):
    """The companion: judged against float64 on the float32 weights, correct q8 kernels 'diverge' at
    the first linear. That is why compare() gives the oracle the kernels' own weights."""
    model = small_model(**SHAPE)
    runs = reference_runs(model)  # the oracle on the float32 weights
    runs.update(kernel_runs(model.as_format("q8"), native, "q8", runs["oracle"]))
    report = build_report(runs, model.config, model.attention_mask, "C++ (q8)")
    assert not report.agrees and report.first_divergent is not None
    assert report.first_divergent.name == "model.embed_tokens"  # the tied embedding is stored in q8 too


# ---- binding and preparing: named errors ---------------------------------------------------------
def _weights(native, model):
    """A ModelWeights for the q8 form of model, every float32 array bound (kept alive on it)."""
    from celerinfer_lab.native import _native_config

    q8 = model.as_format("q8")
    cpp = native.ns.ModelWeights(_native_config(native.ns, q8.config))
    kept = {name: np.ascontiguousarray(a, np.float32) for name, a in q8.weights.items()}
    kept["rope.cos"], kept["rope.sin"] = (np.ascontiguousarray(a, np.float32) for a in (q8.rope_cos, q8.rope_sin))
    for name, array in kept.items():
        cpp.bind(name, array, list(array.shape))
    cpp._kept = kept
    return cpp, q8


def test_bind_stored_errors_name_the_problem(native):
    model = small_model(**SHAPE)
    cpp, q8 = _weights(native, model)
    Q8, BF16 = native.ns.WeightFormat.Q8, native.ns.WeightFormat.BF16
    wq = "model.layers.0.self_attn.q_proj.weight"
    data = q8.stored[wq]
    with pytest.raises(Exception, match="bytes, a q8 \\[40, 40\\] matrix has 2720"):
        cpp.bind_stored(wq, Q8, data, int(data.nbytes) - 1)
    with pytest.raises(Exception, match="float32 in every model"):
        cpp.bind_stored("model.layers.0.input_layernorm.weight", Q8, data, int(data.nbytes))
    with pytest.raises(Exception, match="not a reduced format"):
        cpp.bind_stored(wq, native.ns.WeightFormat.F32, data, int(data.nbytes))
    cpp.bind_stored(wq, Q8, data, int(data.nbytes))
    bf16 = encode(model.weights["model.layers.0.self_attn.k_proj.weight"], "bf16")
    with pytest.raises(Exception, match="is bf16, the model's other stored weights are q8"):
        cpp.bind_stored("model.layers.0.self_attn.k_proj.weight", BF16, bf16, int(bf16.nbytes))
    with pytest.raises(Exception, match="missing the q8 stored form of tensor 'model.embed_tokens.weight'"):
        cpp.check_complete()

    untied, _ = _weights(native, small_model(**SHAPE, tie_word_embeddings=False))
    embed = encode(model.weights["model.embed_tokens.weight"], "q8")
    with pytest.raises(Exception, match="stored reduced only when tie_word_embeddings is true"):
        untied.bind_stored("model.embed_tokens.weight", Q8, embed, int(embed.nbytes))


def test_a_reduced_set_refuses_a_model_without_its_stored_weights(native):
    cpp, _ = _weights(native, small_model(**SHAPE))  # float32 arrays only: no stored form bound
    cpp.check_complete()
    with pytest.raises(NativeError, match="kernel set 'q8' reads q8 weights; this model stores f32"):
        native.make_kernels("q8", cpp)
    native.make_kernels("fast", cpp)  # a float32 set runs it


def test_a_bad_stored_array_is_a_python_error(native):
    model = small_model(**SHAPE).as_format("q8")
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = dict(model.stored, **{name: model.stored[name][:, :-1]})
    broken = type(model)(**{**model.__dict__, "stored": bad})
    with pytest.raises(NativeError, match=f"stored form of '{name}'"):
        native.prepare(broken, "q8")


# ---- Python: the conversions users run -----------------------------------------------------------
def test_prepare_converts_to_the_sets_format(native):
    model = small_model(**SHAPE)
    q8 = native.prepare(model, "q8")
    assert (q8.weight_format, q8.model.weight_format, model.weight_format) == ("q8", "q8", "f32")
    fast_on_q8 = native.prepare(q8.model, "fast")  # a q8 model's float32 decoding
    assert fast_on_q8.model.weight_format == "f32" and not fast_on_q8.model.stored
    a, b = q8.forward().logits, fast_on_q8.forward().logits
    assert np.abs(a - b).max() < 1e-4  # the same weights, two kernel sets


# ---- the two questions, labelled apart ---------------------------------------------------------------
def test_compare_answers_both_questions_and_labels_each(native):
    """On a float32 model, compare(kernels="q8") judges the kernel against float64 on the q8 weights
    AND says what q8 costs against the float32 model, in its own section; neither leaks into the other."""
    model = small_model()
    report = compare(model, native, kernels="q8")
    text = report.summary()
    assert report.agrees and text.startswith("kernel correctness (weights: q8 (Q8_0), oracle: float64 on the decoded")
    cost = report.meta["precision_cost"]
    assert "precision cost (float32 model vs its q8 weights, both in the float64 reference)" in text
    assert cost.kl > 1e-7 and report.logits.kl_mean < 1e-9  # the quantization costs; the kernel adds nothing
    assert not cost.layer_kl and not cost.splice_kl  # the summary mode: no attribution forwards
    full = compare(model, native, kernels="bf16", precision="full").meta["precision_cost"]
    assert full.layer_kl and full.splice_kl and full.fmt == "bf16"
    assert "precision_cost" not in compare(model, native, kernels="q8", precision="off").meta
    assert "precision_cost" not in compare(model.as_format("q8"), native, kernels="q8").meta  # no float32 original
    assert "precision_cost" not in compare(model, native, kernels="fast").meta
    with pytest.raises(UsageError, match="precision='some'"):
        compare(model, native, kernels="q8", precision="some")


def test_the_reduced_sets_compile_on_first_use(cpp_copy):
    """Under cling the readable and bf16/q8 sets are declared at load and compiled when first asked
    for (a load compiles a fraction); a set that does not compile is a NativeCompileError naming it, raised
    then, and the other sets still run."""
    from conftest import edit_file

    from celerinfer_lab.native import NativeCompileError, load_native

    broken = """template <class T> struct BrokenQ8 : Q8Kernels {
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const { T::no_such_member(); }
};
using BrokenQ8Int = BrokenQ8<int>;  // its error shows only when the template is instantiated
CELERINFER_BUILTIN_KERNELS(BrokenQ8Int, "q8");"""
    edit_file(cpp_copy / "include/celerinfer/kernel_set.hpp", 'CELERINFER_BUILTIN_KERNELS(Q8Kernels, "q8");', broken)
    engine = load_native(cpp_copy)  # loads: nothing instantiates BrokenQ8Int until its set is asked for
    assert engine.kernel_format("q8") == "q8" and "q8" in engine.kernel_sets
    pending = engine.ns.kernel_set_pending_type
    assert pending("q8") == "BrokenQ8Int" and pending("fast") == ""
    assert pending("readable") == "ReadableKernels"  # readable waits too: most commands never run it
    model = small_model(**SHAPE)
    with pytest.raises(NativeCompileError, match="kernel set 'q8' \\(BrokenQ8Int\\) .* did not compile"):
        engine.prepare(model, "q8")
    assert engine.prepare(model, "bf16").forward().logits.shape == (2, 7, model.config.vocab_size)
    assert pending("bf16") == ""  # compiled once, then ready


def _smaps_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping holding ``address`` (None: not Linux, or not found)."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return None
    fields: dict[str, str] | None = None
    for line in text.splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: its address range
            if fields is not None:
                return fields
            lo, hi = (int(v, 16) for v in head.split("-"))
            fields = {} if lo <= address < hi else None
        elif fields is not None:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_huge_page_arena_returns_its_blocks(native):
    """Buffers below 2 MB are cut from shared 16 x 2 MB blocks one after another; a block goes back
    when its last buffer does, except the current one, kept for the next buffers."""
    import cppyy.ll

    arena = native.ns.fast.HugePageArena.instance()
    block = int(native.ns.fast.HugePageArena.kBlock)
    held = arena.blocks()
    size = 1 << 20  # 1 MB each: 16 fill a block
    buffers = [arena.allocate(size) for _ in range(40)]
    addresses = [int(cppyy.ll.cast["uintptr_t"](b)) for b in buffers]
    assert all(a % 64 == 0 for a in addresses) and len(set(addresses)) == 40
    assert arena.blocks() >= held + 40 * size // block  # new blocks as each filled up
    for b in buffers:
        arena.deallocate(b)
    assert arena.blocks() <= held + 1  # all given back but the current one


def test_packed_weights_sit_on_huge_pages(native):
    """Packed weights of 2 MB and more are 2 MB aligned and asked onto huge pages (packing.hpp's
    HugePageAllocator: decode streams them, and 4 KB pages' TLB misses bound that stream); smaller
    ones are 64-byte aligned, cut from shared blocks that asked too (HugePageArena: every q8 matrix of
    minimind2 is below 2 MB). Where the kernel grants transparent huge pages, the mappings have them."""
    import cppyy.ll

    ns = native.ns
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1024, 768), dtype=np.float32)  # 3 MB packed
    P = ns.fast.pack(big, 1024, 768)
    view = P.data.data()
    address = int(cppyy.ll.cast["uintptr_t"](view))
    assert address % (2 << 20) == 0
    sources = [rng.standard_normal((16, 32), dtype=np.float32) for _ in range(2)]
    smalls = [ns.fast.pack(source, 16, 32) for source in sources]  # two cuts of one shared block
    small_address, second_address = (int(cppyy.ll.cast["uintptr_t"](m.data.data())) for m in smalls)
    assert small_address % 64 == 0 and second_address % 64 == 0 and second_address != small_address
    for source, packed_small in zip(sources, smalls):  # neither cut overwrote the other
        values = packed_small.data.data()
        values.reshape((16 * 32,))
        assert np.array_equal(np.asarray(values).reshape(32, 16).T, source)
    # the packed values are the matrix's, k-major in panels of 16 (unchanged by the allocator)
    view.reshape((1024 * 768,))
    packed = np.asarray(view).reshape(64, 768, 16)
    assert np.array_equal(packed.transpose(0, 2, 1).reshape(1024, 768), big)
    thp_setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp_setting.read_text() if thp_setting.exists() else "[never]"
    if "[never]" in thp:
        pytest.skip("transparent huge pages are off on this machine: the alignment is all there is to check")
    # the advice is in the mapping's flags (hg), whether or not the kernel had free huge pages to give
    for where in (address, small_address):
        fields = _smaps_of(where)
        assert fields is not None and "hg" in fields["VmFlags"].split()
    if "[madvise]" in thp:  # the companion: a fresh mapping that did not ask has no such flag, and the check sees it
        # (an mmap of its own: numpy madvises large arrays, and malloc may reuse a range numpy advised)
        plain = mmap.mmap(-1, 3 << 20)
        plain_address = ctypes.addressof(ctypes.c_char.from_buffer(plain))
        assert "hg" not in (_smaps_of(plain_address) or {"VmFlags": ""})["VmFlags"].split()
