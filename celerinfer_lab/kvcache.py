"""The KV cache's number format, and the rule that judges a bf16 cache.

``kv_cache="f32"`` (the default) keeps every key and value as computed. ``kv_cache="bf16"`` rounds
each new key (after RoPE) and value to bfloat16 as it joins the cache, round to nearest even, NaN
and infinity kept: the C++ (``round_to_bf16`` in ops.hpp, called in forward.hpp where the new K/V
are stored, for every kernel set) and the reference (reference.py) alike. The rounded values are
the trace points ``self_attn.k_cached`` / ``self_attn.v_cached``. The cache is still a float32
buffer holding bf16 values: the memory is not halved yet.

**The rounding point.** Both sides round a float32 value: the oracle rounds its float64 value to
float32 first (``round_bf16``), so in a teacher-forced run, where every side rounds the teacher's
float32 value, all agree bit for bit. In a run that accumulates, the float32 C++ and the float64
oracle reach a cache point with slightly different values, and near a bf16 midpoint they may
legitimately round to different neighbours (one element in ~10^4 to 10^5); one such flip moves the
scores and the context far beyond float32's floors. So the cache is judged as a rounding point:
the C++'s cached value y is *admissible* when it is RNE of the oracle's value x, or the other bf16
neighbour of x where x lies within ``slack`` of the midpoint between the two (``admissible``);
``slack`` is, per element, the larger of the C++'s own error before rounding |y_pre - x| (its value
and the oracle's straddle the midpoint) and the pre-rounding point's absolute tolerance. The
accumulated oracle then continues from the C++'s admissible choices (``adopt``), and so does the
float32 reference whose error sets the floors: every flip the C++ was entitled to make is taken by
all three, every other one shows as an error at the cache point.
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError

KV_CACHE_FORMATS = ("f32", "bf16")
# A cache point (its name in a layer) and the point before its rounding; both traced on each side.
CACHE_PRE = {"self_attn.k_cached": "self_attn.rope_k", "self_attn.v_cached": "self_attn.v_proj"}


def check_kv_cache(kv_cache: object) -> str:
    """``kv_cache`` when it names a KV cache format, else a UsageError naming the formats."""
    if not isinstance(kv_cache, str) or kv_cache not in KV_CACHE_FORMATS:
        raise UsageError(f"kv_cache={kv_cache!r}: one of {', '.join(KV_CACHE_FORMATS)}")
    return kv_cache


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to float32, then to bfloat16 (nearest, ties to even), in x's dtype (float32 or
    float64; exact in both). NaN stays NaN, infinity stays infinity, a finite value beyond bf16's
    range becomes infinity: what ``round_to_bf16`` in ops.hpp does to a float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = np.where(nan, u | 0x00400000, u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32).reshape(np.shape(x))
    return out.astype(np.asarray(x).dtype, copy=False)


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two bf16 values around float32(x) (toward zero, away from zero) and the midpoint between
    them (exact in float32), each float64."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    low = u & np.uint32(0xFFFF0000)
    toward = low.view(np.float32).astype(np.float64)
    away = (low + np.uint32(0x10000)).view(np.float32).astype(np.float64)
    middle = (low | np.uint32(0x8000)).view(np.float32).astype(np.float64)
    return toward, away, middle


def admissible(x: np.ndarray, y: np.ndarray, slack: np.ndarray | float) -> np.ndarray:
    """Where the cached value y is an admissible rounding of the oracle's pre-rounding value x: RNE
    of x, or x's other bf16 neighbour where |x - midpoint| <= slack (elementwise, broadcast)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    rne = round_bf16(x)
    with np.errstate(invalid="ignore", over="ignore"):
        toward, away, middle = _neighbours(x)
        other = np.where(rne == toward, away, toward)
        flip = (y == other) & (np.abs(x - middle) <= slack) & np.isfinite(x)
    return (y == rne) | (np.isnan(y) & np.isnan(rne)) | flip


def adopt(x: np.ndarray, y: np.ndarray, y_pre: np.ndarray, abs_tol: float) -> np.ndarray:
    """The cache values an oracle continues from: the C++'s y where admissible (slack: the larger of
    |y_pre - x| and ``abs_tol``, see the module docstring), else x's own RNE."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(x.shape)
    with np.errstate(invalid="ignore"):
        slack = np.maximum(np.abs(np.asarray(y_pre, dtype=np.float64).reshape(x.shape) - x), abs_tol)
    return np.where(admissible(x, y, np.nan_to_num(slack, nan=0.0)), y, round_bf16(x))
