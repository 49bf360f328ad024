"""precision.py: what bf16/q8 weights cost a float32 model, both sides in the float64 reference.

Hand-computed SQNR and KL; a format costs nothing against itself; q8 costs more than bf16; one layer
reduced leaves every point before it exact; a planted layer-specific perturbation is attributed to
its layer by both schemes (and to another layer when planted there, so the check can fail)."""

import math
import zlib

import numpy as np
import pytest
import torch

import celerinfer_lab as cl
from celerinfer_lab.cli import main
from celerinfer_lab.errors import UsageError
from celerinfer_lab.precision import (
    WeightFormat,
    mean_kl,
    point_group,
    precision_cost,
    reduced_groups,
    sqnr_db,
    sqnr_grid,
    top1_agreement,
    with_reduced,
)
from celerinfer_lab.reference import ReferenceModel

CONFIG = cl.ModelConfig(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
)


@pytest.fixture(scope="module")
def model():
    return cl.generate_model(CONFIG, batch_size=2, seq_len=6, seed=3, padding="left")


@pytest.fixture(scope="module")
def costs(model):
    return {fmt: precision_cost(model, fmt) for fmt in ("f32", "bf16", "q8")}


def forward64(model):
    logits, points = ReferenceModel(model, torch.float64).forward(trace=True)
    return logits.numpy(), {k: v.numpy() for k, v in points.items()}


# ---- the numbers, by hand ------------------------------------------------------------------------------
def test_sqnr_by_hand():
    assert sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert sqnr_db(np.array([1.0, -2.0, 2.0]), np.array([1.5, -2.0, 2.5])) == pytest.approx(10 * math.log10(9 / 0.5))
    assert sqnr_db(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == math.inf  # no error: defined, infinite
    assert sqnr_db(np.zeros(3), np.zeros(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    # masked attention scores (-1e9) on both sides are left out, as compare does
    assert sqnr_db(np.array([3.0, -1e9]), np.array([3.0 + 0.3, -1e9])) == pytest.approx(10 * math.log10(9 / 0.09))


def test_kl_and_top1_by_hand():
    ref = np.array([[[0.0, 0.0], [5.0, 0.0]]])  # [B=1, S=2, V=2]
    test = np.array([[[0.0, math.log(3.0)], [0.0, 9.0]]])
    # position 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln (2/3)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert mean_kl(ref, test, np.array([[1, 0]])) == pytest.approx(expected)  # position 1 is padding
    assert mean_kl(ref, test, np.array([[1, 1]])) > expected + 1  # ... which would count otherwise
    assert top1_agreement(ref, test, np.array([[1, 1]])) == 0.0  # argmax 0 vs 1 at both positions
    assert top1_agreement(ref, ref, np.array([[1, 1]])) == 1.0
    assert mean_kl(ref, ref, np.array([[1, 1]])) == 0.0


# ---- whole models ------------------------------------------------------------------------------------------
def test_float32_against_itself_costs_nothing(costs):
    c = costs["f32"]
    assert all(v == math.inf for v in c.sqnr.values())
    assert c.kl == 0.0 and c.top1 == 1.0 and c.max_abs_logit == 0.0
    assert set(c.layer_kl.values()) == {0.0} and set(c.splice_kl.values()) == {0.0}
    assert "exact" in c.table() and "none loses anything" in c.summary()


def test_q8_costs_more_than_bf16(costs):
    bf16, q8 = costs["bf16"], costs["q8"]
    assert 0 < bf16.kl < q8.kl
    assert bf16.max_abs_logit < q8.max_abs_logit
    assert all(q8.sqnr[name] < bf16.sqnr[name] < math.inf for name in bf16.sqnr)
    assert sum(q8.layer_kl.values()) > sum(bf16.layer_kl.values())
    assert q8.label == "precision cost (float32 model vs its q8 weights, both in the float64 reference)"


def test_splice_contributions_add_up_and_weightless_ops_add_nothing(costs):
    for fmt in ("bf16", "q8"):
        c = costs[fmt]
        assert sum(c.splice_kl.values()) == pytest.approx(c.kl, rel=1e-9)  # they telescope
        for name, added in c.splice_kl.items():
            if name.split(".")[-1] in ("input_layernorm", "rope_q", "rope_k", "scores", "probs", "context", "act"):
                assert added == 0.0, name  # the same float64 function of the same inputs on both sides
        assert c.splice_kl["model.layers.0.self_attn.o_proj"] != 0.0  # a weighted op does add


def test_with_reduced_everything_is_the_stored_format(model):
    """The helper that reduces some weights gives, with all of them, the reference of as_format."""
    for fmt in ("bf16", "q8"):
        a, _ = forward64(with_reduced(model, fmt))
        b, _ = forward64(model.as_format(fmt))
        assert np.array_equal(a, b)


def exact_points(a, b):
    """The trace points where two models' float64 forwards agree exactly, in forward order."""
    _, ta = forward64(a)
    _, tb = forward64(b)
    return [name for name in ta if np.array_equal(ta[name], tb[name])]


@pytest.mark.parametrize("layer", [1, 0])
def test_one_layer_reduced_leaves_the_points_before_it_exact(model, layer):
    names = reduced_groups(model.config)[f"layer {layer}"]
    assert names and all(n.startswith(f"model.layers.{layer}.") for n in names)
    exact = exact_points(model, with_reduced(model, "q8", names))
    first_weighted = f"model.layers.{layer}.self_attn.q_proj"
    order = list(forward64(model)[1])
    before = order[: order.index(first_weighted)]
    assert exact == before  # exact up to its first op with a reduced weight, and never again
    if layer == 0:  # the companion: the check sees an error at layer 0 when layer 0 is the one reduced
        assert "model.layers.0.self_attn.q_proj" not in exact


# ---- attribution of a planted perturbation ------------------------------------------------------------
def noise_in_layer(layer: int) -> WeightFormat:
    """A fake format: layer ``layer``'s reduced weights times (1 + 1e-2 noise), every other weight kept."""

    def values(name: str, w: np.ndarray) -> np.ndarray:
        if not name.startswith(f"model.layers.{layer}."):
            return w
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return (w * (1 + 1e-2 * rng.standard_normal(w.shape))).astype(np.float32)

    return WeightFormat(f"noise in layer {layer}", values)


def attributed(cost):
    """The layer each scheme blames most: (one at a time, splice)."""
    spliced = cost.splice_by_group()
    return max(cost.layer_kl, key=lambda g: cost.layer_kl[g]), max(spliced, key=lambda g: spliced[g])


@pytest.mark.parametrize("planted", [2, 1])
def test_a_planted_perturbation_is_attributed_to_its_layer(model, planted):
    cost = precision_cost(model, noise_in_layer(planted))
    assert cost.kl > 0
    assert attributed(cost) == (f"layer {planted}", f"layer {planted}")
    # nothing else reads a perturbed weight, so nothing else loses anything, under either scheme
    assert all(v == 0.0 for g, v in cost.layer_kl.items() if g != f"layer {planted}")
    assert cost.layer_kl[f"layer {planted}"] == pytest.approx(cost.kl)  # one group: alone it is the whole
    assert all(v == 0.0 for name, v in cost.splice_kl.items() if point_group(name) != f"layer {planted}")
    # the companion is the other parameter: planted in layer 1, both schemes move there, so an
    # attribution that ignored the plant (or blamed a fixed layer) fails one of the two cases


# ---- other configs, views, errors ------------------------------------------------------------------------
def test_moe_qk_norm_untied():
    config = cl.ModelConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=48,
        use_moe=True,
        num_experts=3,
        num_experts_per_tok=2,
        n_shared_experts=1,
        qk_norm=True,
        tie_word_embeddings=False,
    )
    m = cl.generate_model(config, batch_size=1, seq_len=5, seed=4)
    c = precision_cost(m, "q8")
    assert "model.layers.0.mlp.topk_idx" not in c.sqnr  # integer points have no SQNR
    assert "model.layers.0.mlp.topk_idx" in c.splice_kl
    assert sum(c.splice_kl.values()) == pytest.approx(c.kl, rel=1e-9)
    assert list(c.layer_kl) == ["layer 0", "layer 1", "head"] and c.layer_kl["head"] > 0
    assert c.splice_by_group()["embed"] == 0.0  # untied: the embedding stays float32


def test_plot_and_views(costs):
    c = costs["q8"]
    fig = c.plot()
    bars, heat = fig.axes[:2]
    assert len(bars.patches) == 2 * (CONFIG.num_hidden_layers + 2)  # embed, layers, head; two schemes
    ops, layers, grid = sqnr_grid(c)
    assert layers == [0, 1, 2] and grid.shape == (len(ops), 3) and np.isfinite(grid).all()
    assert grid[ops.index("self_attn.q_proj"), 1] == c.sqnr["model.layers.1.self_attn.q_proj"]
    assert c.label in c._repr_html_() and c.label in str(c)
    _, _, exact_grid = sqnr_grid(costs["f32"])
    assert np.isinf(exact_grid).all()  # drawn blank (masked), not as a colour


def test_bad_input_is_refused(model):
    with pytest.raises(UsageError, match="starts from a float32 model"):
        precision_cost(model.as_format("q8"), "bf16")
    with pytest.raises(cl.ConfigError, match="weight format 'q4'"):
        precision_cost(model, "q4")
    with pytest.raises(UsageError, match="not a weight of this model"):
        with_reduced(model, "q8", ["model.layers.9.self_attn.q_proj.weight"])


def test_cli(model, tmp_path, capsys):
    path = tmp_path / "m.json"
    model.save(path)
    assert main(["precision", str(path), "--to", "bf16", "--plot", str(tmp_path / "p.png"), "--no-splice"]) == 0
    out = capsys.readouterr().out
    assert "precision cost (float32 model vs its bf16 weights, both in the float64 reference)" in out
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(["precision", str(tmp_path / "missing.json"), "--to", "q8"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_traces_the_caller_already_has_give_the_same_cost(model, costs):
    """compare() hands its float64 oracles in rather than running them twice: the cost is the same,
    and a wrong trace handed in changes it (so the traces are really used)."""
    exact = forward64(model)[1]
    reduced = forward64(model.as_format("q8"))[1]
    given = precision_cost(model, "q8", exact_trace=exact, reduced_trace=reduced)
    assert given.sqnr == costs["q8"].sqnr and given.kl == costs["q8"].kl and given.splice_kl == costs["q8"].splice_kl
    wrong = precision_cost(model, "q8", exact_trace=exact, reduced_trace=forward64(model.as_format("bf16"))[1])
    assert wrong.kl != given.kl
