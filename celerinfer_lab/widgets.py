"""The notebook explorer: pick a model config, a fault and a C++ folder, press Run, read the result.

``explorer()`` returns an ipywidgets layout. Its logic lives in plain methods and attributes
(``validate()``, ``run()``, ``report``, ``figures``, ``timings``, ``message``) so tests drive it
without a browser: set control values, call ``run_button.click()``, assert on what it produced.
"""
from __future__ import annotations

import hashlib
import re
import traceback
from pathlib import Path

import ipywidgets as W
from IPython.display import display

from .config import ConfigError, ModelConfig
from .faults import FAULTS
from .native import DEFAULT_CPP_DIR, NativeEngine, _include_dir, assemble_source

# ModelConfig field -> the control a message about it belongs next to
_FIELD_CONTROL = {
    "hidden_size": "hidden", "num_hidden_layers": "layers", "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads", "head_dim": "heads", "vocab_size": "vocab", "seq_len": "seq_len",
    "num_experts": "experts", "num_experts_per_tok": "topk", "n_shared_experts": "shared",
    "max_position_embeddings": "seq_len", "batch_size": "batch",
}
_engines: dict[tuple[str, str | None, str], NativeEngine] = {}  # one compile per folder text and fault


def engine_for(cpp_dir: str | Path, fault: str | None) -> NativeEngine:
    """A compiled engine for the folder's current source (recompiled when a header changes)."""
    source = assemble_source(_include_dir(Path(cpp_dir)))
    key = (str(Path(cpp_dir).resolve()), fault, hashlib.sha1(source.encode()).hexdigest())
    if key not in _engines:
        _engines[key] = NativeEngine(cpp_dir, fault)
    return _engines[key]


def _slider(description: str, value: int, lo: int, hi: int, step: int = 1) -> W.IntSlider:
    return W.IntSlider(value=value, min=lo, max=hi, step=step, description=description, continuous_update=False,
                       style={"description_width": "90px"}, layout=W.Layout(width="360px"))


class Explorer(W.VBox):
    """Controls, a Run button and the results of the last run."""

    def __init__(self, cpp_dir: str | Path | None = None):
        self.controls = {
            "hidden": _slider("hidden", 64, 16, 1024, 16), "layers": _slider("layers", 2, 1, 16),
            "heads": _slider("heads", 8, 1, 16), "kv_heads": _slider("kv heads", 2, 1, 16),
            "vocab": _slider("vocab", 128, 16, 8192, 16), "seq_len": _slider("seq len", 16, 1, 256),
            "batch": _slider("batch", 2, 1, 8), "seed": W.IntText(value=123, description="seed",
                                                                   style={"description_width": "90px"}),
            "qk_norm": W.Checkbox(value=False, description="q/k norm"),
            "rope": W.ToggleButtons(options=["half", "interleaved"], description="RoPE pairs"),
            "moe": W.Checkbox(value=False, description="MoE"),
            "experts": _slider("experts", 4, 1, 8), "topk": _slider("top-k", 1, 1, 4),
            "shared": _slider("shared", 0, 0, 2),
            "padding": W.Dropdown(options=["none", "left", "right", "mixed"], description="padding"),
            "fault": W.Dropdown(options=["none", *FAULTS], description="fault"),
            "cpp_dir": W.Text(value=str(cpp_dir or DEFAULT_CPP_DIR), description="C++ folder",
                              layout=W.Layout(width="600px")),
        }
        self.notes = {name: W.HTML() for name in self.controls}  # why a value is invalid, next to it
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.progress = W.IntProgress(min=0, max=5, description="", layout=W.Layout(width="360px"))
        self.status = W.HTML()
        self.result_html = W.HTML()
        self.plots = W.Output()
        self.report = None
        self.figures: list = []
        self.timings: dict[str, float] = {}
        self.message = ""

        c = self.controls
        c["experts"].observe(self._clamp_topk, names="value")
        for name, control in c.items():
            if name not in ("cpp_dir", "fault", "seed"):
                control.observe(lambda _change: self.validate(), names="value")
        self.run_button.on_click(lambda _button: self.run())

        def row(*names):
            return W.VBox([W.HBox([c[n], self.notes[n]]) for n in names])

        config_box = W.VBox([row("hidden", "layers", "heads", "kv_heads", "vocab"),
                             row("seq_len", "batch", "seed", "padding"),
                             row("qk_norm", "rope", "moe", "experts", "topk", "shared")])
        debug_box = W.VBox([row("fault", "cpp_dir"), W.HBox([self.run_button, self.progress]), self.status])
        super().__init__([W.HTML("<h3>CelerInfer Lab explorer</h3>"), W.HBox([config_box, debug_box]),
                          self.result_html, self.plots])
        self._clamp_topk()
        self.validate()

    # ---- validation ------------------------------------------------------------------------
    def _clamp_topk(self, _change=None) -> None:
        """top-k can never exceed the expert count: the slider's range follows it."""
        self.controls["topk"].max = self.controls["experts"].value

    def config(self) -> ModelConfig:
        c = {k: w.value for k, w in self.controls.items()}
        return ModelConfig(
            hidden_size=c["hidden"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
            num_key_value_heads=c["kv_heads"], vocab_size=c["vocab"], max_position_embeddings=max(128, c["seq_len"]),
            qk_norm=c["qk_norm"], rope_pairing=c["rope"], use_moe=c["moe"], num_experts=c["experts"],
            num_experts_per_tok=c["topk"], n_shared_experts=c["shared"], tie_word_embeddings=True)

    def validate(self) -> bool:
        """Show why the current combination is invalid next to the control concerned; disable Run."""
        for note in self.notes.values():
            note.value = ""
        moe = self.controls["moe"].value
        for name in ("experts", "topk", "shared"):
            self.controls[name].disabled = not moe
        try:
            self.config()
            ok = True
        except ConfigError as exc:
            named = [f for f in re.findall(r"(\w+)=", str(exc)) if f in _FIELD_CONTROL] or ["hidden_size"]
            for target in dict.fromkeys(_FIELD_CONTROL[f] for f in named):  # every control the rule names
                self.notes[target].value = f"<span style='color:#b00'>✗ {_escape(str(exc))}</span>"
            self.message = str(exc)
            ok = False
        self.run_button.disabled = not ok
        return ok

    # ---- running ---------------------------------------------------------------------------
    def _step(self, text: str) -> None:
        self.progress.value += 1
        self.status.value = f"<i>{text}…</i>"

    def run(self) -> None:
        """Generate, run both forwards, time them, compare, plot. Errors land in the widget."""
        from .bench import time_cpp, time_torch
        from .compare import compare
        from .generate import generate_model

        self.progress.value, self.report, self.figures = 0, None, []
        if not self.validate():
            self.status.value = f"<span style='color:#b00'>invalid config: {self.message}</span>"
            return
        try:
            c = {k: w.value for k, w in self.controls.items()}
            self._step("generating the model")
            config = self.config()
            model = generate_model(config, c["batch"], c["seq_len"], c["seed"], c["padding"])
            self._step("compiling the C++")
            fault = None if c["fault"] == "none" else c["fault"]
            native = engine_for(c["cpp_dir"], fault)
            self._step("timing both forwards")
            self.timings = {"torch_ms": time_torch(model, 1, 5).median_ms,
                            "cpp_ms": time_cpp(model, native, 1, 5, "readable").median_ms,
                            "cpp_fast_ms": time_cpp(model, native, 1, 5, "fast").median_ms}
            self._step("comparing every trace point")
            self.report = compare(model, native)
            self._step("plotting")
            self.figures = [self.report.plot("depth"), self.report.plot("logits")]
            if self.report.culprit is not None and ".self_attn." in self.report.culprit.name:
                self.figures.append(self.report.plot("heatmap"))
        except Exception as exc:  # the widget shows every failure; the kernel lives on
            self.message = f"{type(exc).__name__}: {exc}"
            self.status.value = (f"<span style='color:#b00'><b>{type(exc).__name__}</b></span>"
                                 f"<pre>{_escape(str(exc))}</pre>")
            self.result_html.value = f"<details><summary>traceback</summary><pre>{_escape(traceback.format_exc())}</pre></details>"
            return
        t = self.timings
        verdict = "agree" if self.report.agrees else f"culprit {self.report.culprit.name if self.report.culprit else '?'}"
        self.message = f"{config.num_parameters():,} parameters; {verdict}"
        self.status.value = (f"<b>PyTorch {t['torch_ms']:.3f} ms, C++ readable {t['cpp_ms']:.3f} ms, "
                             f"C++ fast {t['cpp_fast_ms']:.3f} ms ({t['torch_ms'] / t['cpp_fast_ms']:.1f}x)</b> — {self.message}")
        self.result_html.value = self.report._repr_html_()
        self.plots.clear_output()
        with self.plots:
            for fig in self.figures:
                display(fig)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def explorer(cpp_dir: str | Path | None = None) -> Explorer:
    """The explorer layout: config sliders, fault selector, C++ folder, Run, results."""
    return Explorer(cpp_dir)
