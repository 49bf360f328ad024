"""The Report: every trace point of one forward judged against the float64 oracle (compare.py's
docstring explains the metrics, the tolerance and the labels), built from runs by build_report.

Runs in, verdicts out: nothing here runs an engine (runs.py does) or diagnoses (diagnose.py reads a
Report). The text, table and HTML views are in rendering.py, the figures in plots.py; Report's
methods call them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import rendering
from .config import ModelConfig
from .metrics import FUSABLE, MASKED_BELOW, Errors, errors, kl_per_token, live_rows
from .runs import Runs
from .tolerances import PointTolerance, Tolerances
from .trace import TracePoint, trace_points

if TYPE_CHECKING:  # the views' types: pandas and matplotlib load only when a view is asked for
    import pandas as pd
    from matplotlib.figure import Figure


@dataclass(kw_only=True)
class PointReport:
    """One trace point's verdict. Built by keyword only: eighteen numbers in a row are too easy to
    swap (rel_l2 and floor are both floats)."""

    name: str
    shape: tuple[int, ...]
    max_abs: float  # accumulated: the C++ run against the oracle
    rel_l2: float
    sqnr_db: float
    cosine: float
    n_bad: int
    floor: float  # the float32 reference's rel_l2 against the oracle
    tol: float  # factor * max(floor, min_floor)
    abs_tol: float  # max(abs_floor, factor * min_floor * scale)
    own_rel_l2: float  # isolated: the C++ op on the oracle's inputs
    own_floor: float
    own_tol: float
    diverges: bool
    own_diverges: bool
    label: str = "ok"  # ok | culprit | own error | propagated | amplified | not observed
    note: str = ""
    nonfinite: int = 0  # NaN/Inf in the accumulated run where the oracle is finite, padded rows included


@dataclass
class LogitsReport:
    top1_agreement: float  # fraction of real tokens whose argmax matches the oracle's
    kl_per_token: np.ndarray  # [B, S], NaN at padded positions
    kl_mean: float
    kl_max: float
    floor_kl_max: float  # the float32 reference's largest KL


@dataclass
class Report:
    """The comparison of one C++ forward with the reference at every trace point."""

    points: list[PointReport]
    logits: LogitsReport
    runs: dict[str, dict[str, np.ndarray]]  # oracle, ref32, ref32_own, cpp, cpp_own
    attention_mask: np.ndarray
    diagnosis: str | None = None
    subject: str = "C++"
    meta: dict = field(default_factory=dict)
    tolerances: Tolerances = field(default_factory=Tolerances)

    @property
    def culprit(self) -> PointReport | None:
        return next((p for p in self.points if p.label == "culprit"), None)

    @property
    def first_divergent(self) -> PointReport | None:
        return next((p for p in self.points if p.diverges), None)

    @property
    def agrees(self) -> bool:
        return not any(p.diverges or p.own_diverges for p in self.points)

    def point(self, name: str) -> PointReport:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"no trace point {name!r}; see report.table")

    @property
    def table(self) -> pd.DataFrame:
        """A pandas DataFrame, one row per trace point in forward order."""
        return rendering.table(self)

    def summary(self) -> str:
        return rendering.summary(self)

    def to_text(self) -> str:
        return rendering.text(self)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        """One line for a plain REPL (the dataclass default printed every run's arrays, ~2 MB);
        print(report) gives the table."""
        c = self.culprit
        verdict = "agrees" if self.agrees else f"diverges, culprit {c.name if c else 'none'}"
        return f"<Report {self.subject}: {verdict}, {len(self.points)} trace points; print() for the table>"

    def _repr_html_(self) -> str:
        return rendering.html(self)

    def plot(self, kind: str = "depth", **kwargs: Any) -> Figure:
        """A matplotlib Figure: kind is 'depth', 'heatmap', 'scatter' or 'logits' (see plots.py)."""
        from . import plots  # here: matplotlib loads only when a figure is asked for

        return plots.plot(self, kind, **kwargs)


# ---- building a report -------------------------------------------------------------------------
def accumulated_oracle(runs: Runs) -> str:
    """The run the accumulated runs (cpp, ref32) are measured against: "oracle_acc" when there is one
    (a bf16 KV cache: the oracle continued from the C++'s admissible roundings, kvcache.py), else
    "oracle" (the teacher-forced runs are always measured against "oracle", their teacher)."""
    return "oracle_acc" if "oracle_acc" in runs else "oracle"


def _point_errors(point: TracePoint, runs: Runs, mask: np.ndarray, key_x: str, key_y: str) -> Errors:
    x, y = runs[key_x][point.name], runs[key_y][point.name]  # build_report checked both are there
    return errors(live_rows(x, point.token_axis, mask), live_rows(y, point.token_axis, mask))


def _rms(point: TracePoint, runs: Runs, mask: np.ndarray) -> float:
    x = live_rows(runs["oracle"][point.name], point.token_axis, mask).astype(np.float64)
    x = x[np.isfinite(x) & (x > MASKED_BELOW)]
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def _padded_nonfinite(x: np.ndarray, y: np.ndarray, token_axis: int, mask: np.ndarray) -> int:
    """NaN/Inf in y at padded token positions where the oracle x is finite (a masked score, -inf
    against -1e9, is the same class: not counted)."""
    padded = ~np.moveaxis(
        np.broadcast_to(
            mask.astype(bool).reshape(mask.shape + (1,) * (x.ndim - 2)), np.moveaxis(x, token_axis, 1).shape
        ),
        1,
        token_axis,
    )
    masked = np.isneginf(y) & (x <= MASKED_BELOW)
    return int((~np.isfinite(y) & ~masked & np.isfinite(x) & padded).sum())


def _index_mismatches(point: TracePoint, runs: Runs, mask: np.ndarray, key: str) -> int:
    x = live_rows(
        runs["oracle" if key.endswith("_own") else accumulated_oracle(runs)][point.name], point.token_axis, mask
    )
    y = live_rows(runs[key][point.name], point.token_axis, mask)
    return int((x != y).sum())


def _not_observed(point: TracePoint) -> PointReport:
    """A fused kernel that does not expose this point: nothing to judge."""
    nan = math.nan
    return PointReport(
        name=point.name,
        shape=point.shape,
        max_abs=nan,
        rel_l2=nan,
        sqnr_db=nan,
        cosine=nan,
        n_bad=0,
        floor=nan,
        tol=nan,
        abs_tol=nan,
        own_rel_l2=nan,
        own_floor=nan,
        own_tol=nan,
        diverges=False,
        own_diverges=False,
        label="not observed",
        note="fused: not observed by this kernel set",
    )


def _absent(point: TracePoint, note: str) -> PointReport:
    """Missing from the C++ trace, or of the wrong shape: diverges, in both runs."""
    return PointReport(
        name=point.name,
        shape=point.shape,
        max_abs=math.inf,
        rel_l2=math.inf,
        sqnr_db=-math.inf,
        cosine=math.nan,
        n_bad=0,
        floor=0,
        tol=0,
        abs_tol=0,
        own_rel_l2=math.inf,
        own_floor=0,
        own_tol=0,
        diverges=True,
        own_diverges=True,
        note=note,
    )


def _index_point(point: TracePoint, runs: Runs, mask: np.ndarray) -> PointReport:
    """Routing indices: equal, or no more mismatches than float32 has."""
    acc, own = _index_mismatches(point, runs, mask, "cpp"), _index_mismatches(point, runs, mask, "cpp_own")
    floor, own_floor = _index_mismatches(point, runs, mask, "ref32"), _index_mismatches(point, runs, mask, "ref32_own")
    n = max(1, int(mask.sum()) * point.shape[-1])
    return PointReport(
        name=point.name,
        shape=point.shape,
        max_abs=float(acc > 0),
        rel_l2=acc / n,
        sqnr_db=math.nan,
        cosine=math.nan,
        n_bad=acc,
        floor=floor / n,
        tol=floor / n,
        abs_tol=0.0,
        own_rel_l2=own / n,
        own_floor=own_floor / n,
        own_tol=own_floor / n,
        diverges=acc > floor,
        own_diverges=own > own_floor,
        note=f"{acc} indices differ" if acc else "",
    )


def _n_bad(point: TracePoint, runs: Runs, mask: np.ndarray, rule: PointTolerance, class_mismatch: int) -> int:
    """Elements whose error exceeds the factor times float32's largest elementwise error there."""
    x = live_rows(runs[accumulated_oracle(runs)][point.name], point.token_axis, mask).astype(np.float64)
    y = live_rows(runs["cpp"][point.name], point.token_axis, mask).astype(np.float64)
    r = live_rows(runs["ref32"][point.name], point.token_axis, mask).astype(np.float64)
    finite = np.isfinite(x) & (x > MASKED_BELOW)
    with np.errstate(invalid="ignore"):
        elem_tol = rule.elem_tol(float(np.abs(r - x)[finite].max(initial=0.0)))
        return int((~(np.abs(y - x) <= elem_tol) & finite).sum()) + class_mismatch


def _float_point(
    point: TracePoint, runs: Runs, mask: np.ndarray, rule: PointTolerance, scale: float, override: str
) -> PointReport:
    """A float trace point judged by ``rule``; ``scale``: the RMS the op combines (for abs_tol)."""
    acc = accumulated_oracle(runs)
    e = _point_errors(point, runs, mask, acc, "cpp")
    f = _point_errors(point, runs, mask, acc, "ref32")
    own = _point_errors(point, runs, mask, "oracle", "cpp_own")
    own_f = _point_errors(point, runs, mask, "oracle", "ref32_own")
    tol, own_tol, abs_tol = rule.rel_tol(f.rel_l2), rule.rel_tol(own_f.rel_l2), rule.abs_tol(scale)
    notes = []
    if e.nan:
        notes.append(f"{e.nan} NaN/Inf")
    if e.class_mismatch:
        notes.append(f"{e.class_mismatch} masked on one side only")
    # Padded rows are left out of the metrics, but a NaN or Inf there is found where it starts:
    # one layer later it spreads into real rows (0 * NaN).
    padded_bad, padded_own_bad = (
        _padded_nonfinite(runs[x][point.name], runs[k][point.name], point.token_axis, mask)
        for x, k in ((acc, "cpp"), ("oracle", "cpp_own"))
    )
    if padded_bad or padded_own_bad:
        notes.append(f"{max(padded_bad, padded_own_bad)} NaN/Inf in padded rows")
    if override:
        notes.append(f"tolerance factor {rule.factor:g} ({override}{': ' + rule.reason if rule.reason else ''})")
    return PointReport(
        name=point.name,
        shape=point.shape,
        max_abs=e.max_abs,
        rel_l2=e.rel_l2,
        sqnr_db=e.sqnr_db,
        cosine=e.cosine,
        n_bad=_n_bad(point, runs, mask, rule, e.class_mismatch),
        floor=f.rel_l2,
        tol=tol,
        abs_tol=abs_tol,
        own_rel_l2=own.rel_l2,
        own_floor=own_f.rel_l2,
        own_tol=own_tol,
        diverges=(e.rel_l2 > tol and e.max_abs > abs_tol) or padded_bad > 0,
        own_diverges=(own.rel_l2 > own_tol and own.max_abs > abs_tol) or padded_own_bad > 0,
        note=", ".join(notes),
        nonfinite=e.nan + padded_bad,
    )


def build_report(
    runs: Runs,
    config: ModelConfig,
    attention_mask: np.ndarray,
    subject: str = "C++",
    past_len: int = 0,
    tolerances: Tolerances | None = None,
    kv_cache: str = "f32",
) -> Report:
    """Compare runs['cpp'] (and runs['cpp_own']) with runs['oracle'], floors from runs['ref32'] and
    runs['ref32_own']. attention_mask covers every key [B, past_len + S]; past_len > 0 for a
    decode step over S new tokens. ``tolerances``: the rule (default Tolerances()). ``kv_cache``:
    "bf16" adds the cache points; the accumulated runs are then measured against runs['oracle_acc']
    when given (accumulated_oracle)."""
    tolerances = tolerances or Tolerances()
    key_mask = attention_mask
    mask = attention_mask[:, past_len:]  # the rows compared: the new tokens that are real
    B, S = mask.shape
    points = trace_points(config, B, S, past_len, kv_cache)
    tolerances.check_overrides_match([p.name for p in points])
    reports: list[PointReport] = []
    previous_rms = 0.0
    for point in points:
        missing = [k for k in ("cpp", "cpp_own") if point.name not in runs[k]]
        wrong = [k for k in ("cpp", "cpp_own") if k not in missing and runs[k][point.name].shape != point.shape]
        if len(missing) == 2 and point.name.endswith(FUSABLE):  # a fused kernel that does not expose it
            reports.append(_not_observed(point))
        elif missing or wrong:
            shape = None if missing else list(runs[wrong[0]][point.name].shape)
            reports.append(
                _absent(
                    point, f"missing in the {subject} trace" if missing else f"shape {shape} != {list(point.shape)}"
                )
            )
        elif point.dtype == "int64":
            reports.append(_index_point(point, runs, mask))
        else:
            rms = _rms(point, runs, mask)
            rule, override = tolerances.at(point.name), tolerances.override_for(point.name) or ""
            reports.append(_float_point(point, runs, mask, rule, max(rms, previous_rms), override))
            previous_rms = rms
    _label(reports, tolerances.amplify)
    return Report(
        reports,
        _logits_report(runs, mask),
        runs,
        mask,
        subject=subject,
        meta={"config": config, "key_mask": key_mask, "past_len": past_len, "kv_cache": kv_cache},
        tolerances=tolerances,
    )


def _label(points: list[PointReport], amplify: float) -> None:
    """The culprit is the first op with an own error, or, if earlier, the point where NaN/Inf first
    appear in the plain run: teacher forcing can hide an input that is wrong only in a way the
    metrics do not count (-inf where the reference masks with -1e9), and NaN is found where it starts."""
    born = next((p for p in points if p.nonfinite), None)
    first_own = next((p for p in points if p.own_diverges), None)
    if born is not None and (first_own is None or points.index(born) < points.index(first_own)):
        born.own_diverges = True
        born.note = ", ".join(filter(None, [born.note, "NaN/Inf start here"]))
    culprit_seen, worst_before = False, 0.0
    for p in points:
        if p.own_diverges:
            p.label = "own error" if culprit_seen else "culprit"
            culprit_seen = True
        elif p.diverges:
            p.label = "amplified" if p.rel_l2 > amplify * worst_before else "propagated"
        if math.isfinite(p.rel_l2):
            worst_before = max(worst_before, p.rel_l2)


def _logits_report(runs: Runs, mask: np.ndarray) -> LogitsReport:
    x, y, r = runs[accumulated_oracle(runs)]["lm_head"], runs["cpp"]["lm_head"], runs["ref32"]["lm_head"]
    real = mask.astype(bool)
    with np.errstate(all="ignore"):
        kl = np.where(real, kl_per_token(x, y), np.nan)
        kl_floor = np.where(real, kl_per_token(x, r), np.nan)
    top1 = float((x.argmax(-1) == y.argmax(-1))[real].mean()) if np.isfinite(y[real]).all() else 0.0
    finite_kl = kl[real]
    return LogitsReport(
        top1_agreement=top1,
        kl_per_token=kl,
        kl_mean=float(np.nanmean(finite_kl)) if np.isfinite(finite_kl).any() else math.inf,
        kl_max=float(np.max(finite_kl)) if np.isfinite(finite_kl).all() else math.inf,
        floor_kl_max=float(np.nanmax(kl_floor[real])),
    )
