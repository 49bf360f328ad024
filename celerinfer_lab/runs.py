"""The traced runs a Report is built from, each a dict trace point -> array:

    oracle     the reference in float64
    ref32      the float32 baseline whose error sets the floors (the reference, or the readable C++)
    ref32_own  the same, teacher forced on the oracle (the isolated floors)
    cpp        the C++ with one kernel set
    cpp_own    the same, teacher forced on the oracle (each op's own error)
    oracle_acc with a bf16 KV cache only: the oracle continued from the C++'s admissible cache
               roundings (kvcache.py), what cpp and ref32 (which adopts them too) are measured against

Every run of one comparison sees the same weights: a bf16/q8 kernel set runs on ``model.as_format``
of its format, and so do the oracle and the floors (the precision-matched oracle: float64 on the
decoded weights), so a difference is the kernel's, never the quantization's.

Running is kept apart from judging (report.py), as Polygraphy keeps Comparator.run apart from
compare_accuracy: the engine is an argument (``native``: a NativeEngine) and nothing here compares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from . import kvcache
from .errors import UsageError
from .kvcache import CACHE_PRE, check_kv_cache
from .metrics import FACTOR, MIN_FLOOR

if TYPE_CHECKING:  # the engines load when runs are made, not when a Report is read
    from .modelfile import Model
    from .native import NativeEngine

Runs = dict[str, dict[str, np.ndarray]]


def teacher_from(oracle: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The oracle's values as float32: what a teacher-forced run is fed."""
    return {k: v.astype(np.float32) for k, v in oracle.items()}


def reference_runs(model: Model, kv_cache: str = "f32") -> Runs:
    """The runs every comparison shares: the float64 oracle and the float32 reference, plain
    (ref32) and teacher-forced (ref32_own), whose errors against the oracle set the floors.
    With kv_cache="bf16", kernel_runs replaces ref32 by one that adopts the C++'s cache roundings."""
    import torch  # here: a Report is read without torch

    from .reference import reference_forward

    oracle = reference_forward(model, dtype=torch.float64, trace=True, kv_cache=kv_cache).points
    return {
        "oracle": oracle,
        "ref32": reference_forward(model, trace=True, kv_cache=kv_cache).points,
        "ref32_own": reference_forward(model, trace=True, teacher=teacher_from(oracle), kv_cache=kv_cache).points,
    }


def cache_adopter(cpp: dict[str, np.ndarray], oracle: dict[str, np.ndarray]) -> Callable:
    """The choice a reference run makes at each bf16 cache point: the C++'s cached value where it is
    an admissible rounding of the run's own value x (kvcache.adopt: RNE of x, or its other neighbour
    where x lies within max(|C++ pre-rounding value - x|, the pre point's abs_tol) of the midpoint),
    else x's own RNE. abs_tol is the tolerance rule's, FACTOR * MIN_FLOOR * RMS, the RMS of the
    plain oracle's pre-rounding point."""

    def choose(name: str, pre: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        suffix = ".".join(name.split(".")[3:])
        pre_name = name[: -len(suffix)] + CACHE_PRE[suffix]
        y, y_pre = cpp.get(name), cpp.get(pre_name)
        if y is None or y_pre is None or y.size != pre.size or y_pre.size != pre.size:
            return rounded  # the C++ did not trace it (or traced another shape): the report says so
        reference = np.asarray(oracle[pre_name], np.float64)
        finite = reference[np.isfinite(reference)]
        abs_tol = FACTOR * MIN_FLOOR * float(np.sqrt(np.mean(finite * finite))) if finite.size else 0.0
        return kvcache.adopt(pre, y, y_pre, abs_tol).astype(pre.dtype)

    return choose


def rounding_point_runs(model: Model, cpp: dict[str, np.ndarray], oracle: dict[str, np.ndarray]) -> Runs:
    """With a bf16 KV cache: the oracle (float64) and the float32 reference, each continued from the
    C++'s admissible cache roundings (cache_adopter): oracle_acc and ref32."""
    import torch

    from .reference import reference_forward

    choose = cache_adopter(cpp, oracle)
    return {
        "oracle_acc": reference_forward(model, torch.float64, trace=True, kv_cache="bf16", adopt=choose).points,
        "ref32": reference_forward(model, trace=True, kv_cache="bf16", adopt=choose).points,
    }


def kernel_runs(
    model: Model, native: NativeEngine, kernels: str, oracle: dict[str, np.ndarray], kv_cache: str = "f32"
) -> Runs:
    """One kernel set's two traced runs: plain (cpp) and teacher-forced on the oracle (cpp_own); with
    kv_cache="bf16" also the reference runs continued from its cache roundings (rounding_point_runs)."""
    prepared = native.prepare(model, kernels, kv_cache)  # bound (and packed) once for both runs
    runs = {
        "cpp": prepared.forward(trace=True).points,
        "cpp_own": prepared.forward(teacher=teacher_from(oracle)).points,
    }
    if check_kv_cache(kv_cache) == "bf16":
        runs.update(rounding_point_runs(model, runs["cpp"], oracle))
    return runs


def model_for(model: Model, native: NativeEngine, kernels: str) -> Model:
    """``model`` in the weight format kernel set ``kernels`` reads (what NativeEngine.prepare binds)."""
    return model.as_format(native.kernel_format(kernels))


def floor_runs(model: Model, native: NativeEngine, baseline: str = "torch", kv_cache: str = "f32") -> Runs:
    """reference_runs, with the floors from the readable C++ instead when baseline="readable" (for
    a bf16/q8 model, the readable set of its format: "readable-bf16", "readable-q8")."""
    if baseline not in ("torch", "readable"):
        raise UsageError(f"baseline={baseline!r}: 'torch' or 'readable'")
    if baseline == "readable" and check_kv_cache(kv_cache) != "f32":
        raise UsageError(
            "baseline='readable' with kv_cache='bf16' is not supported: the readable C++ cannot adopt the "
            "C++'s cache roundings (use the default baseline='torch')"
        )
    runs = reference_runs(model, kv_cache)
    if baseline == "readable":
        name = "readable" if model.weight_format == "f32" else f"readable-{model.weight_format}"
        readable = kernel_runs(model, native, native.check_kernels(name), runs["oracle"])
        runs.update(ref32=readable["cpp"], ref32_own=readable["cpp_own"])
    return runs


def run_all(
    model: Model, native: NativeEngine, kernels: str | None = None, baseline: str = "torch", kv_cache: str = "f32"
) -> Runs:
    """The five runs a report needs: oracle (float64), ref32, ref32_own (the baseline whose error
    sets the floors: the float32 reference, or the readable C++ with baseline="readable"), cpp,
    cpp_own (the C++ with ``kernels``), all on ``model`` in the format ``kernels`` reads (and, with
    kv_cache="bf16", oracle_acc)."""
    kernels = kernels or native.kernels
    model = model_for(model, native, kernels)
    runs = floor_runs(model, native, baseline, kv_cache)
    return {**runs, **kernel_runs(model, native, kernels, runs["oracle"], kv_cache)}
