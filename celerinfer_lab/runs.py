"""The traced runs a Report is built from, each a dict trace point -> array:

    oracle     the reference in float64
    ref32      the float32 baseline whose error sets the floors (the reference, or the readable C++)
    ref32_own  the same, teacher forced on the oracle (the isolated floors)
    cpp        the C++ with one kernel set
    cpp_own    the same, teacher forced on the oracle (each op's own error)

Every run of one comparison sees the same weights: a bf16/q8 kernel set runs on ``model.as_format``
of its format, and so do the oracle and the floors (the precision-matched oracle: float64 on the
decoded weights), so a difference is the kernel's, never the quantization's.

Running is kept apart from judging (report.py), as Polygraphy keeps Comparator.run apart from
compare_accuracy: the engine is an argument (``native``: a NativeEngine) and nothing here compares."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:  # the engines load when runs are made, not when a Report is read
    from .modelfile import Model
    from .native import NativeEngine

Runs = dict[str, dict[str, np.ndarray]]


def teacher_from(oracle: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The oracle's values as float32: what a teacher-forced run is fed."""
    return {k: v.astype(np.float32) for k, v in oracle.items()}


def reference_runs(model: Model) -> Runs:
    """The runs every comparison shares: the float64 oracle and the float32 reference, plain
    (ref32) and teacher-forced (ref32_own), whose errors against the oracle set the floors."""
    import torch  # here: a Report is read without torch

    from .reference import reference_forward

    oracle = reference_forward(model, dtype=torch.float64, trace=True).points
    return {
        "oracle": oracle,
        "ref32": reference_forward(model, trace=True).points,
        "ref32_own": reference_forward(model, trace=True, teacher=teacher_from(oracle)).points,
    }


def kernel_runs(model: Model, native: NativeEngine, kernels: str, oracle: dict[str, np.ndarray]) -> Runs:
    """One kernel set's two traced runs: plain (cpp) and teacher-forced on the oracle (cpp_own)."""
    prepared = native.prepare(model, kernels)  # bound (and packed) once for both runs
    return {
        "cpp": prepared.forward(trace=True).points,
        "cpp_own": prepared.forward(teacher=teacher_from(oracle)).points,
    }


def model_for(model: Model, native: NativeEngine, kernels: str) -> Model:
    """``model`` in the weight format kernel set ``kernels`` reads (what NativeEngine.prepare binds)."""
    return model.as_format(native.kernel_format(kernels))


def floor_runs(model: Model, native: NativeEngine, baseline: str = "torch") -> Runs:
    """reference_runs, with the floors from the readable C++ instead when baseline="readable" (for
    a bf16/q8 model, the readable set of its format: "readable-bf16", "readable-q8")."""
    if baseline not in ("torch", "readable"):
        raise UsageError(f"baseline={baseline!r}: 'torch' or 'readable'")
    runs = reference_runs(model)
    if baseline == "readable":
        name = "readable" if model.weight_format == "f32" else f"readable-{model.weight_format}"
        readable = kernel_runs(model, native, native.check_kernels(name), runs["oracle"])
        runs.update(ref32=readable["cpp"], ref32_own=readable["cpp_own"])
    return runs


def run_all(model: Model, native: NativeEngine, kernels: str | None = None, baseline: str = "torch") -> Runs:
    """The five runs a report needs: oracle (float64), ref32, ref32_own (the baseline whose error
    sets the floors: the float32 reference, or the readable C++ with baseline="readable"), cpp,
    cpp_own (the C++ with ``kernels``), all on ``model`` in the format ``kernels`` reads."""
    kernels = kernels or native.kernels
    model = model_for(model, native, kernels)
    runs = floor_runs(model, native, baseline)
    return {**runs, **kernel_runs(model, native, kernels, runs["oracle"])}
