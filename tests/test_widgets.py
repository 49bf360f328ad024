"""The explorer's logic without a browser: set controls, click Run, read what it produced."""
from matplotlib.figure import Figure

from celerinfer_lab.native import copy_cpp
from celerinfer_lab.widgets import Explorer, explorer


def test_explorer_runs_and_reports():
    e = explorer()
    assert isinstance(e, Explorer) and not e.run_button.disabled
    e.controls["seq_len"].value = 6
    e.run_button.click()
    assert e.report is not None and e.report.agrees
    assert e.progress.value == e.progress.max
    assert e.timings["torch_ms"] > 0 and e.timings["cpp_ms"] > 0 and e.timings["cpp_fast_ms"] > 0
    assert "C++ fast" in e.status.value
    assert "PyTorch" in e.status.value and "agree" in e.message
    assert "<table" in e.result_html.value and "model.layers.1.mlp.down_proj" in e.result_html.value
    assert all(isinstance(f, Figure) for f in e.figures) and len(e.figures) == 2


def test_explorer_localizes_a_fault():
    e = explorer()
    e.controls["padding"].value = "left"
    e.controls["seq_len"].value = 8
    e.controls["fault"].value = "padding_mask_ignored"
    e.run_button.click()
    assert e.report.culprit.name == "model.layers.0.self_attn.scores"
    assert "padding mask ignored" in e.report.diagnosis
    assert "culprit model.layers.0.self_attn.scores" in e.status.value
    assert len(e.figures) == 3  # depth, logits, attention heatmap
    assert e.figures[2].axes[0].images


def test_invalid_combination_is_explained_next_to_the_control():
    e = explorer()
    e.controls["kv_heads"].value = 3
    assert e.run_button.disabled
    assert "not a multiple of num_key_value_heads=3" in e.notes["kv_heads"].value
    assert "not a multiple" in e.notes["heads"].value
    e.run_button.click()  # a click while invalid runs nothing
    assert e.report is None
    e.controls["kv_heads"].value = 4
    assert not e.run_button.disabled and e.notes["kv_heads"].value == ""
    e.controls["hidden"].value = 48
    e.controls["heads"].value = 16
    assert e.run_button.disabled and "head_dim=3" in e.notes["heads"].value


def test_topk_never_exceeds_experts():
    e = explorer()
    assert e.controls["topk"].disabled  # MoE off
    e.controls["moe"].value = True
    e.controls["experts"].value = 4
    e.controls["topk"].value = 3
    e.controls["experts"].value = 2
    assert e.controls["topk"].value <= 2 and e.controls["topk"].max == 2


def test_errors_stay_in_the_widget(tmp_path):
    e = explorer()
    e.controls["cpp_dir"].value = str(tmp_path / "nowhere")
    e.run_button.click()
    assert "FileNotFoundError" in e.message and "FileNotFoundError" in e.status.value
    broken = copy_cpp(tmp_path / "broken")
    (broken / "include/celerinfer/ops.hpp").write_text("this is not C++")
    e.controls["cpp_dir"].value = str(broken)
    e.run_button.click()
    assert "NativeCompileError" in e.message and "did not compile" in e.status.value


def test_edited_cpp_is_recompiled(tmp_path):
    mine = copy_cpp(tmp_path / "mine")
    e = explorer(cpp_dir=mine)
    e.run_button.click()
    assert e.report.agrees
    ops = mine / "include/celerinfer/ops.hpp"
    ops.write_text(ops.read_text().replace("return x / (1.0f + std::exp(-x));", "return x;"))
    e.run_button.click()
    assert e.report.culprit.name == "model.layers.0.mlp.act"
