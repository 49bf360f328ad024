"""Judging two saved benches (``bench-compare``): per figure the medians, the change, a significance
test over the samples and a verdict — "faster", "slower" or "no significant change".

A verdict other than "no significant change" needs ALL of:
- significance: the two-sided Mann-Whitney U test (scipy.stats.mannwhitneyu) gives p < ``alpha``.
  Rank-based, it assumes nothing about the shape of the timings, which on a shared machine are
  skewed with long right tails (a forward preempted once takes 10-100x the median); Welch's t-test,
  pyperf's choice, assumes roughly normal means, and one such outlier moves both the mean and the
  variance it divides by.
- size: the medians differ by more than ``threshold_pct`` percent. Samples of one run share that
  run's conditions (the load of the moment, the CPU's clock), so two runs of the same code differ
  *significantly* by a few percent; the threshold is what keeps that drift from being a verdict.
- the fast tail agrees: the 10th percentiles differ by more than the threshold too, the same way.
  Other work on the machine only ever adds time, so it inflates the middle and the top of a run's
  samples (measured: +28% on PyTorch's median with a p of 0.006 between two runs of the same code
  while other jobs ran, its 10th percentile within 4%); code that is really slower is slower in its
  fastest runs as well.

Medians, not means, for the change (the outliers again). Lower is better for every figure (they are
times: a forward, a decode step). Comparing is apart from storing (history.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from statistics import median

from .errors import HistoryError
from .history import BenchStore, SavedResult

# The default threshold, from this project's machine (2 cores shared with other jobs; README
# "Benchmark history"): back-to-back saves of the same code (tiny model, one thread) moved this C++'s
# medians by at most 11% and their 10th percentiles by at most 2% in quieter spells, and by up to 33%
# and 32% while other jobs shared the cores (runs the bench flags noisy; the comparison notes it).
# 25% keeps the quieter drift out while a 30% slowdown of every run is still a verdict; quiet machine: 5.
DEFAULT_THRESHOLD_PCT = 25.0
DEFAULT_ALPHA = 0.01
# Below this many samples on either side the test cannot reach p < 0.01 (Mann-Whitney with 4 and 4
# samples has a smallest two-sided p of 0.029): the figure is reported, never judged.
MIN_SAMPLES = 5
DEFAULT_LAST = 5
VERDICTS = ("faster", "slower", "no significant change", "too few samples")


@dataclass(frozen=True)
class FigureChange:
    figure: str
    base_median_ms: float
    new_median_ms: float
    change_pct: float  # (new / base - 1) * 100 of the medians: positive is slower
    fast_change_pct: float  # the same of the 10th percentiles (the fast tail)
    p_value: float | None  # None: too few samples to test
    verdict: str  # one of VERDICTS
    base_runs: int
    new_runs: int

    @property
    def regression(self) -> bool:
        return self.verdict == "slower"


def _fast_tail(values: list[float]) -> float:
    """The 10th percentile (linear interpolation, numpy's default)."""
    import numpy as np

    return float(np.percentile(values, 10))


def judge(
    figure: str,
    base: list[float],
    new: list[float],
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    alpha: float = DEFAULT_ALPHA,
) -> FigureChange:
    """One figure's verdict from its two sample lists (times: lower is faster)."""
    if threshold_pct < 0 or not 0 < alpha < 1:
        raise HistoryError(f"threshold {threshold_pct}% / alpha {alpha}: need a threshold >= 0 and 0 < alpha < 1")
    for side, values in (("base", base), ("new", new)):
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise HistoryError(f"{figure}: the {side} samples must be positive finite times, got {values[:5]}...")
    base_median, new_median = median(base), median(new)
    change = (new_median / base_median - 1) * 100
    fast = (_fast_tail(new) / _fast_tail(base) - 1) * 100
    counts = (len(base), len(new))
    if min(counts) < MIN_SAMPLES:
        return FigureChange(figure, base_median, new_median, change, fast, None, "too few samples", *counts)
    from scipy.stats import mannwhitneyu

    p = float(mannwhitneyu(base, new, alternative="two-sided").pvalue)
    verdict = "no significant change"
    if p < alpha and change > threshold_pct and fast > threshold_pct:
        verdict = "slower"
    elif p < alpha and change < -threshold_pct and fast < -threshold_pct:
        verdict = "faster"
    return FigureChange(figure, base_median, new_median, change, fast, p, verdict, *counts)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) where two parameter dicts differ, with both values."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key} {json.dumps(va)} vs {json.dumps(vb)}")
    return out


def check_comparable(base: SavedResult, new: SavedResult, force: bool = False) -> None:
    """HistoryError unless both were measured with the same parameters and (unless ``force``) on the
    same machine; the message names what differs."""
    diff = _differences(base.params, new.params)
    if diff:
        raise HistoryError(f"results {base.id} and {new.id} ran different benchmarks: {'; '.join(diff)}")
    if base.fingerprint != new.fingerprint and not force:
        raise HistoryError(
            f"results {base.id} and {new.id} ran on different machines ({base.fingerprint}: "
            f"{base.machine.get('cpu')}, {base.machine.get('cores')} cores; {new.fingerprint}: "
            f"{new.machine.get('cpu')}, {new.machine.get('cores')} cores); --force compares them anyway"
        )


def best_base(store: BenchStore, new: SavedResult, last: int = DEFAULT_LAST) -> SavedResult:
    """Of the ``last`` results saved before ``new`` on the same machine with the same parameters, the
    fastest: the lowest geometric mean over figures of its median relative to ``new``'s."""
    if last < 1:
        raise HistoryError(f"--last {last}: must be 1 or more")
    candidates = [
        r for r in store.results() if r.id < new.id and r.fingerprint == new.fingerprint and r.params == new.params
    ][-last:]
    if not candidates:
        raise HistoryError(
            f"no result before {new.id} on this machine ({new.fingerprint}) with the same parameters to compare "
            "against: save another with `bench --save`, or name BASE"
        )

    def score(r: SavedResult) -> float:
        shared = [f for f in new.samples if f in r.samples]
        return sum(math.log(median(r.samples[f]) / median(new.samples[f])) for f in shared) / max(len(shared), 1)

    return min(candidates, key=score)


def _noisy_figures(record: dict) -> list[str]:
    """The forwards the bench itself flagged noisy (bench.Timing.noisy) in a saved record."""
    noisy = ["torch prefill"] if record.get("torch_forward_noisy") else []
    for name, figures in record.get("kernel_sets", {}).items():
        if figures.get("cpp_forward_noisy"):
            noisy.append(f"cpp prefill ({name})")
    return noisy


@dataclass
class BenchComparison:
    base: SavedResult
    new: SavedResult
    changes: list[FigureChange]
    threshold_pct: float
    alpha: float

    @property
    def regressions(self) -> list[FigureChange]:
        return [c for c in self.changes if c.regression]

    @property
    def judged(self) -> list[FigureChange]:
        """The figures with enough samples on both sides to be tested."""
        return [c for c in self.changes if c.p_value is not None]

    def lines(self) -> list[str]:
        """The comparison as printed by ``bench-compare``."""
        out = [
            f"base #{self.base.id} ({self.base.timestamp}, {self.base.short_commit}) -> "
            f"new #{self.new.id} ({self.new.timestamp}, {self.new.short_commit})",
            f"{self.new.workload}; machine {self.new.fingerprint}"
            + ("" if self.base.fingerprint == self.new.fingerprint else f" (base: {self.base.fingerprint}, forced)"),
            f"Mann-Whitney U, two-sided; a verdict needs p < {self.alpha:g} and the median and the 10th percentile "
            f"both changed beyond ±{self.threshold_pct:g}%",
            f"{'figure':28s} {'base ms':>10s} {'new ms':>10s} {'change':>8s} {'p10 chg':>8s} {'p':>9s}  verdict",
        ]
        for c in self.changes:
            p = "n/a" if c.p_value is None else f"{c.p_value:.2g}"
            out.append(
                f"{c.figure:28s} {c.base_median_ms:10.4g} {c.new_median_ms:10.4g} {c.change_pct:+7.1f}% "
                f"{c.fast_change_pct:+7.1f}% {p:>9s}  "
                f"{c.verdict}" + (f" ({c.base_runs} and {c.new_runs} samples)" if c.p_value is None else "")
            )
        for r in (self.base, self.new):
            noisy = _noisy_figures(r.record)
            if noisy:
                out.append(
                    f"note: #{r.id} was measured noisy ({', '.join(noisy)}: IQR > 25% of the median or load above "
                    "the cores, see bench): a verdict may be the machine's; re-run when it is quieter"
                )
        regressions = self.regressions
        if not self.judged:
            out.append(f"nothing judged: no figure has {MIN_SAMPLES} samples on both sides (bench --repeat)")
        elif regressions:
            out.append(
                f"REGRESSION: {', '.join(c.figure for c in regressions)} significantly slower by more than "
                f"{self.threshold_pct:g}%"
            )
        else:
            out.append("no significant regression")
        return out


def compare_results(
    base: SavedResult,
    new: SavedResult,
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    alpha: float = DEFAULT_ALPHA,
    force: bool = False,
    only: list[str] | None = None,
) -> BenchComparison:
    """Every figure both results measured (``only``: those whose name contains one of these words),
    judged (see judge); HistoryError when they are not comparable."""
    check_comparable(base, new, force)
    figures = [f for f in new.samples if f in base.samples and (not only or any(word in f for word in only))]
    if not figures:
        shared = [f for f in new.samples if f in base.samples]
        raise HistoryError(f"results {base.id} and {new.id} share no figure matching {only}: they have {shared}")
    changes = [judge(f, base.samples[f], new.samples[f], threshold_pct, alpha) for f in figures]
    return BenchComparison(base, new, changes, threshold_pct, alpha)


def compare_saved(
    store: BenchStore,
    base_id: int | None = None,
    new_id: int | None = None,
    last: int = DEFAULT_LAST,
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    alpha: float = DEFAULT_ALPHA,
    force: bool = False,
    only: list[str] | None = None,
) -> BenchComparison:
    """``bench-compare``: NEW defaults to the newest result, BASE to the best of the ``last`` before it
    on the same machine and parameters (best_base); ``only``: see compare_results."""
    new = store.get(new_id) if new_id is not None else store.latest()
    base = store.get(base_id) if base_id is not None else best_base(store, new, last)
    if base.id == new.id:
        raise HistoryError(f"BASE and NEW are both result {new.id}")
    return compare_results(base, new, threshold_pct, alpha, force, only)
