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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError

# defined in metrics.py, re-exported here
from .metrics import (  # noqa: F401
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
from .trace import trace_points


# ---- the report --------------------------------------------------------------------------------
@dataclass
class PointReport:
    name: str
    shape: tuple[int, ...]
    max_abs: float  # accumulated: the C++ run against the oracle
    rel_l2: float
    sqnr_db: float
    cosine: float
    n_bad: int
    floor: float  # the float32 reference's rel_l2 against the oracle
    tol: float  # FACTOR * max(floor, MIN_FLOOR)
    abs_tol: float  # max(ABS_FLOOR, FACTOR * MIN_FLOOR * scale)
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
    def table(self):
        """A pandas DataFrame, one row per trace point in forward order."""
        import pandas as pd

        rows = [
            {
                "trace point": p.name,
                "shape": str(list(p.shape)),
                "max_abs": p.max_abs,
                "rel_l2": p.rel_l2,
                "sqnr_db": p.sqnr_db,
                "cosine": p.cosine,
                "n_bad": p.n_bad,
                "floor": p.floor,
                "tol": p.tol,
                "own_rel_l2": p.own_rel_l2,
                "own_tol": p.own_tol,
                "status": p.label,
                "note": p.note,
            }
            for p in self.points
        ]
        return pd.DataFrame(rows).set_index("trace point")

    def summary(self) -> str:
        lg = self.logits
        lines = [
            f"logits: top-1 agreement {lg.top1_agreement:.4f}, KL per token mean {lg.kl_mean:.3e} "
            f"max {lg.kl_max:.3e} (float32 reference max {lg.floor_kl_max:.3e})"
        ]
        if self.agrees:
            lines.append(
                f"all {len(self.points)} trace points agree (within {FACTOR:g}x the float32 reference's "
                f"own error against float64)"
            )
            return "\n".join(lines)
        first = self.first_divergent
        if first is not None:
            lines.append(f"first divergent (accumulated): {first.name} rel_l2 {first.rel_l2:.3e} > tol {first.tol:.3e}")
        c = self.culprit
        if c is not None:
            lines.append(f"culprit (own error): {c.name} rel_l2 {c.own_rel_l2:.3e} > tol {c.own_tol:.3e}")
            lines.append(f"diagnosis: {self.diagnosis or 'no known pattern'}")
        return "\n".join(lines)

    def to_text(self) -> str:
        head = (
            f"{'trace point':48s} {'shape':>16s} {'max_abs':>9s} {'rel_l2':>9s} {'sqnr_db':>7s} {'cosine':>10s} "
            f"{'n_bad':>6s} {'tol':>8s} {'own_rel':>9s}  status"
        )
        rows = [head]
        for p in self.points:
            rows.append(
                f"{p.name:48s} {str(list(p.shape)):>16s} {p.max_abs:9.2e} {p.rel_l2:9.2e} {p.sqnr_db:7.1f} "
                f"{p.cosine:10.7f} {p.n_bad:6d} {p.tol:8.1e} {p.own_rel_l2:9.2e}  {p.label}"
                f"{'  (' + p.note + ')' if p.note else ''}"
            )
        return "\n".join(rows) + "\n" + self.summary()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        """One line for a plain REPL (the dataclass default printed every run's arrays, ~2 MB);
        print(report) gives the table."""
        c = self.culprit
        verdict = "agrees" if self.agrees else f"diverges, culprit {c.name if c else 'none'}"
        return f"<Report {self.subject}: {verdict}, {len(self.points)} trace points; print() for the table>"

    def _repr_html_(self) -> str:
        colors = {
            "ok": "",
            "culprit": "background:#f8d0d0;font-weight:bold",
            "own error": "background:#f8d0d0",
            "propagated": "background:#fbeecb",
            "amplified": "background:#f6dcb4",
        }
        formats = {c: "{:.2e}" for c in ("max_abs", "rel_l2", "floor", "tol", "own_rel_l2", "own_tol")}
        formats.update(sqnr_db="{:.1f}", cosine="{:.7f}")
        styled = self.table.style.format(formats).apply(lambda row: [colors.get(row["status"], "")] * len(row), axis=1)
        summary = "<br>".join(self.summary().splitlines())
        return f"<div><p><b>{summary}</b></p>{styled.to_html()}</div>"

    def plot(self, kind: str = "depth", **kwargs):
        """A matplotlib Figure: kind is 'depth', 'heatmap', 'scatter' or 'logits' (see plots.py)."""
        from . import plots

        makers = {
            "depth": plots.error_along_depth,
            "heatmap": plots.attention_heatmap,
            "scatter": plots.scatter_and_histogram,
            "logits": plots.logits_agreement,
        }
        if kind not in makers:
            raise ValueError(f"unknown plot kind {kind!r}; choose from {sorted(makers)}")
        return makers[kind](self, **kwargs)


# ---- building a report -------------------------------------------------------------------------
def _point_errors(point, runs, mask, key_x: str, key_y: str) -> Errors:
    x, y = runs[key_x][point.name], runs[key_y].get(point.name)
    return errors(live_rows(x, point.token_axis, mask), live_rows(y, point.token_axis, mask))


def _rms(point, runs, mask) -> float:
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


def _index_mismatches(point, runs, mask, key: str) -> int:
    x = live_rows(runs["oracle"][point.name], point.token_axis, mask)
    y = live_rows(runs[key][point.name], point.token_axis, mask)
    return int((x != y).sum())


def build_report(
    runs: dict[str, dict[str, np.ndarray]], config, attention_mask: np.ndarray, subject: str = "C++", past_len: int = 0
) -> Report:
    """Compare runs['cpp'] (and runs['cpp_own']) with runs['oracle'], floors from runs['ref32'] and
    runs['ref32_own']. attention_mask covers every key [B, past_len + S]; past_len > 0 for a
    decode step over S new tokens."""
    key_mask = attention_mask
    mask = attention_mask[:, past_len:]  # the rows compared: the new tokens that are real
    B, S = mask.shape
    reports: list[PointReport] = []
    previous_rms = 0.0
    for point in trace_points(config, B, S, past_len):
        missing = [k for k in ("cpp", "cpp_own") if point.name not in runs[k]]
        wrong = [k for k in ("cpp", "cpp_own") if k not in missing and runs[k][point.name].shape != point.shape]
        if len(missing) == 2 and point.name.endswith(FUSABLE):  # a fused kernel that does not expose it
            reports.append(
                PointReport(
                    point.name,
                    point.shape,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    0,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    False,
                    False,
                    label="not observed",
                    note="fused: not observed by this kernel set",
                )
            )
            continue
        if missing or wrong:
            note = (
                f"missing in the {subject} trace"
                if missing
                else f"shape {list(runs[wrong[0]][point.name].shape)} != {list(point.shape)}"
            )
            reports.append(
                PointReport(
                    point.name,
                    point.shape,
                    math.inf,
                    math.inf,
                    -math.inf,
                    math.nan,
                    0,
                    0,
                    0,
                    0,
                    math.inf,
                    0,
                    0,
                    True,
                    True,
                    note=note,
                )
            )
            continue
        if point.dtype == "int64":  # routing indices: equal, or no more mismatches than float32 has
            acc, own = _index_mismatches(point, runs, mask, "cpp"), _index_mismatches(point, runs, mask, "cpp_own")
            floor, own_floor = (
                _index_mismatches(point, runs, mask, "ref32"),
                _index_mismatches(point, runs, mask, "ref32_own"),
            )
            n = max(1, int(mask.sum()) * point.shape[-1])
            reports.append(
                PointReport(
                    point.name,
                    point.shape,
                    float(acc > 0),
                    acc / n,
                    math.nan,
                    math.nan,
                    acc,
                    floor / n,
                    floor / n,
                    0.0,
                    own / n,
                    own_floor / n,
                    own_floor / n,
                    acc > floor,
                    own > own_floor,
                    note=f"{acc} indices differ" if acc else "",
                )
            )
            continue
        e = _point_errors(point, runs, mask, "oracle", "cpp")
        f = _point_errors(point, runs, mask, "oracle", "ref32")
        own = _point_errors(point, runs, mask, "oracle", "cpp_own")
        own_f = _point_errors(point, runs, mask, "oracle", "ref32_own")
        tol, own_tol = FACTOR * max(f.rel_l2, MIN_FLOOR), FACTOR * max(own_f.rel_l2, MIN_FLOOR)
        rms = _rms(point, runs, mask)
        abs_tol = max(ABS_FLOOR, FACTOR * MIN_FLOOR * max(rms, previous_rms))
        previous_rms = rms
        x = live_rows(runs["oracle"][point.name], point.token_axis, mask).astype(np.float64)
        y = live_rows(runs["cpp"][point.name], point.token_axis, mask).astype(np.float64)
        r = live_rows(runs["ref32"][point.name], point.token_axis, mask).astype(np.float64)
        finite = np.isfinite(x) & (x > MASKED_BELOW)
        with np.errstate(invalid="ignore"):
            elem_tol = FACTOR * max(float(np.abs(r - x)[finite].max(initial=0.0)), ABS_FLOOR)
            n_bad = int((~(np.abs(y - x) <= elem_tol) & finite).sum()) + e.class_mismatch
        notes = []
        if e.nan:
            notes.append(f"{e.nan} NaN/Inf")
        if e.class_mismatch:
            notes.append(f"{e.class_mismatch} masked on one side only")
        # Padded rows are left out of the metrics, but a NaN or Inf there is found where it starts:
        # one layer later it spreads into real rows (0 * NaN).
        padded_bad, padded_own_bad = (
            _padded_nonfinite(runs["oracle"][point.name], runs[k][point.name], point.token_axis, mask)
            for k in ("cpp", "cpp_own")
        )
        if padded_bad or padded_own_bad:
            notes.append(f"{max(padded_bad, padded_own_bad)} NaN/Inf in padded rows")
        reports.append(
            PointReport(
                point.name,
                point.shape,
                e.max_abs,
                e.rel_l2,
                e.sqnr_db,
                e.cosine,
                n_bad,
                f.rel_l2,
                tol,
                abs_tol,
                own.rel_l2,
                own_f.rel_l2,
                own_tol,
                diverges=(e.rel_l2 > tol and e.max_abs > abs_tol) or padded_bad > 0,
                own_diverges=(own.rel_l2 > own_tol and own.max_abs > abs_tol) or padded_own_bad > 0,
                note=", ".join(notes),
                nonfinite=e.nan + padded_bad,
            )
        )
    _label(reports)
    return Report(
        reports,
        _logits_report(runs, mask),
        runs,
        mask,
        subject=subject,
        meta={"config": config, "key_mask": key_mask, "past_len": past_len},
    )


def _label(points: list[PointReport]) -> None:
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
            p.label = "amplified" if p.rel_l2 > AMPLIFY * worst_before else "propagated"
        if math.isfinite(p.rel_l2):
            worst_before = max(worst_before, p.rel_l2)


def _logits_report(runs, mask) -> LogitsReport:
    x, y, r = runs["oracle"]["lm_head"], runs["cpp"]["lm_head"], runs["ref32"]["lm_head"]
    real = mask.astype(bool)
    with np.errstate(all="ignore"):
        kl = np.where(real, kl_per_token(x, y), np.nan)
        kl_floor = np.where(real, kl_per_token(x, r), np.nan)
    top1 = float((x.argmax(-1) == y.argmax(-1))[real].mean()) if np.isfinite(y[real]).all() else 0.0
    finite_kl = kl[real]
    return LogitsReport(
        top1,
        kl,
        float(np.nanmean(finite_kl)) if np.isfinite(finite_kl).any() else math.inf,
        float(np.max(finite_kl)) if np.isfinite(finite_kl).all() else math.inf,
        float(np.nanmax(kl_floor[real])),
    )


# ---- running everything ------------------------------------------------------------------------
def reference_runs(model) -> dict[str, dict[str, np.ndarray]]:
    """The runs every comparison shares: the float64 oracle and the float32 reference, plain
    (ref32) and teacher-forced (ref32_own), whose errors against the oracle set the floors."""
    import torch

    from .reference import reference_forward

    oracle = reference_forward(model, dtype=torch.float64, trace=True).trace
    return {
        "oracle": oracle,
        "ref32": reference_forward(model, trace=True).trace,
        "ref32_own": reference_forward(model, trace=True, teacher=teacher_from(oracle)).trace,
    }


def teacher_from(oracle: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in oracle.items()}


def kernel_runs(model, native, kernels: str, oracle: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """One kernel set's two traced runs: plain (cpp) and teacher-forced on the oracle (cpp_own)."""
    prepared = native.prepare(model, kernels)  # bound (and packed) once for both runs
    return {"cpp": prepared.forward(trace=True).trace, "cpp_own": prepared.forward(teacher=teacher_from(oracle)).trace}


def run_all(model, native, kernels: str | None = None, baseline: str = "torch") -> dict[str, dict[str, np.ndarray]]:
    """The five runs a report needs: oracle (float64), ref32, ref32_own (the baseline whose error
    sets the floors: the float32 reference, or the readable C++ with baseline="readable"), cpp,
    cpp_own (the C++ with ``kernels``)."""
    runs = floor_runs(model, native, baseline)
    return {**runs, **kernel_runs(model, native, kernels or native.kernels, runs["oracle"])}


def floor_runs(model, native, baseline: str = "torch") -> dict[str, dict[str, np.ndarray]]:
    """reference_runs, with the floors from the readable C++ instead when baseline="readable"."""
    runs = reference_runs(model)
    if baseline == "readable":
        readable = kernel_runs(model, native, "readable", runs["oracle"])
        runs.update(ref32=readable["cpp"], ref32_own=readable["cpp_own"])
    elif baseline != "torch":
        raise UsageError(f"baseline={baseline!r}: 'torch' or 'readable'")
    return runs


@dataclass
class Comparison:
    """One Report per kernel set, side by side (``compare(..., kernels="all")``)."""

    reports: dict[str, Report]

    def __getitem__(self, kernels: str) -> Report:
        return self.reports[kernels]

    def __iter__(self):
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


def _finish(report: Report, model) -> Report:
    from .diagnose import diagnose  # here: diagnose imports torch, and a Report is read without it

    report.meta["model"] = model
    report.diagnosis = diagnose(report)
    return report


def _check_has_real_tokens(attention_mask: np.ndarray) -> None:
    """Only real tokens are compared: a file whose mask is all padding leaves nothing to compare."""
    if not np.asarray(attention_mask).any():
        raise UsageError(
            "attention_mask is 0 everywhere: every token is padding, so no position can be "
            "compared (set at least one token's mask to 1)"
        )


def compare(model, native=None, kernels: str | None = None, baseline: str = "torch") -> "Report | Comparison":
    """Run the reference (float32 and float64) and the C++ forward (a NativeEngine; default: this
    project's cpp/) on ``model``, accumulated and teacher-forced, and report every trace point.

    ``kernels``: one set's name (a Report; None, the default: the engine's default set), or "all"
    (every registered kernel set: a Comparison, side by side; the CLI's default). ``baseline="readable"`` sets the
    floors from the readable C++ instead of PyTorch: the fast kernels judged against the readable
    ones."""
    from .native import load_native

    _check_has_real_tokens(model.attention_mask)
    native = native or load_native()
    shared = floor_runs(model, native, baseline)
    sets = native.kernel_sets if kernels == "all" else [native.check_kernels(kernels or native.kernels)]
    reports = {}
    for name in sets:
        runs = {**shared, **kernel_runs(model, native, name, shared["oracle"])}
        reports[name] = _finish(build_report(runs, model.config, model.attention_mask, subject=f"C++ ({name})"), model)
    return Comparison(reports) if kernels == "all" else reports[sets[0]]


def compare_decode(model, native=None, steps: int = 3, kernels: str | None = None) -> list[Report]:
    """Compare a KV-cache decode step by step: the prefill, then ``steps`` single-token steps fed
    with the oracle's greedy tokens (so every run sees the same tokens). One Report per forward;
    the isolated run is teacher forced at every step, so its cache holds the oracle's keys.
    ``kernels``: one kernel set (default: the engine's)."""
    _check_has_real_tokens(model.attention_mask)
    import torch

    from .native import load_native
    from .reference import ReferenceModel, decode_steps, greedy_generate

    native = native or load_native()
    ref64, ref32 = ReferenceModel(model, torch.float64), ReferenceModel(model)
    feed = greedy_generate(ref64, model.input_ids, model.attention_mask, steps)
    oracle = [t for _, t in decode_steps(ref64, model.input_ids, model.attention_mask, feed, trace=True)]
    teachers = [teacher_from(t) for t in oracle]
    prepared = native.prepare(model, kernels)
    runs = {
        "oracle": oracle,
        "ref32": [t for _, t in decode_steps(ref32, model.input_ids, model.attention_mask, feed, trace=True)],
        "ref32_own": [
            t for _, t in decode_steps(ref32, model.input_ids, model.attention_mask, feed, teachers=teachers)
        ],
        "cpp": [r.trace for r in prepared.decode_steps(feed, trace=True)],
        "cpp_own": [r.trace for r in prepared.decode_steps(feed, trace=True, teachers=teachers)],
    }
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
        )
        report.meta["step"] = step
        reports.append(_finish(report, model))
        past = mask.shape[1]
    return reports
