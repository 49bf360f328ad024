"""Find where the C++ forward diverges from the reference, and why.

Every trace point is measured against a float64 run of the reference (the oracle), for the C++
forward and for the float32 reference alike. Notation: x is the oracle's value, y the C++ value.

    max_abs  = max |y - x|
    rel_l2   = ||y - x|| / ||x||
    sqnr_db  = 10 log10(||x||^2 / ||y - x||^2)
    cosine   = <x, y> / (||x|| ||y||)

Tolerance from the numbers: the float32 reference's own rel_l2 against the oracle is the point's
noise floor. The C++ diverges at a point when

    rel_l2 > FACTOR * max(floor, MIN_FLOOR)   and   max_abs > abs_tol

with FACTOR = 10; MIN_FLOOR = 2^-22 (4 units of float32 roundoff: a floor measured on a few
elements can be lucky, even exactly 0, while an equally correct implementation rounds
differently; over 400 random configs the largest correct error was 2.1x this tolerance's floor
share); and abs_tol = max(ABS_FLOOR, FACTOR * MIN_FLOOR * scale), the absolute floor for values
near zero: an op's rounding error is relative to the size of what it combines, not of its result
(a dot product that cancels to ~0 still carries eps * |q||k|), so scale is the larger RMS of the
point and the point before it in forward order, and ABS_FLOOR = 1e-7. ``n_bad`` counts the elements whose error exceeds
FACTOR times the float32 reference's largest elementwise error there (and ABS_FLOOR).

Accumulated and isolated: the plain C++ run carries every upstream error (accumulated). A second
run feeds every op the oracle's inputs (teacher forcing), so each point's error is its own
(isolated); the float32 reference run the same way gives the isolated floor. The culprit is the
first op whose own error is beyond tolerance. Points that diverge after it without an own error
are "propagated", or "amplified" when their error is more than AMPLIFY times any before them.

What is compared: token positions whose attention_mask is 1. A padded position never influences a
real one, and in float32 a fully masked score row is quantised to -1e9's grid (its values are
noise in every float32 implementation, MiniMind's included). Masked scores (-inf, or <= -1e8 from
the padding mask) are compared by class only: y must be masked the same way.

Where each part lives, bottom to top: metrics.py (the numbers), tolerances.py (the rule as a value,
``Tolerances``, with per-point overrides), runs.py (the five traced runs, engines as arguments),
report.py (PointReport, Report, build_report: runs in, verdicts out), rendering.py and plots.py (a
Report as text, table, HTML and figures), diagnose.py (what kind of bug the culprit has), and here
compare() and compare_decode(), which run, judge and diagnose in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import UsageError
from .kvcache import check_kv_cache

# Defined below compare (metrics, tolerances, report, runs) and importable from here as before.
from .metrics import (
    ABS_FLOOR,
    AMPLIFY,
    EPS32,
    FACTOR,
    FUSABLE,
    MASKED_BELOW,
    MIN_FLOOR,
    Errors,
    errors,
    kl_per_token,
    live_rows,
)
from .precision import PrecisionCost, precision_cost
from .quantize import weights_label
from .report import LogitsReport, PointReport, Report, build_report
from .runs import Runs, cache_adopter, floor_runs, kernel_runs, model_for, reference_runs, run_all, teacher_from
from .tolerances import PointTolerance, Tolerances
from .trace import recorded

if TYPE_CHECKING:  # the engine loads when a comparison runs, not when a Report is read
    from .modelfile import Model
    from .native import NativeEngine

__all__ = [
    "compare",
    "compare_decode",
    "Comparison",
    "Report",
    "PointReport",
    "LogitsReport",
    "build_report",
    "Tolerances",
    "PointTolerance",
    "reference_runs",
    "kernel_runs",
    "model_for",
    "floor_runs",
    "run_all",
    "teacher_from",
    "errors",
    "kl_per_token",
    "live_rows",
    "Errors",
    "ABS_FLOOR",
    "AMPLIFY",
    "EPS32",
    "FACTOR",
    "FUSABLE",
    "MASKED_BELOW",
    "MIN_FLOOR",
]


@dataclass
class Comparison:
    """One Report per kernel set, side by side (``compare(..., kernels="all")``)."""

    reports: dict[str, Report]

    def __getitem__(self, kernels: str) -> Report:
        return self.reports[kernels]

    def __iter__(self) -> Iterator[str]:
        return iter(self.reports)

    @property
    def agrees(self) -> bool:
        return all(r.agrees for r in self.reports.values())

    @property
    def culprits(self) -> dict[str, PointReport | None]:
        return {k: r.culprit for k, r in self.reports.items()}

    def summary(self) -> str:
        return "\n".join(f"[{k}] " + r.summary().replace("\n", f"\n[{k}] ") for k, r in self.reports.items())

    def to_text(self) -> str:
        """Status per trace point, one column per kernel set, then each set's summary."""
        names = list(self.reports)
        first = next(iter(self.reports.values()))
        head = f"{'trace point':48s} " + " ".join(f"{k + ' rel_l2':>16s} {k + ' status':>20s}" for k in names)
        rows = [head]
        for i, p in enumerate(first.points):
            cells = []
            for k in names:
                q = self.reports[k].points[i]
                cells.append(f"{q.rel_l2:16.2e} {q.label:>20s}")
            rows.append(f"{p.name:48s} " + " ".join(cells))
        return "\n".join(rows) + "\n" + self.summary()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"<Comparison of {', '.join(self.reports)}: {'agree' if self.agrees else 'diverge'}>"

    def _repr_html_(self) -> str:
        return "".join(f"<h4>{k} kernels</h4>{r._repr_html_()}" for k, r in self.reports.items())


PRECISION_MODES = ("off", "summary", "full")


def _cost(
    original: Model, fmt: str, precision: str, oracles: dict[str, Runs], kv_cache: str = "f32"
) -> PrecisionCost | None:
    """What ``fmt`` (and a bf16 ``kv_cache``) costs the float32 ``original`` (precision="summary": SQNR
    per point and the logits' KL and top-1; "full": plus the per-layer and per-op attribution); None
    when there is no float32 original to measure against, nothing is reduced, or nothing was asked.
    ``oracles``: the float64 runs compare already has, by weight format (the reduced one always, the
    float32 one when a float32 set ran too): reused when the cache is float32, so none runs twice."""
    if precision == "off" or (fmt == "f32" and kv_cache == "f32") or original.weight_format != "f32":
        return None
    full = precision == "full"
    reuse = kv_cache == "f32"  # with a bf16 cache the oracles follow the kernels' roundings: run afresh
    exact = oracles["f32"]["oracle"] if reuse and "f32" in oracles else None
    reduced = oracles[fmt]["oracle"] if reuse else None
    return precision_cost(
        original,
        fmt,
        layers_one_at_a_time=full and fmt != "f32",
        splice=full,
        kv_cache=kv_cache,
        exact_trace=exact,
        reduced_trace=reduced,
    )


def _finish(report: Report, model: Model, cost: PrecisionCost | None = None) -> Report:
    from .diagnose import diagnose  # here: diagnose imports torch, and a Report is read without it

    report.meta["model"] = model
    if model.weight_format != "f32":  # say which question the report answers: the kernel's, on these weights
        report.meta["weights"] = weights_label(model.weight_format)
    if cost is not None:  # the other question, in its own labelled section
        report.meta["precision_cost"] = cost
    report.diagnosis = diagnose(report)
    return report


def _check_has_real_tokens(attention_mask: np.ndarray) -> None:
    """Only real tokens are compared: a file whose mask is all padding leaves nothing to compare."""
    if not np.asarray(attention_mask).any():
        raise UsageError(
            "attention_mask is 0 everywhere: every token is padding, so no position can be "
            "compared (set at least one token's mask to 1)"
        )


def compare(
    model: Model,
    native: NativeEngine | None = None,
    kernels: str | None = None,
    baseline: str = "torch",
    tolerances: Tolerances | None = None,
    precision: str = "summary",
    kv_cache: str = "f32",
) -> Report | Comparison:
    """Run the reference (float32 and float64) and the C++ forward (a NativeEngine; default: this
    project's cpp/) on ``model``, accumulated and teacher-forced, and report every trace point.

    ``kernels``: one set's name (a Report; None, the default: the engine's default set), or "all"
    (every registered kernel set: a Comparison, side by side; the CLI's default). ``baseline="readable"`` sets the
    floors from the readable C++ instead of PyTorch: the fast kernels judged against the readable
    ones. ``tolerances``: the rule (default ``Tolerances()``; see tolerances.py for per-point overrides).

    A bf16/q8 kernel set runs on ``model.as_format`` of its format (a float32 model is quantized in
    memory), and the reference runs on the same weights, decoded exactly: float64 on them is the
    precision-matched oracle, so the report judges the kernel, not the quantization (its summary
    says which weights and oracle it used). The other question, what the format costs against the
    float32 model, is answered beside it when ``model`` is float32 (``report.meta["precision_cost"]``,
    a PrecisionCost, in its own labelled section): ``precision`` "summary" (the default: SQNR per
    point, the logits' KL and top-1), "full" (plus KL per layer and per op) or "off".

    ``kv_cache``: "f32" (the default) or "bf16": the C++ and the reference round every new key and
    value to bfloat16 as it joins the cache, traced as self_attn.k_cached / v_cached and judged as
    a rounding point (kvcache.py: the oracle continues from the C++'s admissible roundings)."""
    from .native import load_native

    check_kv_cache(kv_cache)
    _check_has_real_tokens(model.attention_mask)
    if precision not in PRECISION_MODES:
        raise UsageError(f"precision={precision!r}: one of {', '.join(PRECISION_MODES)}")
    native = native or load_native()
    sets = native.kernel_sets if kernels == "all" else [native.check_kernels(kernels or native.kernels)]
    matched = {name: model_for(model, native, name) for name in sets}
    shared: dict[str, Runs] = {}  # the oracle and floors, once per weight format
    for m in matched.values():
        if m.weight_format not in shared:
            shared[m.weight_format] = floor_runs(m, native, baseline, kv_cache)
    costs = {fmt: _cost(model, fmt, precision, shared, kv_cache) for fmt in shared}  # what each format costs, once
    reports = {}
    for name in sets:
        fmt = matched[name].weight_format
        floors = shared[fmt]
        runs = {**floors, **kernel_runs(matched[name], native, name, floors["oracle"], kv_cache)}
        report = build_report(
            runs, model.config, model.attention_mask, f"C++ ({name})", tolerances=tolerances, kv_cache=kv_cache
        )
        reports[name] = _finish(report, matched[name], costs[fmt])
    return Comparison(reports) if kernels == "all" else reports[sets[0]]


def compare_decode(
    model: Model,
    native: NativeEngine | None = None,
    steps: int = 3,
    kernels: str | None = None,
    tolerances: Tolerances | None = None,
    feed: np.ndarray | None = None,
    kv_cache: str = "f32",
) -> list[Report]:
    """Compare a KV-cache decode step by step: the prefill, then ``steps`` single-token steps fed
    with the oracle's greedy tokens (so every run sees the same tokens). One Report per forward;
    the isolated run is teacher forced at every step, so its cache holds the oracle's keys.
    ``kernels``: one kernel set (default: the engine's); ``tolerances``: as for compare().
    ``feed`` [B, N]: the tokens to feed instead (e.g. a generation both sides agreed on); then
    ``steps`` is N. ``kv_cache``: as for compare(); with "bf16" each step's accumulated oracle and
    float32 reference continue from the C++'s admissible cache roundings of every step so far."""
    check_kv_cache(kv_cache)
    _check_has_real_tokens(model.attention_mask)
    import torch

    from .native import load_native
    from .reference import ReferenceModel, decode_steps, greedy_generate

    native = native or load_native()
    model = model_for(model, native, kernels or native.kernels)  # the weights the kernels read, for every run
    ref64, ref32 = ReferenceModel(model, torch.float64, kv_cache), ReferenceModel(model, kv_cache=kv_cache)
    if feed is None:
        feed = greedy_generate(ref64, model.input_ids, model.attention_mask, steps)
    else:
        feed = np.asarray(feed, dtype=np.int64)
        if feed.ndim != 2 or feed.shape[0] != model.batch_size:
            raise UsageError(f"feed has shape {list(feed.shape)}; expected [{model.batch_size}, N]")
        steps = int(feed.shape[1])
    oracle = [recorded(t) for _, t in decode_steps(ref64, model.input_ids, model.attention_mask, feed, trace=True)]
    teachers = [teacher_from(t) for t in oracle]
    prepared = native.prepare(model, kernels, kv_cache)
    ids, mask0 = model.input_ids, model.attention_mask
    runs = {
        "oracle": oracle,
        "ref32": [recorded(t) for _, t in decode_steps(ref32, ids, mask0, feed, trace=True)],
        "ref32_own": [recorded(t) for _, t in decode_steps(ref32, ids, mask0, feed, teachers=teachers)],
        "cpp": [r.points for r in prepared.decode_steps(feed, trace=True)],
        "cpp_own": [r.points for r in prepared.decode_steps(feed, trace=True, teachers=teachers)],
    }
    if kv_cache == "bf16":  # the cache as a rounding point: both references continue from the C++'s choices
        adopts = [cache_adopter(c, o) for c, o in zip(runs["cpp"], oracle)]
        for key, ref in (("oracle_acc", ref64), ("ref32", ref32)):
            runs[key] = [recorded(t) for _, t in decode_steps(ref, ids, mask0, feed, trace=True, adopts=adopts)]
    reports, mask, past = [], model.attention_mask, 0
    for step in range(steps + 1):
        if step:
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        report = build_report(
            {k: v[step] for k, v in runs.items()},
            model.config,
            mask,
            subject=f"C++ ({prepared.kernels}) step {step}",
            past_len=past,
            tolerances=tolerances,
            kv_cache=kv_cache,
        )
        report.meta["step"] = step
        reports.append(_finish(report, model))
        past = mask.shape[1]
    return reports
