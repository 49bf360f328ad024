"""The C++ forward through cppyy equals the PyTorch reference at every trace point."""

import numpy as np
import pytest
from conftest import edit_file, small_model
from hypothesis import HealthCheck, given, settings

from celerinfer_lab import ConfigError, load_model, reference_forward
from celerinfer_lab.compare import compare
from celerinfer_lab.native import NativeCompileError, NativeError, load_native
from celerinfer_lab.testing import model_cases

# float32 agreement, stated: at every trace point, accumulated and isolated, the C++ error against
# the float64 oracle is within 10x the float32 reference's own (compare.py); and logits relative L2
# against the float32 reference <= 1e-5.
LOGITS_REL_L2 = 1e-5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=model_cases())
def test_cpp_equals_reference_at_every_trace_point(native, model):
    report = compare(model, native)
    assert report.agrees, report.to_text()
    cpp, ref = native.forward(model).logits, reference_forward(model).logits
    assert np.linalg.norm(cpp - ref) / np.linalg.norm(ref) <= LOGITS_REL_L2


def test_reproduces_original_fixture(native, v0_dir):
    logits = native.forward(load_model(v0_dir / "minimind.json")).logits
    np.testing.assert_allclose(logits, np.load(v0_dir / "logits_torch.npy"), rtol=0, atol=1e-5)


def test_trace_names_and_shapes_match_reference(native):
    model = small_model(qk_norm=True, use_moe=True, num_experts=3, num_experts_per_tok=2, n_shared_experts=1)
    cpp, ref = native.forward(model, trace=True).trace, reference_forward(model, trace=True).trace
    assert list(cpp) == list(ref)
    assert all(cpp[k].shape == ref[k].shape and cpp[k].dtype == ref[k].dtype for k in ref)
    assert native.forward(model).trace is None


def test_forward_that_writes_nothing_fails(cpp_copy):
    """The original tool's bug, all-zero logits: the output buffer is never written."""
    edit_file(
        cpp_copy / "include/celerinfer/forward.hpp", "lm_head_kept(K, logits, x, m.head(), B, S, L, H, c.vocab);", ""
    )
    broken = load_native(cpp_copy, kernels="readable")
    model = small_model()
    assert np.isnan(broken.forward(model).logits).all()  # unwritten output is NaN, never plausible zeros
    report = compare(model, broken)
    assert not report.agrees and report.first_divergent.name == "lm_head"


def test_bad_inputs_raise_before_any_call(native):
    model = small_model()
    nm = native.prepare(model)
    ids = model.input_ids
    with pytest.raises(ValueError, match=r"input_ids has shape \[7\], expected \[batch >= 1, seq_len >= 1\]"):
        nm.forward(ids[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        nm.forward(ids, np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nm.forward(ids + 1000)
    with pytest.raises(TypeError, match="must be integers"):
        nm.forward(ids.astype(np.float32))
    with pytest.raises(ValueError, match="only 0 and 1"):
        nm.forward(ids, np.full_like(ids, 3))
    with pytest.raises(ConfigError, match="longer than max_position_embeddings"):
        nm.forward(np.zeros((1, 129), dtype=np.int64))
    assert np.isfinite(nm.forward(ids[:, :3], model.attention_mask[:, :3]).logits).all()


def test_wrong_weight_shape_is_named(native):
    model = small_model()
    model.weights["model.layers.1.mlp.up_proj.weight"] = model.weights["model.layers.1.mlp.up_proj.weight"].T.copy()
    with pytest.raises(
        NativeError,
        match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \[64, 256\], the config implies \[256, 64\]",
    ):
        native.prepare(model)
    del model.weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(NativeError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        native.prepare(model)


def test_cpp_exception_becomes_python_exception(native):
    nm = native.prepare(small_model())
    ids = nm.model.input_ids.copy()
    ids[0, 0] = 10_000  # bypass the Python checks: the C++ check must still refuse it
    with pytest.raises(NativeError, match="outside the vocabulary"):
        nm.run(ids, nm.model.attention_mask, np.zeros((2, 7, 128), dtype=np.float32))


def test_users_copy_and_reload(cpp_copy):
    model = small_model()
    engine = load_native(cpp_copy, kernels="readable")  # the edit below is in the readable kernels
    assert compare(model, engine).agrees
    first = engine.namespace
    ops = cpp_copy / "include/celerinfer/ops.hpp"
    edit_file(ops, "return x / (1.0f + std::exp(-x));", "return x / (1.0f + std::exp(x));")  # a wrong SiLU
    engine.reload()
    assert engine.namespace != first
    report = compare(model, engine)
    assert report.first_divergent.name == "model.layers.0.mlp.act"
    edit_file(ops, "inline float silu(float x) {", "inline float silu(float x) { syntax error here")
    with pytest.raises(NativeCompileError, match="error"):
        engine.reload()
    assert compare(model, engine).first_divergent.name == "model.layers.0.mlp.act"  # the last good version runs
    edit_file(ops, "inline float silu(float x) { syntax error here", "inline float silu(float x) {")
    edit_file(ops, "return x / (1.0f + std::exp(x));", "return x / (1.0f + std::exp(-x));")
    engine.reload()
    assert compare(model, engine).agrees


def test_missing_header_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no celerinfer/celerinfer.hpp"):
        load_native(tmp_path)


def test_arrays_and_model_files_are_checked_by_one_rule(native):
    """NativeModel.check_inputs and a model file's check say the same thing about the same inputs."""
    from celerinfer_lab.errors import ModelFileError, UsageError
    from celerinfer_lab.modelfile import check_input_values

    model = small_model()
    for ids, mask in (
        (np.where(model.input_ids == model.input_ids[0, 1], 999, model.input_ids), model.attention_mask),
        (model.input_ids, np.full_like(model.attention_mask, 2)),
        (model.input_ids[:, :3], model.attention_mask),
    ):
        with pytest.raises(UsageError) as from_arrays:
            native.prepare(model).check_inputs(ids, mask)
        bad = small_model()
        bad.input_ids, bad.attention_mask = ids, mask
        with pytest.raises(ModelFileError) as from_file:
            check_input_values(bad, "m.json")
        assert str(from_file.value) == f"m.json: {from_arrays.value}"


def test_a_repeated_run_reuses_its_bound_call_and_reads_the_arrays_anew(native):
    """NativeModel.run binds its arguments once in C++ (BoundForward) and reuses that call while the
    same arrays come back: values written into them in place are read anew, other arrays or another
    logits_to_keep get a call of their own."""
    model = small_model(batch_size=2, seq_len=5)
    prepared = native.prepare(model, "fast")
    ids, mask = (a.copy() for a in prepared.check_inputs(None, None))  # the model's own arrays stay as they are
    logits = np.zeros((2, 5, 128), np.float32)
    prepared.run(ids, mask, logits)
    first = logits.copy()
    assert prepared._bound[1] is None  # a first call: not bound (a decode step's arrays are new each step)
    ids[:, 2] = (ids[:, 2] + 1) % 128  # new tokens in the same array
    prepared.run(ids, mask, logits)
    bound = prepared._bound[1]
    assert bound is not None
    second = logits.copy()
    prepared.run(ids, mask, logits)
    assert prepared._bound[1] is bound
    np.testing.assert_array_equal(logits, second)
    kept = np.zeros((2, 1, 128), np.float32)
    prepared.run(ids, mask, kept, logits_to_keep=1)
    assert prepared._bound[1] is not bound
    np.testing.assert_array_equal(first, prepared.forward(model.input_ids, model.attention_mask).logits)
    np.testing.assert_array_equal(second, prepared.forward(ids, mask).logits)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(kept, second[:, -1:])
