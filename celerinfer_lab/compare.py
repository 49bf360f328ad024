"""Compare two traces point by point: the reference x against the C++ value y.

Metrics per trace point (over the elements that are not masked, see below):
* max_abs  = max |y - x|
* rel_l2   = ||y - x|| / ||x||       (0 when both are zero)
* cosine   = <x, y> / (||x|| ||y||)  (1 when both are zero)
* n_bad    = count of elements with |y - x| > atol + rtol * |x|, plus mask mismatches

Masked scores (``-inf`` above the diagonal, ``score - 1e9`` at padded keys) carry no information
beyond being masked, and their -1e9 would swamp any norm, so an element with x <= -1e8 or
non-finite is compared by class only: y must be masked the same way (same infinity, or also
<= -1e8). A NaN anywhere in y, a missing point or a wrong shape diverges outright.

A point agrees when rel_l2 <= rel_l2_tol or max_abs <= abs_tol (the latter for near-zero
tensors), and integer points (topk_idx) agree only when equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MASKED_BELOW = -1e8


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float = 1e-5  # float32 precision over a whole tensor
    abs: float = 1e-6  # for tensors whose values are all near zero
    rtol: float = 1e-4  # elementwise, for counting the elements out of tolerance
    atol: float = 1e-5


@dataclass
class PointMetrics:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float
    cosine: float
    n_bad: int
    agrees: bool
    note: str = ""


@dataclass
class Comparison:
    points: list[PointMetrics]
    tolerance: Tolerance = field(default_factory=Tolerance)

    @property
    def first_divergent(self) -> PointMetrics | None:
        return next((p for p in self.points if not p.agrees), None)

    @property
    def agrees(self) -> bool:
        return self.first_divergent is None

    def table(self) -> str:
        rows = [f"{'trace point':50s} {'shape':>18s} {'max_abs':>10s} {'rel_l2':>10s} {'cosine':>12s} {'n_bad':>7s}  status"]
        for p in self.points:
            status = "ok" if p.agrees else "DIVERGES"
            rows.append(f"{p.name:50s} {str(list(p.shape)):>18s} {p.max_abs:10.3e} {p.rel_l2:10.3e} "
                        f"{p.cosine:12.9f} {p.n_bad:7d}  {status}{'  ' + p.note if p.note else ''}")
        return "\n".join(rows)

    def summary(self) -> str:
        bad = self.first_divergent
        if bad is None:
            return (f"all {len(self.points)} trace points agree (rel_l2 <= {self.tolerance.rel_l2:g} "
                    f"or max_abs <= {self.tolerance.abs:g})")
        return (f"first divergent trace point: {bad.name} (rel_l2 {bad.rel_l2:.3e}, max_abs {bad.max_abs:.3e}, "
                f"cosine {bad.cosine:.6f}{', ' + bad.note if bad.note else ''})")

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def point_metrics(name: str, x: np.ndarray, y: np.ndarray | None, tol: Tolerance = Tolerance()) -> PointMetrics:
    """Metrics of y (C++) against x (reference) for one trace point."""
    shape = tuple(x.shape)
    if y is None:
        return PointMetrics(name, shape, math.inf, math.inf, math.nan, int(np.prod(shape)), False, "missing in C++ trace")
    if tuple(y.shape) != shape:
        return PointMetrics(name, shape, math.inf, math.inf, math.nan, int(np.prod(shape)), False,
                            f"shape {list(y.shape)} != reference {list(shape)}")
    if np.issubdtype(x.dtype, np.integer):
        n_bad = int((x != y).sum())
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        return PointMetrics(name, shape, max_abs, 0.0 if n_bad == 0 else math.inf, 1.0 if n_bad == 0 else math.nan,
                            n_bad, n_bad == 0, "" if n_bad == 0 else f"{n_bad} indices differ")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    if np.isnan(y64).any():
        return PointMetrics(name, shape, math.inf, math.inf, math.nan, int(np.isnan(y64).sum()), False, "NaN in C++ value")
    x_masked = ~np.isfinite(x64) | (x64 <= MASKED_BELOW)
    y_masked = ~np.isfinite(y64) | (y64 <= MASKED_BELOW)
    class_mismatch = (x_masked != y_masked) | (x_masked & np.isinf(x64) & (x64 != y64) & np.isinf(y64))
    live = ~x_masked & ~y_masked
    xs, ys = x64[live], y64[live]
    diff = ys - xs
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    norm_x, norm_y, norm_d = (float(np.linalg.norm(v)) for v in (xs, ys, diff))
    rel_l2 = norm_d / norm_x if norm_x > 0 else (0.0 if norm_d == 0 else math.inf)
    cosine = float(xs @ ys) / (norm_x * norm_y) if norm_x > 0 and norm_y > 0 else (1.0 if norm_x == norm_y == 0 else 0.0)
    n_bad = int((np.abs(diff) > tol.atol + tol.rtol * np.abs(xs)).sum()) + int(class_mismatch.sum())
    note = ""
    if class_mismatch.any():
        max_abs, rel_l2 = math.inf, math.inf
        note = f"{int(class_mismatch.sum())} elements masked on one side only"
    agrees = not class_mismatch.any() and (rel_l2 <= tol.rel_l2 or max_abs <= tol.abs)
    return PointMetrics(name, shape, max_abs, rel_l2, cosine, n_bad, agrees, note)


def compare_traces(reference: dict[str, np.ndarray], native: dict[str, np.ndarray],
                   tol: Tolerance = Tolerance()) -> Comparison:
    """Every reference point, in forward order; extra C++ points are reported at the end."""
    points = [point_metrics(name, x, native.get(name), tol) for name, x in reference.items()]
    for name in native:
        if name not in reference:
            points.append(PointMetrics(name, tuple(native[name].shape), math.inf, math.inf, math.nan, 0, False,
                                       "not a reference trace point"))
    return Comparison(points, tol)


def compare(model, native=None, tol: Tolerance = Tolerance()) -> Comparison:
    """Run the reference and the C++ forward (a NativeEngine; default: this project's cpp/) on
    ``model`` with tracing on, and compare every trace point."""
    from .native import load_native
    from .reference import reference_forward

    native = native or load_native()
    ref = reference_forward(model, trace=True)
    cpp = native.forward(model, trace=True)
    return compare_traces(ref.trace, cpp.trace, tol)
