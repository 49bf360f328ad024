"""The error metrics of a comparison and the constants of its tolerance (compare.py's docstring
explains them). Numbers only: no engine, no report. The constants are the defaults of
tolerances.Tolerances, the rule as a value; compare.py re-exports every name here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS32 = 2.0**-24
MIN_FLOOR = 4 * EPS32
FACTOR = 10.0
ABS_FLOOR = 1e-7
AMPLIFY = 2.0
MASKED_BELOW = -1e8
# Points inside the attention, which a kernel set may fuse and not expose (its taps unused).
FUSABLE = ("self_attn.scores", "self_attn.probs")


# ---- metrics ------------------------------------------------------------------------------------
@dataclass
class Errors:
    max_abs: float
    rel_l2: float
    sqnr_db: float
    cosine: float
    class_mismatch: int  # elements masked on one side only
    nan: int  # NaN or Inf in y where x is finite


def live_rows(array: np.ndarray, token_axis: int, mask: np.ndarray) -> np.ndarray:
    """The values at real token positions, as [rows, rest] (token axis moved next to batch). A token
    axis shorter than the mask holds the last positions (logits of a forward that kept the last L)."""
    moved = np.moveaxis(array, token_axis, 1)
    if moved.shape[1] < mask.shape[1]:
        mask = mask[:, mask.shape[1] - moved.shape[1] :]
    return moved[mask.astype(bool)].reshape(int(mask.sum()), -1)


def errors(x: np.ndarray, y: np.ndarray) -> Errors:
    """Metrics of y against x, both float arrays of one shape (masked scores by class)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    x_masked = np.isneginf(x) | (x <= MASKED_BELOW)
    y_masked = np.isneginf(y) | (y <= MASKED_BELOW)
    nan = int((np.isnan(y) | np.isposinf(y) | (np.isneginf(y) & ~x_masked)).sum())
    mismatch = int((x_masked != y_masked).sum())
    live = ~x_masked & ~y_masked & np.isfinite(y)
    xs, ys = x[live], y[live]
    d = ys - xs
    nx, ny, nd = (float(np.linalg.norm(v)) for v in (xs, ys, d))
    max_abs = float(np.abs(d).max()) if d.size else 0.0
    rel = nd / nx if nx > 0 else (0.0 if nd == 0 else math.inf)
    sqnr = 10 * math.log10(nx**2 / nd**2) if nd > 0 and nx > 0 else (math.inf if nd == 0 else -math.inf)
    cosine = float(xs @ ys) / (nx * ny) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
    if nan or mismatch:
        max_abs, rel, sqnr = math.inf, math.inf, -math.inf
    return Errors(max_abs, rel, sqnr, cosine, mismatch, nan)


def kl_per_token(x_logits: np.ndarray, y_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(x) || softmax(y)) per token, in nats, float64."""

    def log_softmax(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64)
        v = v - v.max(-1, keepdims=True)
        return v - np.log(np.exp(v).sum(-1, keepdims=True))

    lx, ly = log_softmax(x_logits), log_softmax(y_logits)
    return (np.exp(lx) * (lx - ly)).sum(-1)
