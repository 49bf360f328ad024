"""Finding the divergence: metrics, float64-oracle tolerances, isolation, culprit, diagnosis, plots."""

import math

import numpy as np
import pytest
from conftest import edit_file, small_model
from matplotlib.figure import Figure

from celerinfer_lab.compare import build_report, compare, errors, kl_per_token, reference_runs, run_all
from celerinfer_lab.diagnose import diagnose
from celerinfer_lab.native import load_native
from celerinfer_lab.trace import trace_points


def test_metric_definitions():
    x = np.array([1.0, -2.0, 3.0, 0.5])
    e = errors(x, x)
    assert (e.max_abs, e.rel_l2, e.cosine, e.sqnr_db) == (0.0, 0.0, 1.0, math.inf)
    e = errors(x, -x)
    assert e.cosine == pytest.approx(-1) and e.rel_l2 == pytest.approx(2) and e.max_abs == pytest.approx(6)
    e = errors(x, 2 * x)
    assert e.rel_l2 == pytest.approx(1) and e.sqnr_db == pytest.approx(0) and e.cosine == pytest.approx(1)
    e = errors(x, x + np.array([0, 0, 0, 1e-3]))
    assert e.sqnr_db == pytest.approx(10 * math.log10((x @ x) / 1e-6))
    scores = np.array([0.5, -np.inf, -1e9 + 3])
    assert errors(scores, np.array([0.5, -np.inf, -1e9])).rel_l2 == 0  # masked alike: compared by class
    e = errors(scores, np.array([0.5, 0.2, -1e9]))
    assert e.class_mismatch == 1 and e.rel_l2 == math.inf
    assert errors(x, np.array([1.0, np.nan, 3.0, 0.5])).nan == 1


def test_kl_per_token():
    logits = np.random.default_rng(0).normal(size=(2, 3, 7))
    np.testing.assert_allclose(kl_per_token(logits, logits), 0, atol=1e-15)
    p = np.array([0.25, 0.75])
    kl = kl_per_token(np.log(p)[None], np.log(np.array([0.5, 0.5]))[None])
    assert kl[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))


@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(
            qk_norm=True,
            use_moe=True,
            num_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            tie_word_embeddings=False,
        ),
    ],
)
def test_correct_build_agrees_with_floors(native, variant):
    model = small_model(batch_size=3, seq_len=9, padding="mixed", **variant)
    report = compare(model, native)
    assert report.agrees and report.culprit is None and report.diagnosis is None, report.to_text()
    assert report.logits.top1_agreement == 1.0 and report.logits.kl_max < 1e-9
    _assert_tolerances_follow_the_documented_rule(report, model)
    assert "all" in report.summary() and "agree" in report.summary()


# The documented rule (compare.py's docstring), written out here with literal numbers so that a
# change to FACTOR, MIN_FLOOR or where the floor comes from fails these tests:
#   floor = ||ref32 - oracle|| / ||oracle|| over the real token positions (masked scores left out)
#   tol   = 10 * max(floor, 2**-22)
RULE_FACTOR, RULE_MIN_FLOOR = 10.0, 2.0**-22


def _real_rows(array, token_axis, mask):
    return np.moveaxis(array, token_axis, 1)[mask.astype(bool)].astype(np.float64)


def _expected_tol(runs, point, mask, ref="ref32"):
    x, r = (_real_rows(runs[k][point.name], point.token_axis, mask) for k in ("oracle", ref))
    live = np.isfinite(x) & (x > -1e8)  # masked scores (-inf, or -1e9 padding) are compared by class
    floor = np.linalg.norm(r[live] - x[live]) / np.linalg.norm(x[live])
    return RULE_FACTOR * max(floor, RULE_MIN_FLOOR)


def _assert_tolerances_follow_the_documented_rule(report, model):
    mask = model.attention_mask
    checked = 0
    for point in trace_points(model.config, *mask.shape):
        if point.dtype == "int64":  # routing indices: compared by count, no rel_l2 tolerance
            continue
        p = report.point(point.name)
        assert p.tol == pytest.approx(_expected_tol(report.runs, point, mask), rel=1e-9, abs=0), point.name
        assert p.own_tol == pytest.approx(_expected_tol(report.runs, point, mask, "ref32_own"), rel=1e-9, abs=0), (
            point.name
        )
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("floor", ["measured", "zero: MIN_FLOOR applies"])
def test_planted_error_just_above_the_tolerance_diverges_just_below_does_not(floor):
    """The subject is the float32 reference itself (no C++ needed), except at one point, where its
    value is the oracle's plus an error of rel_l2 = k * tol, tol computed here from the documented
    rule: k = 1.02 must diverge, k = 0.98 must not."""
    model = small_model(batch_size=2, seq_len=7, padding="mixed")
    mask = model.attention_mask
    name = "model.layers.0.mlp.down_proj"
    point = next(p for p in trace_points(model.config, *mask.shape) if p.name == name)
    runs = reference_runs(model)
    runs.update(cpp=dict(runs["ref32"]), cpp_own=dict(runs["ref32_own"]))
    report = build_report(runs, model.config, mask)
    assert report.agrees, report.to_text()
    _assert_tolerances_follow_the_documented_rule(report, model)
    if floor.startswith("zero"):
        runs["ref32"][name] = runs["oracle"][name].astype(np.float64).copy()
    tol = _expected_tol(runs, point, mask)
    assert (tol == RULE_FACTOR * RULE_MIN_FLOOR) == floor.startswith("zero")
    x = runs["oracle"][name].astype(np.float64)
    b, s = np.argwhere(mask)[0]  # a real token position
    for k, diverges in ((1.02, True), (0.98, False)):
        planted = x.copy()
        planted[b, s, 0] += k * tol * np.linalg.norm(_real_rows(x, point.token_axis, mask))
        report = build_report({**runs, "cpp": {**runs["cpp"], name: planted}}, model.config, mask)
        p = report.point(name)
        assert p.rel_l2 == pytest.approx(k * tol, rel=1e-6)
        assert p.diverges is diverges, (
            f"k={k}: rel_l2 {p.rel_l2:.4e}, tol {p.tol:.4e}, abs {p.max_abs:.2e} vs {p.abs_tol:.2e}"
        )


def test_isolation_separates_two_bugs(cpp_copy):
    """Two bugs: the first is the culprit; the second still shows its own error, the rest propagate."""
    edit_file(
        cpp_copy / "include/celerinfer/forward.hpp",
        "lm_head_kept(K, logits, x, m.head(), B, S, L, H, c.vocab);",
        "lm_head_kept(K, logits, x, m.head(), B, S, L, H, c.vocab);\n    for (size_t i = 0; i < size_t(B) * L * c.vocab; ++i) logits[i] *= 1.5f;",
    )
    report = compare(small_model(), load_native(cpp_copy, fault="silu_as_gelu"))
    assert report.culprit.name == "model.layers.0.mlp.act"
    assert report.point("lm_head").label == "own error"
    assert report.point("model.layers.1.self_attn.q_proj").label in ("propagated", "amplified")
    assert report.point("model.layers.0.mlp.down_proj").label in ("propagated", "amplified")


@pytest.mark.parametrize(
    "old,new,culprit,words",
    [
        (
            "y[size_t(r) * out + o] = dot(",
            "y[size_t(r) * out + o] = -dot(",
            "model.layers.0.self_attn.q_proj",
            "sign flip",
        ),
        (
            "y[size_t(r) * out + o] = dot(",
            "y[size_t(r) * out + o] = 2.0f * dot(",
            "model.layers.0.self_attn.q_proj",
            "~ 2",
        ),
        (
            "float* out = context + ((size_t(b) * d.S + i) * d.heads + h) * d.hd;",
            "float* out = context + ((size_t(b) * d.S + i) * d.heads + (h + 1) % d.heads) * d.hd;",
            "model.layers.0.self_attn.context",
            "heads permuted",
        ),
        (
            "const float* row = table + size_t(ids[t]) * hidden;",
            "const float* row = table + size_t(ids[t > 0 ? t - 1 : 0]) * hidden;",
            "model.embed_tokens",
            "shifted by one position",
        ),
        (
            "float s = dot(qi, kj, d.hd) / scale;",
            "float s = dot(qi, kj, d.hd) / scale * (i >= 3 ? 1.5f : 1.0f);",
            "model.layers.0.self_attn.scores",
            "from position 3 on",
        ),
    ],
)
def test_diagnoses_of_a_users_own_bugs(cpp_copy, old, new, culprit, words):
    edited = 0
    for header in ("ops.hpp", "forward.hpp"):
        path = cpp_copy / "include/celerinfer" / header
        if old in path.read_text():
            edit_file(path, old, new)
            edited += 1
    assert edited == 1, f"{old!r} is not in the headers"
    report = compare(small_model(batch_size=2, seq_len=8), load_native(cpp_copy), kernels="readable")  # edits: ops.hpp
    assert report.culprit.name == culprit, report.to_text()
    assert words in (report.diagnosis or ""), report.diagnosis


def _forged(native, name, transform):
    """A report whose isolated C++ value at `name` is transform(oracle value): a pattern in isolation."""
    model = small_model(batch_size=2, seq_len=8, padding="left")
    runs = run_all(model, native)
    runs["cpp_own"][name] = transform(runs["oracle"][name].astype(np.float32))
    report = build_report(runs, model.config, model.attention_mask)
    report.meta["model"] = model
    return report


def test_pair_permutation_and_padded_key_patterns(native):
    hd = 8
    perm = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=-1).reshape(-1)
    report = _forged(native, "model.layers.0.self_attn.rope_k", lambda v: v[..., perm])
    assert report.culprit.name == "model.layers.0.self_attn.rope_k"
    assert "pairs inside each head permuted" in diagnose(report)

    model_mask = small_model(batch_size=2, seq_len=8, padding="left").attention_mask

    def pad_bug(v):  # a softmax that leaks probability onto padded keys
        v = v.copy()
        leak = (model_mask == 0)[:, None, None, :] & (
            np.arange(8)[None, None, None, :] <= np.arange(8)[None, None, :, None]
        )
        v[np.broadcast_to(leak, v.shape)] += 0.01
        return v

    report = _forged(native, "model.layers.0.self_attn.probs", pad_bug)
    assert report.culprit.name == "model.layers.0.self_attn.probs"
    assert "error only at padded key positions" in diagnose(report)

    del report.meta["config"]  # diagnose reads the config build_report records: without it, a clear error
    with pytest.raises(ValueError, match="has no config"):
        diagnose(report)


def test_precision_loss_is_not_a_scale_error(native):
    """Noise a few hundred times float32's is a precision loss (how many times the floor, whether it
    grows with the reduction length); a scale needs a norm ratio far from 1."""
    rng = np.random.default_rng(0)
    report = _forged(native, "model.layers.0.mlp.act", lambda v: v * (1 + 5e-5 * rng.standard_normal(v.shape)))
    text = diagnose(report)
    assert report.culprit.name == "model.layers.0.mlp.act"
    assert text.startswith("precision loss") and "x the float32 floor" in text and "elementwise" in text, text
    report = _forged(native, "model.layers.0.mlp.act", lambda v: v * np.float32(1.001))
    assert diagnose(report).startswith("scale error"), diagnose(report)

    def growing(v):  # relative noise proportional to the keys each query row sums
        keys = np.arange(1, v.shape[2] + 1, dtype=np.float32)[None, None, :, None]
        return v * (1 + 1e-5 * keys * rng.standard_normal(v.shape)).astype(np.float32)

    text = diagnose(_forged(native, "model.layers.0.self_attn.probs", growing))
    assert text.startswith("precision loss") and "it grows with the reduction length" in text, text
    flat = diagnose(
        _forged(
            native,
            "model.layers.0.self_attn.probs",
            lambda v: v * (1 + 5e-5 * rng.standard_normal(v.shape)).astype(np.float32),
        )
    )
    assert "does not grow with the reduction length" in flat, flat


def test_report_api_table_html_and_plots(native):
    report = compare(small_model(batch_size=2, seq_len=6, padding="left"), load_native(fault="gqa_modulo"))
    table = report.table
    assert list(table.index)[:2] == ["model.embed_tokens", "model.layers.0.input_layernorm"]
    assert {"max_abs", "rel_l2", "sqnr_db", "cosine", "n_bad", "floor", "tol", "own_rel_l2", "status"} <= set(
        table.columns
    )
    assert table.loc["model.layers.0.self_attn.scores", "status"] == "culprit"
    assert "culprit" in report._repr_html_() and "<table" in report._repr_html_()
    text = str(report)
    assert text.rstrip().endswith(report.diagnosis) and "culprit (own error): model.layers.0.self_attn.scores" in text

    depth = report.plot("depth")
    assert isinstance(depth, Figure)
    ax = depth.axes[0]
    layers = report.meta["config"].num_hidden_layers
    # ticks per layer group (embed, 0..L-1, out), not one per op; an x label; a legend of op kinds
    assert ax.get_yscale() == "log" and len(ax.get_xticks()) == layers + 2 and ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", *map(str, range(layers)), "out"]
    kinds = [t.get_text() for t in depth.legends[0].get_texts()]
    assert {"q_proj", "scores", "layer output", "lm_head"} <= set(kinds) and len(kinds) < 30
    from celerinfer_lab.plots import depth_layout

    x, _, _ = depth_layout([p.name for p in report.points])
    culprit_x = x[report.points.index(report.culprit)]
    assert 0 <= culprit_x < 1  # layer 0's band
    assert any(list(line.get_xdata()) == [culprit_x, culprit_x] for line in ax.get_lines())
    heat = report.plot("heatmap")
    assert heat.axes[0].images[0].get_array().shape == (8, 6)  # heads x positions
    scatter = report.plot("scatter", point="lm_head")
    assert len(scatter.axes) == 2 and scatter.axes[0].collections
    assert type(scatter.axes[0].collections[0]).__name__ == "PathCollection"  # few points: a scatter
    logits = report.plot("logits")
    assert "top-1 agreement" in logits.axes[0].get_title()
    with pytest.raises(ValueError, match="unknown plot kind"):
        report.plot("pie")
    with pytest.raises(ValueError, match="not an attention trace point"):
        report.plot("heatmap", point="lm_head")
    with pytest.raises(KeyError, match="no trace point"):
        report.plot("scatter", point="nope")


def test_repr_is_one_short_line(native):
    """A plain REPL prints repr(report): one line, not every run's arrays."""
    model = small_model(batch_size=2, seq_len=6, padding="left")
    good = compare(model, native, kernels="readable")
    assert repr(good) == f"<Report C++ (readable): agrees, {len(good.points)} trace points; print() for the table>"
    bad = compare(model, load_native(fault="gqa_modulo"))
    assert "diverges, culprit model.layers.0.self_attn.scores" in repr(bad) and len(repr(bad)) < 200
    both = compare(model, native, kernels="all")
    assert repr(both) == f"<Comparison of {', '.join(both.reports)}: agree>" and {"fast", "readable"} <= set(both)


def test_large_scatter_becomes_a_density_plot(native):
    from celerinfer_lab import plots

    report = compare(small_model(batch_size=2, seq_len=6), native)
    before = plots.DENSITY_ABOVE
    plots.DENSITY_ABOVE = 100  # lm_head has 2*6*vocab values, far above 100
    try:
        fig = report.plot("scatter", point="lm_head")
    finally:
        plots.DENSITY_ABOVE = before
    assert type(fig.axes[0].collections[0]).__name__ == "PolyCollection" and "density" in fig.axes[0].get_title()
