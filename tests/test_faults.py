"""The fault catalogue against the debugger.

Every fault applies to the current C++ (each edit's `old` text occurs exactly once); for each kernel
set a fault changes, the debugger names the declared culprit (op and layer) at the declared step,
earlier steps agree, and the diagnosis holds the declared words; the sets it does not change agree.
One compile per fault (cached below), on the smallest model and inputs that expose it (fault.model,
fault.inputs; default: batch 2, 8 tokens, no padding).
"""

import pytest
from conftest import small_model

from celerinfer_lab.compare import compare, compare_decode
from celerinfer_lab.faults import BOTH, CATALOGUE, FAULTS, REDUCED, apply_fault, why_it_cannot_show
from celerinfer_lab.native import DEFAULT_CPP_DIR, load_native

KERNEL_SETS = ("readable", "fast")
_engines: dict = {}


def engine(name: str):
    """The C++ with fault `name` applied, compiled once for this file."""
    if name not in _engines:
        _engines[name] = load_native(fault=name)
    return _engines[name]


def exposing_model(fault):
    return small_model(**{"batch_size": 2, "seq_len": 8, **fault.inputs}, **fault.model)


def run(fault, kernels: str):
    """The reports up to the fault's step: [prefill] or [prefill, step 1, ...]."""
    model = exposing_model(fault)
    if fault.step:
        return compare_decode(model, engine(fault.name), steps=fault.step, kernels=kernels, kv_cache=fault.kv_cache)
    return [compare(model, engine(fault.name), kernels=kernels, kv_cache=fault.kv_cache)]


def test_catalogue_size_and_diagnosis_coverage():
    assert len(CATALOGUE) >= 30 and len(FAULTS) == len(CATALOGUE)
    diagnosed = [f.name for f in CATALOGUE if f.diagnosis]
    assert len(diagnosed) >= 0.8 * len(CATALOGUE), f"{len(diagnosed)} of {len(CATALOGUE)} declare a diagnosis"
    assert sum(f.kernels == ("fast",) for f in CATALOGUE) >= 8  # bugs only the fast kernels can have
    assert sum(f.step > 0 for f in CATALOGUE) >= 3  # decode-only bugs
    assert all(set(f.kernels) <= set(KERNEL_SETS + REDUCED) and f.kernels for f in CATALOGUE)
    assert sum(set(f.kernels) <= set(REDUCED) for f in CATALOGUE) >= 3  # bugs only the bf16/q8 kernels can have


def test_every_fault_applies_to_the_current_sources(tmp_path):
    include = DEFAULT_CPP_DIR / "include" / "celerinfer"
    for fault in CATALOGUE:
        for edit in fault.edits:
            assert (include / edit.file).read_text().count(edit.old) == 1, (fault.name, edit.old)
        copy = apply_fault(fault, DEFAULT_CPP_DIR, tmp_path / fault.name)  # raises unless each `old` occurs once
        for edit in fault.edits:
            assert edit.new in (copy / "include" / "celerinfer" / edit.file).read_text(), fault.name


def test_declared_kernel_sets_follow_the_edited_files():
    """The forward body and the model are shared: both sets; fast.hpp and readable.hpp are one set each
    (ops.hpp holds both kinds: the agreement test below checks those)."""
    for fault in CATALOGUE:
        files = {edit.file for edit in fault.edits}
        if files & {"forward.hpp", "model.hpp"}:
            assert fault.kernels == BOTH, fault.name
        if "fast.hpp" in files:
            assert fault.kernels == ("fast",), fault.name
        if "readable.hpp" in files:
            assert fault.kernels == ("readable",), fault.name
        if "reduced.hpp" in files:
            assert set(fault.kernels) <= set(REDUCED), fault.name


@pytest.mark.parametrize("name,kernels", [(f.name, k) for f in CATALOGUE for k in f.kernels])
def test_fault_is_localized_and_diagnosed(name, kernels):
    fault = FAULTS[name]
    reports = run(fault, kernels)
    *earlier, report = reports
    for step, r in enumerate(earlier):
        assert r.agrees, f"{name} already shows at step {step}, declared at step {fault.step}:\n{r.to_text()}"
    assert not report.agrees
    assert report.culprit is not None and report.culprit.name == fault.culprit, report.to_text()
    if fault.diagnosis:
        assert report.diagnosis and fault.diagnosis in report.diagnosis, report.diagnosis
    at = report.points.index(report.culprit)
    assert all(p.label in ("ok", "not observed") for p in report.points[:at])
    assert {p.label for p in report.points[at + 1 :] if p.diverges} <= {"propagated", "amplified", "own error"}


@pytest.mark.parametrize("name,kernels", [(f.name, k) for f in CATALOGUE for k in KERNEL_SETS if k not in f.kernels])
def test_fault_leaves_the_other_kernel_set_alone(name, kernels):
    for step, report in enumerate(run(FAULTS[name], kernels)):
        assert report.agrees, f"{name} changes the {kernels} kernels too (step {step}):\n{report.to_text()}"


def test_a_cache_fault_shows_only_with_the_bf16_cache():
    """kv_bf16_truncation edits the bf16 rounding: the default float32 cache never runs it (agrees),
    the bf16 cache shows it in the accumulated run too, and the refusal names --kv-cache bf16."""
    fault = FAULTS["kv_bf16_truncation"]
    model = exposing_model(fault)
    assert compare(model, engine(fault.name), kernels="fast").agrees
    report = compare(model, engine(fault.name), kernels="fast", kv_cache="bf16", precision="off")
    assert report.point(fault.culprit).diverges and report.point(fault.culprit).own_diverges
    assert "rounding" in report.diagnosis
    assert why_it_cannot_show(fault, model.config, model.attention_mask) == [
        "the KV cache is f32, the fault is in the bf16 cache: --kv-cache bf16"
    ]
    assert why_it_cannot_show(fault, model.config, model.attention_mask, "bf16") == []
