"""One trace contract on both sides: trace.py's POINTS, the generated C++ header, and what each
forward records.

(a) cpp/include/celerinfer/trace_points.hpp is exactly what cpp_tables generates from POINTS (a
    changed table makes it stale);
(b) every engine — the PyTorch reference and each registered C++ kernel set — records exactly
    trace_points' names, in order, with its shapes: dense, qk_norm and MoE with shared experts,
    the prefill and decode steps (past_len > 0), and with a bf16 KV cache (the k_cached / v_cached
    points). A planted shape or a missing point is reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import edit_file, small_model

from celerinfer_lab import cpp_tables, trace
from celerinfer_lab.native import load_native
from celerinfer_lab.reference import ReferenceModel, decode_steps
from celerinfer_lab.trace import trace_points

VARIANTS = {
    "dense": {},
    "qk_norm": dict(qk_norm=True),
    "moe_shared": dict(use_moe=True, num_experts=3, num_experts_per_tok=2, n_shared_experts=2),
}
FEED = np.array([[3, 5], [7, 11]], np.int64)  # two decode steps after the prompt


def trace_mismatches(
    traces: list[dict[str, np.ndarray]], config, batch: int, prompt_len: int, kv_cache: str = "f32"
) -> list[str]:
    """How each forward's trace (the prefill, then one token per step) departs from trace_points."""
    problems, past, new = [], 0, prompt_len
    for step, recorded in enumerate(traces):
        expected = {p.name: p.shape for p in trace_points(config, batch, new, past, kv_cache)}
        if list(recorded) != list(expected):
            missing = [n for n in expected if n not in recorded]
            extra = [n for n in recorded if n not in expected]
            problems.append(f"step {step}: names differ (missing {missing}, extra {extra}, or out of order)")
        for name, shape in expected.items():
            if name in recorded and recorded[name].shape != shape:
                problems.append(f"step {step}: {name} has shape {recorded[name].shape}, the contract says {shape}")
        past, new = past + new, 1
    return problems


def native_traces(engine, model, kernels: str, kv_cache: str = "f32") -> list[dict[str, np.ndarray]]:
    return [r.trace for r in engine.prepare(model, kernels, kv_cache).decode_steps(FEED, trace=True)]


def reference_traces(model, kv_cache: str = "f32") -> list[dict[str, np.ndarray]]:
    ref = ReferenceModel(model, kv_cache=kv_cache)
    steps = decode_steps(ref, model.input_ids, model.attention_mask, FEED, trace=True)
    return [points for _, points in steps]


def test_committed_header_is_the_generators_output():
    assert cpp_tables.stale_headers() == [], "run `python -m celerinfer_lab.cpp_tables` and commit the headers"


def test_a_changed_table_makes_the_header_stale(monkeypatch):
    changed = tuple(
        dataclasses.replace(spec, shape=("B", "S", "nh*hd")) if spec.id == "rope_q" else spec for spec in trace.POINTS
    )
    monkeypatch.setattr(trace, "POINTS", changed)
    assert cpp_tables.stale_headers() == ["trace_points.hpp"]


def test_point_members_are_the_table_rows():
    """Point (spelled out for the type checker) lists POINTS' ids in order; a row without a member,
    or two members in the other order, is reported."""
    assert trace.members_out_of_step(trace.POINTS, list(trace.Point)) == []
    extra = dataclasses.replace(trace.POINTS[0], id="new_point")
    assert trace.members_out_of_step((*trace.POINTS, extra), list(trace.Point))
    swapped = [trace.Point.q_proj, trace.Point.embed_tokens, *list(trace.Point)[2:]]
    assert trace.members_out_of_step(trace.POINTS, swapped)


def test_a_forward_without_trace_has_no_points():
    """ForwardResult.points: the trace of a traced forward; asking an untraced one is a clear error."""
    assert list(trace.ForwardResult(np.zeros(1), {"lm_head": np.zeros(1)}).points) == ["lm_head"]
    with pytest.raises(ValueError, match="recorded no trace"):
        trace.ForwardResult(np.zeros(1), None).points


def test_main_writes_every_generated_header(tmp_path):
    (tmp_path / "include" / "celerinfer").mkdir(parents=True)
    assert cpp_tables.stale_headers(tmp_path) == list(cpp_tables.GENERATED)
    cpp_tables.main(tmp_path)
    assert cpp_tables.stale_headers(tmp_path) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_records_exactly_the_contract(variant):
    model = small_model(batch_size=2, seq_len=5, **VARIANTS[variant])
    assert trace_mismatches(reference_traces(model), model.config, 2, 5) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_kernel_set_records_exactly_the_contract(native, variant):
    model = small_model(batch_size=2, seq_len=5, **VARIANTS[variant])
    assert native.kernel_sets == ["readable", "fast", "readable-bf16", "readable-q8", "bf16", "q8"]
    for kernels in native.kernel_sets:
        assert trace_mismatches(native_traces(native, model, kernels), model.config, 2, 5) == [], kernels


def test_a_bf16_kv_cache_records_the_cache_points_on_both_sides(native):
    """kv_cache="bf16" adds self_attn.k_cached and v_cached after rope_k, on the reference and every
    kernel set; the default (f32) trace has neither (checked by the tests above and here)."""
    model = small_model(batch_size=2, seq_len=5, qk_norm=True)
    names = [p.name for p in trace_points(model.config, 2, 5, kv_cache="bf16")]
    at = names.index("model.layers.0.self_attn.rope_k")
    assert names[at + 1 : at + 3] == ["model.layers.0.self_attn.k_cached", "model.layers.0.self_attn.v_cached"]
    assert not any("_cached" in p.name for p in trace_points(model.config, 2, 5))
    assert trace_mismatches(reference_traces(model, "bf16"), model.config, 2, 5, "bf16") == []
    for kernels in native.kernel_sets:
        assert trace_mismatches(native_traces(native, model, kernels, "bf16"), model.config, 2, 5, "bf16") == []
    # the default trace against the bf16 contract: the cache points are missing
    assert any(
        "missing" in p for p in trace_mismatches(native_traces(native, model, "fast"), model.config, 2, 5, "bf16")
    )


def test_a_planted_shape_and_a_missing_point_are_reported(cpp_copy):
    include = cpp_copy / "include" / "celerinfer"
    edit_file(
        include / "trace_points.hpp",
        "case Point::rope_q: return {d.B, d.S, d.config.heads, d.config.head_dim};",
        "case Point::rope_q: return {d.B, d.S, d.config.heads * d.config.head_dim};",
    )
    edit_file(include / "forward.hpp", "    trace_point(trace, layer, Point::act, ws.act.data(), dims);\n", "")
    model = small_model(batch_size=2, seq_len=5)
    problems = trace_mismatches(native_traces(load_native(cpp_copy), model, "readable"), model.config, 2, 5)
    assert "step 0: model.layers.0.self_attn.rope_q has shape (2, 5, 64), the contract says (2, 5, 8, 8)" in problems
    assert "step 2: model.layers.1.self_attn.rope_q has shape (2, 1, 64), the contract says (2, 1, 8, 8)" in problems
    assert any("missing ['model.layers.0.mlp.act', 'model.layers.1.mlp.act']" in p for p in problems)
