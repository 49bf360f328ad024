"""The explorer's logic without a browser: set controls, click Run, read what it produced."""

import pytest
from matplotlib.figure import Figure

from celerinfer_lab import widgets
from celerinfer_lab.compare import Comparison
from celerinfer_lab.faults import FAULTS, Fault, why_it_cannot_show
from celerinfer_lab.native import copy_cpp
from celerinfer_lab.widgets import Explorer, explorer

BUILT_IN = ["readable", "fast", "readable-bf16", "readable-q8", "bf16", "q8"]  # kernel_set.hpp's registrations


def test_explorer_runs_and_reports():
    e = explorer()
    assert isinstance(e, Explorer) and not e.run_button.disabled
    assert list(e.controls["kernels"].options) == [*BUILT_IN, "all"] and e.controls["kernels"].value == "fast"
    e.controls["seq_len"].value = 6
    e.run_button.click()
    assert e.report is not None and e.report.agrees and e.report.subject == "C++ (fast)"
    assert e.progress.value == e.progress.max
    assert set(e.timings) == {"torch_ms", "cpp_fast_ms"} and all(v > 0 for v in e.timings.values())
    assert "PyTorch" in e.status.value and "C++ fast" in e.status.value and "C++ readable" not in e.status.value
    assert "127,296 parameters; fast kernels agree" in e.message  # what the browser test reads
    assert "<table" in e.result_html.value and "model.layers.1.mlp.down_proj" in e.result_html.value
    assert all(isinstance(f, Figure) for f in e.figures) and len(e.figures) == 2


def test_the_report_is_for_the_kernel_set_it_times():
    e = explorer()
    e.controls["seq_len"].value = 4
    e.controls["kernels"].value = "readable"
    e.run_button.click()
    assert e.report.subject == "C++ (readable)" and set(e.timings) == {"torch_ms", "cpp_readable_ms"}
    assert (
        "C++ readable" in e.status.value and "C++ fast" not in e.status.value and "readable kernels agree" in e.message
    )
    e.controls["kernels"].value = "all"
    e.run_button.click()
    sets = ["readable", "fast", "readable-bf16", "readable-q8", "bf16", "q8"]  # bf16/q8: on the quantized model
    assert isinstance(e.report, Comparison) and list(e.reports) == sets and e.report.agrees
    assert set(e.timings) == {"torch_ms", *(f"cpp_{k}_ms" for k in sets)}
    assert "C++ readable" in e.status.value and "C++ fast" in e.status.value
    assert "readable kernels agree, fast kernels agree" in e.message
    assert "readable kernels</h4>" in e.result_html.value and "fast kernels</h4>" in e.result_html.value
    assert len(e.figures) == 2 * len(sets)  # depth and logits per set


def test_head_dim_and_untied_head():
    e = explorer()
    assert e.controls["head_dim"].value == 0 and "hidden/heads = 8" in e.notes["head_dim"].value
    tied = e.config().num_parameters()
    e.controls["untied"].value = True
    e.controls["head_dim"].value = 12
    config = e.config()
    assert not config.tie_word_embeddings and config.head_dim == 12 and config.q_dim == 96
    assert config.num_parameters() > tied + 128 * 64 - 1  # the head's own weight, and wider q/k/v/o
    e.controls["head_dim"].value = 6
    e.controls["hidden"].value = 48
    e.controls["heads"].value = 16
    assert not e.run_button.disabled  # hidden/heads need not divide: head_dim is explicit
    e.controls["head_dim"].value = 7
    assert e.run_button.disabled and "head_dim=7" in e.notes["head_dim"].value
    e.controls["head_dim"].value = 6
    e.controls["seq_len"].value = 5
    e.run_button.click()
    assert e.report.agrees and f"{e.config().num_parameters():,} parameters" in e.message


def test_a_fault_switches_the_controls_to_a_model_that_shows_it():
    e = explorer()  # padding none, fast kernels: padding_mask_ignored (readable only) cannot show
    e.controls["seq_len"].value = 8
    e.controls["fault"].value = "padding_mask_ignored"
    assert e.controls["padding"].value == "left" and e.controls["kernels"].value == "readable"
    assert "Switched padding none → left, kernels fast → readable" in e.fault_note.value
    assert e.fault_problems() == []
    # Change a control back: the note warns, and Run switches again (and says so).
    e.controls["padding"].value = "none"
    assert "cannot show on these settings" in e.fault_note.value and "Run switches" in e.fault_note.value
    e.run_button.click()
    assert e.controls["padding"].value == "left" and e.switched == ["padding none → left"]
    assert e.report.culprit.name == "model.layers.0.self_attn.scores"
    assert "padding mask ignored" in e.report.diagnosis
    assert "readable kernels: culprit model.layers.0.self_attn.scores" in e.status.value
    assert "switched padding none → left so that the fault shows" in e.message
    assert len(e.figures) == 3  # depth, logits, attention heatmap
    assert e.figures[2].axes[0].images


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_is_switched_to_a_config_that_shows_it(name):
    e = explorer()
    e.controls["heads"].value = e.controls["kv_heads"].value = 4  # one kv head per query head: no GQA
    e.controls["fault"].value = name
    fault = FAULTS[name]
    assert e.fault_problems() == [] and not e.run_button.disabled, e.fault_note.value
    assert why_it_cannot_show(fault, e.config(), e._mask(e.config()), e.controls["kv_cache"].value) == []
    assert set(e.chosen_sets()) & set(fault.kernels)
    assert (("Switched" in e.fault_note.value) == bool(e.switched)) and "cannot show" not in e.fault_note.value
    e.controls["fault"].value = "none"
    assert e.fault_note.value == ""


def test_a_bf16_kv_cache_fault_switches_the_cache_and_is_found():
    """The explorer's KV cache control: a fault of the bf16 cache switches it to bf16, and Run finds
    the fault where the cache rounds (both sides keep a bf16 cache)."""
    e = explorer()
    e.controls["seq_len"].value = 6
    e.controls["fault"].value = "kv_bf16_truncation"
    assert e.controls["kv_cache"].value == "bf16" and "KV cache f32 → bf16" in e.fault_note.value
    e.run_button.click()
    assert e.report.culprit is not None and e.report.culprit.name == FAULTS["kv_bf16_truncation"].culprit
    e.controls["fault"].value = "none"
    e.run_button.click()  # the correct C++ with the bf16 cache on both sides agrees
    assert e.report.agrees and e.controls["kv_cache"].value == "bf16"


def test_switch_examples():
    e = explorer()
    e.controls["heads"].value = e.controls["kv_heads"].value = 4
    e.controls["fault"].value = "gqa_modulo"
    assert e.switched == ["heads 4 → 8"]  # 8 query heads over 4 kv heads share them: enough
    e.controls["fault"].value = "untied_head_as_embedding"
    assert e.switched == ["untied head off → on"] and not e.config().tie_word_embeddings
    e.controls["fault"].value = "moe_topk_not_renormalised"
    assert e.switched == ["MoE off → on", "top-k 1 → 2"] and e.config().uses_topk_renorm
    e.controls["kernels"].value = "all"
    e.controls["fault"].value = "fast_attention_scale"  # applies to one of the chosen sets: no switch
    assert e.switched == [] and e.controls["kernels"].value == "all"


def test_a_fault_the_explorer_cannot_show_says_why(monkeypatch):
    edits = FAULTS["rmsnorm_weight_ignored"].edits
    monkeypatch.setitem(
        FAULTS,
        "eps_only",
        Fault("eps_only", "needs a large eps", edits, ("readable",), "model.norm", None, model=dict(rms_norm_eps=1e-2)),
    )
    monkeypatch.setitem(
        FAULTS,
        "late",
        Fault("late", "shows late in decoding", edits, ("readable", "fast"), "model.norm", None, step=40),
    )
    monkeypatch.setitem(
        FAULTS,
        "eps_default",
        Fault(
            "eps_default",
            "needs the default eps",
            edits,
            ("readable",),
            "model.norm",
            None,
            model=dict(rms_norm_eps=1e-5),
        ),
    )
    e = explorer()
    e.controls["fault"].value = "eps_only"
    assert "cannot show in the explorer" in e.fault_note.value and "no control for rms_norm_eps" in e.fault_note.value
    assert "kernels fast → readable" in e.fault_note.value  # what it could switch, it did
    e.controls["fault"].value = "eps_default"  # no control, but the value it needs is the one it has
    assert e.fault_problems() == [] and "cannot show" not in e.fault_note.value
    e.controls["fault"].value = "late"
    assert "cannot show in the explorer" in e.fault_note.value and "decode step 40" in e.fault_note.value
    assert "decode steps 0 → 16" in e.fault_note.value  # as far as the control goes


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
    assert e.controls["topk"].disabled and e.controls["topk_renorm"].disabled  # MoE off
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
    e.controls["kernels"].value = "readable"  # ops.hpp's loops are the readable kernels
    e.controls["seq_len"].value = 4
    e.run_button.click()
    assert e.report.agrees
    ops = mine / "include/celerinfer/ops.hpp"
    ops.write_text(ops.read_text().replace("return x / (1.0f + std::exp(-x));", "return x;"))
    e.run_button.click()
    assert e.report.culprit.name == "model.layers.0.mlp.act"


def test_your_own_kernel_set_joins_the_toggle():
    mine = """
    struct PlainKernels : ReadableKernels {};
    CELERINFER_REGISTER_KERNELS(PlainKernels, "plain");
    """
    e = explorer(extra_source=mine)
    assert list(e.controls["kernels"].options) == [*BUILT_IN, "plain", "all"]
    e.controls["kernels"].value = "plain"
    e.controls["seq_len"].value = 4
    e.run_button.click()
    assert e.report.subject == "C++ (plain)" and "plain kernels agree" in e.message
    assert widgets.engine_for(e.controls["cpp_dir"].value, None, mine).kernel_sets[-1] == "plain"


def test_a_decode_fault_runs_the_decode_steps():
    step_faults = [f for f in FAULTS.values() if f.step and "fast" in f.kernels]
    if not step_faults:
        pytest.skip("no decode-step fault in the catalogue")
    fault = step_faults[0]
    e = explorer()
    e.controls["seq_len"].value = 5
    e.controls["fault"].value = fault.name
    assert e.controls["decode"].value == fault.step and f"decode steps 0 → {fault.step}" in e.fault_note.value
    e.run_button.click()
    assert e.report.meta["step"] == fault.step and e.report.culprit.name == fault.culprit, e.status.value
    assert len(e.step_reports["fast"]) == fault.step + 1 and e.step_reports["fast"][0].agrees
    assert f"culprit {fault.culprit} at decode step {fault.step}" in e.message
    assert f"Decode step {fault.step} of {fault.step}" in e.result_html.value


def test_timings_carry_their_spread_and_say_noisy():
    from celerinfer_lab.bench import Timing

    e = explorer()
    e.controls["seq_len"].value = 4
    e.run_button.click()
    assert set(e.timing_details) == {"torch_ms", "cpp_fast_ms"} and e.timing_details["torch_ms"].runs >= 10
    assert "IQR" in e.status.value and ("faster" in e.status.value or "slower" in e.status.value)
    quiet, loud = Timing(2.0, 1.9, 2.2, 15, 1.95, 2.05, 0.1, 2), Timing(0.1, 0.05, 0.9, 15, 0.06, 0.3, 0.1, 2)
    e.timing_details = {"torch_ms": quiet, "cpp_fast_ms": quiet}
    assert "noisy" not in e.timing_html() and "1.0x faster" in e.timing_html()
    e.timing_details = {"torch_ms": quiet, "cpp_fast_ms": loud}
    html = e.timing_html()
    assert "noisy" in html and "ratios unreliable" in html and "spread" in html


def test_stale_results_are_cleared_on_a_change_or_an_error(tmp_path):
    e = explorer()
    e.controls["seq_len"].value = 4
    e.run_button.click()
    assert e.report is not None and e.figures and "<table" in e.result_html.value
    e.controls["hidden"].value = 80  # a config change: the old results would describe another model
    assert e.report is None and e.figures == [] and e.result_html.value == "" and not e.plots.outputs
    assert "settings changed" in e.status.value and e.timings == {}
    e.controls["hidden"].value = 64
    e.run_button.click()
    assert e.report is not None
    e.controls["cpp_dir"].value = str(tmp_path / "nowhere")
    e.run_button.click()  # an error: nothing from the run before stays
    assert e.report is None and e.figures == [] and "<table" not in e.result_html.value and e.timings == {}
    assert "FileNotFoundError" in e.status.value


def test_tables_keep_their_columns_and_notes_sit_below_their_controls():
    import ipywidgets as W

    e = explorer()
    e.controls["seq_len"].value = 4
    e.run_button.click()
    assert "padding: 2px 10px" in e.result_html.value and "jp-RenderedHTMLCommon" in e.result_html._dom_classes

    def boxes(widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from boxes(child)

    holders = [b for b in boxes(e) if isinstance(b, W.Box) and e.notes["kv_heads"] in b.children]
    assert len(holders) == 1 and isinstance(holders[0], W.VBox)  # the note below, not beside, its control
    first, note = holders[0].children
    assert note is e.notes["kv_heads"] and list(first.children) == [e.controls["kv_heads"]]
    e.controls["kv_heads"].value = 3  # invalid: 8 heads are not a multiple of 3
    assert "not a multiple" in e.notes["kv_heads"].value and e.run_button.disabled


@pytest.mark.parametrize("kv_cache, torch_label", [("f32", "torch (float32)"), ("bf16", "torch (float32, bf16 KV)")])
def test_the_text_row_generates_on_both_sides(kv_cache, torch_label):
    """Greedy text on both sides, with the KV cache the control chooses."""
    e = explorer()
    e.controls["vocab"].value = 384  # the byte-level tokenizer needs 256 bytes and the specials
    e.controls["kv_cache"].value = kv_cache
    e.text.new_tokens.value = 8
    e.text.button.click()
    done = e.text.completion
    assert done is not None and done.identical and len(done.torch_ids) == 8 and done.kernels == "fast"
    assert "identical: 8 tokens, the same on both sides" in e.text.output.value and "<pre" in e.text.output.value
    assert any(f"{torch_label} " in line for line in done.lines), done.lines


def test_the_text_row_finds_a_fault_and_explains_what_it_cannot_do():
    e = explorer()
    e.controls["vocab"].value = 384
    e.controls["fault"].value = "residual_added_twice"
    e.text.new_tokens.value = 8
    e.text.button.click()
    assert e.text.completion is not None and e.text.completion.divergence is not None
    assert "culprit: model.layers.0.attn_residual" in e.text.output.value and "color:#a00" in e.text.output.value
    e.controls["fault"].value = "none"
    e.controls["vocab"].value = 128
    e.text.button.click()
    assert e.text.completion is None and "at least 260 ids" in e.text.output.value
    e.controls["vocab"].value = 384
    e.controls["heads"].value = 3  # not a multiple of 2 kv heads: the text row says so, nothing runs
    e.text.button.click()
    assert e.text.completion is None and "the config is invalid" in e.text.output.value


# ---- explorer(model=...): a model file instead of the sliders' random model ---------------------------
FILE_CONTROLS = list(widgets._FILE_CONTROLS)  # config and inputs: the file's
FREE_CONTROLS = ["decode", "kernels", "fault", "cpp_dir"]


def test_the_explorer_on_a_trained_model_file(trained_small):
    import celerinfer_lab as cl

    model, tokenizer, _, path = trained_small
    e = explorer(model=path)
    c = e.controls
    shown = {k: c[k].value for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "qk_norm", "untied")}
    assert shown == {
        "hidden": 128,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "vocab": tokenizer.vocab_size,
        "qk_norm": True,
        "untied": False,
    }
    assert (c["seq_len"].value, c["batch"].value, c["padding"].value) == (model.seq_len, 1, "none")
    assert all(c[k].disabled for k in FILE_CONTROLS) and not any(c[k].disabled for k in FREE_CONTROLS)
    assert e.config() == model.config and "its weights fix them" in e.model_note.value and e.model_note in e.children
    e.run_button.click()
    assert e.report is not None and e.report.agrees, e.status.value
    assert f"{model.config.num_parameters():,} parameters; fast kernels agree" in e.message  # not the sliders' default
    e.text.new_tokens.value = 16
    e.text.button.click()
    done = e.text.completion
    assert done is not None and done.identical and len(done.torch_ids) == 16, e.text.output.value
    assert "the one kept with small.json" in e.text.note.value
    # the file's weights and its kept tokenizer: the same text as complete() on the file
    assert done.torch_text == cl.complete(path, "First Citizen:", 16, stop_at_eos=False).torch_text


def test_a_fault_on_a_model_file_is_found_and_the_file_values_stay(trained_small):
    *_, path = trained_small
    e = explorer(model=path)
    e.controls["fault"].value = "residual_added_twice"
    e.run_button.click()
    assert e.report.culprit is not None and e.report.culprit.name == "model.layers.0.attn_residual", e.status.value
    # A fault the file's inputs cannot show: the controls it would need stay the file's, and the note says so.
    e.controls["fault"].value = "padding_mask_ignored"
    assert e.controls["padding"].value == "none" and e.controls["batch"].value == 1
    assert "It cannot show on this model file: the inputs have no padding" in e.fault_note.value


def test_a_model_file_without_a_tokenizer(tmp_path):
    import celerinfer_lab as cl

    config = cl.ModelConfig(vocab_size=384, max_position_embeddings=6)
    model = cl.generate_model(config, batch_size=2, seq_len=6, seed=1, padding="left")
    model.save(tmp_path / "m.json")
    e = explorer(model=tmp_path / "m.json")
    assert e.controls["padding"].value == "left" and e.controls["batch"].value == 2
    assert "no tokenizer kept with m.json" in e.text.note.value and "trained here" in e.text.note.value
    e.text.prompt.value, e.text.new_tokens.value = "I", 4  # within the file's 6 positions
    e.text.button.click()
    assert e.text.completion is not None and e.text.completion.identical, e.text.output.value
    # the file's positions hold its 6 tokens and no more: a decode step does not fit, said under decode
    assert not e.run_button.disabled
    e.controls["decode"].value = 1
    assert e.run_button.disabled and "max_position_embeddings=6" in e.notes["decode"].value
    # too small a vocabulary for the tokenizer trained here, in memory (no file, so no tokenizer kept)
    small = cl.generate_model(cl.ModelConfig(), batch_size=1, seq_len=4, seed=1)
    e = explorer(model=small)
    assert "a Model given in memory has no tokenizer" in e.text.note.value and "too small" in e.text.note.value
    e.text.button.click()
    assert e.text.completion is None and "at least 260 ids" in e.text.output.value


def test_a_model_that_does_not_load_is_shown_not_raised(tmp_path):
    import numpy as np

    import celerinfer_lab as cl

    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "celerinfer-lab", "config": ')
    bad = cl.generate_model(cl.ModelConfig(), batch_size=1, seq_len=4, seed=1)
    bad.weights["model.norm.weight"] = np.ones(3, dtype=np.float32)
    for given, words in (
        (broken, "ModelFileError: " + str(broken)),
        (tmp_path / "missing.json", "missing.json"),
        (bad, "model.norm.weight"),
    ):
        e = explorer(model=given)
        assert e.model is None and words in e.model_error and words in e.status.value, e.status.value
        assert e.run_button.disabled and e.text.button.disabled and all(w.disabled for w in e.controls.values())
        e.run()  # what a click would do, were the button not disabled: nothing raised, nothing run
        assert e.report is None and "did not load" in e.status.value
        e.text.complete()
        assert e.text.completion is None and "the model did not load" in e.text.output.value
    # its companion: a good file opens
    good = tmp_path / "good.json"
    cl.generate_model(cl.ModelConfig(), batch_size=1, seq_len=4, seed=1).save(good)
    assert explorer(model=good).model_error == ""


def test_profile_shows_the_table_and_roofline(quick_limits, tmp_path):
    e = explorer()
    e.profile_limits = quick_limits  # the session's quick measurement, not a full one
    e.controls["decode"].value = 1
    e.profile_button.click()
    assert e.profile is not None, e.profile_status.value
    assert e.profile_message.startswith("profiled fast kernels")
    assert "qkv_proj" in e.profile_html.value and "attention" in e.profile_html.value
    assert "decode: 1 steps" in e.profile_html.value
    assert len(e.profile_figures) == 2 and all(isinstance(f, Figure) for f in e.profile_figures)
    assert e.profile.kv_cache == "f32" and "k_cached" not in e.profile_html.value
    e.controls["kv_cache"].value = "bf16"  # the KV cache control reaches the profile
    e.profile_button.click()
    assert e.profile is not None and e.profile.kv_cache == "bf16" and "k_cached" in e.profile_html.value
    # a failure stays in the widget: a C++ folder that does not exist
    e.controls["cpp_dir"].value = str(tmp_path / "nothing-here")
    e.profile_button.click()  # never raises
    assert e.profile is None and e.profile_figures == [] and e.profile_html.value == ""
    assert "nothing-here" in e.profile_message and "profile:" in e.profile_status.value
