"""The tolerance rule as a value (celerinfer_lab/tolerances.py) and the report built with it.

The subject of most tests is the float32 reference itself (no C++ needed), with an error planted at
one trace point: a verdict that an override must change, and one that it must leave alone."""

import dataclasses

import numpy as np
import pytest
from conftest import small_model

from celerinfer_lab import Tolerances
from celerinfer_lab.compare import ABS_FLOOR, AMPLIFY, FACTOR, MIN_FLOOR, PointReport, build_report, reference_runs
from celerinfer_lab.errors import UsageError
from celerinfer_lab.tolerances import PointTolerance

NAME = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def planted():
    """(model, runs): the float32 reference as the subject, with NAME's accumulated value off by
    three times the default tolerance (rel_l2 = 3 * tol)."""
    model = small_model(batch_size=2, seq_len=7, padding="mixed")
    runs = reference_runs(model)
    runs.update(cpp=dict(runs["ref32"]), cpp_own=dict(runs["ref32_own"]))
    tol = build_report(runs, model.config, model.attention_mask).point(NAME).tol
    x = runs["oracle"][NAME].astype(np.float64)
    real = x[model.attention_mask.astype(bool)]  # [B, S, H]: the real token rows
    b, s = np.argwhere(model.attention_mask)[0]
    y = x.copy()
    y[b, s, 0] += 3 * tol * np.linalg.norm(real)
    runs["cpp"] = {**runs["cpp"], NAME: y}
    return model, runs


def test_defaults_are_the_documented_constants():
    rule = Tolerances()
    assert (rule.factor, rule.min_floor, rule.abs_floor, rule.amplify) == (FACTOR, MIN_FLOOR, ABS_FLOOR, AMPLIFY)
    assert rule.at(NAME) == PointTolerance(10.0, 2.0**-22, 1e-7)
    assert rule.at(NAME).rel_tol(0.0) == 10 * 2.0**-22 and rule.at(NAME).rel_tol(1e-3) == pytest.approx(1e-2)


def test_an_override_changes_that_points_verdict_only(planted):
    model, runs = planted
    plain = build_report(runs, model.config, model.attention_mask)
    assert plain.point(NAME).diverges and plain.first_divergent.name == NAME  # 3x the tolerance

    loose = Tolerances(overrides={"mlp.down_proj": {"factor": 40, "reason": "a test's looser rule"}})
    report = build_report(runs, model.config, model.attention_mask, tolerances=loose)
    p = report.point(NAME)
    assert not p.diverges and p.tol == pytest.approx(4 * plain.point(NAME).tol, rel=1e-12)
    assert "tolerance factor 40 (mlp.down_proj: a test's looser rule)" in p.note
    assert report.agrees and "1 tolerance override" in report.summary()
    others = [(a.name, a.tol) for a in plain.points if a.name != NAME and a.name.endswith("self_attn.q_proj")]
    assert others and all(report.point(n).tol == t for n, t in others)  # points not named keep the default

    elsewhere = Tolerances(overrides={"self_attn.q_proj": 40})  # the same override at another point
    assert build_report(runs, model.config, model.attention_mask, tolerances=elsewhere).point(NAME).diverges


def test_the_longest_matching_key_wins():
    rule = Tolerances(factor=12, overrides={"mlp.down_proj": 3, NAME: {"min_floor": 1e-6}})
    assert rule.at(NAME) == PointTolerance(factor=12, min_floor=1e-6)  # the full name, over the global factor
    assert rule.at("model.layers.1.mlp.down_proj").factor == 3
    assert rule.at("model.layers.1.mlp.up_proj") == rule.default
    assert rule.override_for("model.layers.0.xmlp.down_proj") is None  # a suffix matches after a dot only
    whole = Tolerances(factor=12, overrides={"lm_head": PointTolerance(abs_floor=1e-6)})
    assert whole.at("lm_head") == PointTolerance(factor=10.0, abs_floor=1e-6)  # a whole rule: its own factor


def test_bad_rules_are_refused_by_name(planted):
    model, runs = planted
    with pytest.raises(UsageError, match=r"\['mlp.dwon_proj'\] match no trace point"):
        build_report(runs, model.config, model.attention_mask, tolerances=Tolerances(overrides={"mlp.dwon_proj": 3}))
    for kwargs, words in (
        (dict(factor=0), "factor=0: must be a finite number > 0"),
        (dict(amplify=float("nan")), "amplify=nan"),
        (dict(overrides={"lm_head": {"factr": 3}}), "unknown field(s) ['factr']"),
        (dict(overrides={"lm_head": "loose"}), "give a number (the factor), a dict"),
        (dict(overrides={"lm_head": {"abs_floor": -1}}), "overrides['lm_head'].abs_floor=-1"),
    ):
        with pytest.raises(UsageError) as info:
            Tolerances(**kwargs)
        assert words in str(info.value)


def test_tolerances_are_frozen():
    rule = Tolerances(overrides={"lm_head": 20})
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.factor = 1.0
    with pytest.raises(TypeError):
        rule.overrides["lm_head"] = {"factor": 1}


def test_point_report_takes_keywords_only():
    values = dict(
        name="lm_head",
        shape=(1, 2, 3),
        max_abs=0.0,
        rel_l2=0.0,
        sqnr_db=0.0,
        cosine=1.0,
        n_bad=0,
        floor=0.0,
        tol=1.0,
        abs_tol=1.0,
        own_rel_l2=0.0,
        own_floor=0.0,
        own_tol=1.0,
        diverges=False,
        own_diverges=False,
    )
    assert PointReport(**values).label == "ok"
    with pytest.raises(TypeError):
        PointReport(*values.values())  # rel_l2 and floor swapped would pass silently


def test_compare_passes_the_rule_through(native):
    from celerinfer_lab.compare import compare

    rule = Tolerances(overrides={"lm_head": {"factor": 20, "reason": "checked here"}})
    report = compare(small_model(batch_size=2, seq_len=5), native, kernels="readable", tolerances=rule)
    assert report.tolerances is rule and "checked here" in report.point("lm_head").note and report.agrees
