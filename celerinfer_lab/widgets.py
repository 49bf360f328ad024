"""The notebook explorer: pick a model config, a kernel set, a fault and a C++ folder, press Run,
read the result.

``explorer()`` returns an ipywidgets layout. Its logic lives in plain methods and attributes
(``validate()``, ``fault_problems()``, ``show_fault()``, ``run()``, ``report``, ``reports``,
``figures``, ``timings``, ``message``) so tests drive it without a browser: set control values,
call ``run_button.click()``, assert on what it produced.

A fault always runs on a model and kernel set that show it: picking a fault that cannot show on
the current controls (a GQA bug with one kv head per query head, a padding bug without padding, a
readable-kernel bug with the fast kernels chosen, a KV-cache bug without decode steps) switches the
controls to ones that show it, and the note under the fault says what was switched and why. Change
a control back afterwards and the note warns; Run switches again. A fault that needs a setting the
explorer has no control for says why it cannot show.

**Profile** (beside Run) times every op of both forwards on the same model (profile.py): the per-op
table against the machine's limits and the roofline, prefill and (with decode steps) decode; its
failures land in the widget too (``profile``, ``profile_figures``, ``profile_message``).

``explorer(model="small.json")`` (a path, or a loaded ``Model``) works on that model instead of a
random one: the config controls show the file's config and inputs and are disabled (the weights fix
them), Run compares the file's model, and the Text row uses the tokenizer kept with the file. A file
that does not load is shown as its error in the explorer, never raised.
"""

from __future__ import annotations

import hashlib
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import ipywidgets as W
from IPython.display import display

from .config import TOPK_RENORM_RULES, ConfigError, ModelConfig
from .faults import FAULTS, Fault, why_it_cannot_show
from .flags import DEFAULT_BATCH_SIZE
from .kvcache import KV_CACHE_FORMATS
from .native import NativeEngine, assemble_source
from .paths import DEFAULT_CPP_DIR, include_dir
from .text_panel import MIN_VOCAB, TextJob, TextPanel

if TYPE_CHECKING:  # for annotations only: Run imports what it runs when it runs
    import numpy as np

    from .bench import Timing
    from .compare import Comparison, Report
    from .machine import MachineLimits
    from .modelfile import Model
    from .profile import Profile
    from .tokenizer import Tokenizer

# ModelConfig field -> the controls a message about it belongs next to
_FIELD_CONTROL = {
    "hidden_size": ("hidden",),
    "num_hidden_layers": ("layers",),
    "num_attention_heads": ("heads",),
    "num_key_value_heads": ("kv_heads",),
    "head_dim": ("heads", "head_dim"),
    "vocab_size": ("vocab",),
    "seq_len": ("seq_len",),
    "num_experts": ("experts",),
    "num_experts_per_tok": ("topk",),
    "n_shared_experts": ("shared",),
    "max_position_embeddings": ("seq_len",),
    "batch_size": ("batch",),
    "topk_renorm": ("topk_renorm",),
    "intermediate_size": ("intermediate",),
}
# ModelConfig field -> the control that sets it, in the order a fault's overrides are applied (the
# expert count before top-k, whose range follows it). tie_word_embeddings is the inverse of "untied".
_FIELD_SETTER = {
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab",
    "intermediate_size": "intermediate",
    "qk_norm": "qk_norm",
    "rope_pairing": "rope",
    "tie_word_embeddings": "untied",
    "use_moe": "moe",
    "num_experts": "experts",
    "num_experts_per_tok": "topk",
    "n_shared_experts": "shared",
    "topk_renorm": "topk_renorm",
}
_INPUT_SETTER = {"batch_size": "batch", "seq_len": "seq_len", "padding": "padding"}
# What a model file fixes: its config and its inputs (the rest, decode steps to C++ folder, stays free).
_FILE_CONTROLS = (*_FIELD_SETTER.values(), "seq_len", "batch", "seed", "padding")

_DEFAULT_SETS = ["readable", "fast"]  # shown until a build reports its own registered sets
_engines: dict[tuple[str, str | None, str], NativeEngine] = {}  # one compile per folder text, fault and extra source


def explorer_faults() -> list[str]:
    """The faults the explorer lists (read when it is built): every one in the catalogue (a fault of
    the bf16 KV cache switches the KV cache control to bf16)."""
    return list(FAULTS)


def engine_for(cpp_dir: str | Path, fault: str | None, extra_source: str = "") -> NativeEngine:
    """A compiled engine for the folder's current source (recompiled when a header changes)."""
    source = assemble_source(include_dir(Path(cpp_dir))) + extra_source
    key = (str(Path(cpp_dir).resolve()), fault, hashlib.sha1(source.encode()).hexdigest())
    if key not in _engines:
        _engines[key] = NativeEngine(cpp_dir, fault, extra_source=extra_source)
    return _engines[key]


def _slider(description: str, value: int, lo: int, hi: int, step: int = 1) -> W.IntSlider:
    return W.IntSlider(
        value=value,
        min=lo,
        max=hi,
        step=step,
        description=description,
        continuous_update=False,
        style={"description_width": "90px"},
        layout=W.Layout(width="360px"),
    )


_STYLE = {"description_width": "90px"}
TINY = ModelConfig()  # the sliders start at the CLI's default model (config.py's defaults)


class Explorer(W.VBox):
    """Controls, a Run button and the results of the last run."""

    def __init__(
        self, cpp_dir: str | Path | None = None, extra_source: str = "", model: str | Path | Model | None = None
    ):
        self.extra_source = extra_source  # C++ compiled after the headers: your own kernel set
        cpp_dir = str(cpp_dir or DEFAULT_CPP_DIR)
        sets = self._registered_sets(cpp_dir)
        self.controls = {
            "hidden": _slider("hidden", TINY.hidden_size, 16, 1024, 16),
            "layers": _slider("layers", TINY.num_hidden_layers, 1, 16),
            "heads": _slider("heads", TINY.num_attention_heads, 1, 16),
            "kv_heads": _slider("kv heads", TINY.num_key_value_heads, 1, 16),
            "head_dim": W.BoundedIntText(
                value=0, min=0, max=512, step=2, description="head dim", style=_STYLE, layout=W.Layout(width="200px")
            ),
            "vocab": _slider("vocab", TINY.vocab_size, 16, 8192, 16),
            "intermediate": W.BoundedIntText(
                value=0, min=0, max=16384, step=8, description="FFN width", style=_STYLE, layout=W.Layout(width="200px")
            ),
            "seq_len": _slider("seq len", 16, 1, 256),
            "batch": _slider("batch", DEFAULT_BATCH_SIZE, 1, 8),
            "seed": W.IntText(value=123, description="seed", style=_STYLE),
            "qk_norm": W.Checkbox(value=False, description="q/k norm"),
            "untied": W.Checkbox(value=False, description="untied head"),
            "rope": W.ToggleButtons(options=["half", "interleaved"], description="RoPE pairs"),
            "moe": W.Checkbox(value=False, description="MoE"),
            "experts": _slider("experts", 4, 1, 8),
            "topk": _slider("top-k", 1, 1, 4),
            "shared": _slider("shared", 0, 0, 2),
            "topk_renorm": W.Dropdown(
                options=list(TOPK_RENORM_RULES), value="always", description="top-k renorm", style=_STYLE
            ),
            "padding": W.Dropdown(options=["none", "left", "right", "mixed"], description="padding"),
            "decode": W.BoundedIntText(
                value=0, min=0, max=16, description="decode steps", style=_STYLE, layout=W.Layout(width="200px")
            ),
            "kernels": W.ToggleButtons(
                options=[*sets, "all"], value="fast" if "fast" in sets else sets[0], description="kernels"
            ),
            "kv_cache": W.ToggleButtons(options=list(KV_CACHE_FORMATS), value="f32", description="KV cache"),
            "fault": W.Dropdown(options=["none", *explorer_faults()], description="fault"),
            "cpp_dir": W.Text(value=cpp_dir, description="C++ folder", layout=W.Layout(width="600px")),
        }
        # why a value is invalid: under its control, indented past the label, wrapping (never squeezing it)
        self.notes = {name: W.HTML(layout=W.Layout(margin="0 0 2px 96px", max_width="420px")) for name in self.controls}
        self.fault_note = W.HTML(layout=W.Layout(max_width="640px"))  # what the fault does; what was switched
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.profile_button = W.Button(description="Profile", icon="clock-o", tooltip="per-op times and roofline")
        self.profile_status = W.HTML()
        self.profile_html = W.HTML()
        self.profile_html.add_class("jp-RenderedHTMLCommon")
        self.profile_plots = W.Output()
        self.profile: Profile | None = None  # the last profile
        self.profile_figures: list = []  # its rooflines (prefill, decode)
        self.profile_message = ""
        self.profile_limits: MachineLimits | None = None  # None: machine.machine_limits() (measured once, cached)
        self.progress = W.IntProgress(min=0, max=5, description="", layout=W.Layout(width="360px"))
        self.status = W.HTML()
        self.result_html = W.HTML()
        self.result_html.add_class("jp-RenderedHTMLCommon")  # JupyterLab's table styling inside the widget
        self.plots = W.Output()
        self.report: Report | Comparison | None = None  # a Report (one kernel set) or a Comparison ("all")
        self.reports: dict[str, Report] = {}  # kernel set -> Report, for either (with decode steps: the step shown)
        self.step_reports: dict[str, list[Report]] = {}  # with decode steps: kernel set -> one Report per forward
        self.figures: list = []  # matplotlib figures
        self.timings: dict[str, float] = {}  # torch_ms, cpp_<set>_ms (medians)
        self.timing_details: dict[str, Timing] = {}  # the same keys: spread, noisy
        self._running = False
        self.message = ""
        self.switched: list[str] = []  # the last switch: "padding none → left", ...
        self._switch_text = ""  # shown under the fault until the fault changes
        self._switching = False
        self.model: Model | None = None  # explorer(model=...): the model file's model, run instead of a random one
        self.model_path: Path | None = None  # its file (None for a Model given in memory)
        self.model_error = ""  # why the model file did not load ("" when it did, or when there is none)
        self.tokenizer: Tokenizer | None = None  # the tokenizer kept with the model file
        self.tokenizer_error = ""  # why the kept tokenizer did not load
        self.model_note = W.HTML(layout=W.Layout(max_width="900px"))  # which model; why the sliders are off

        c = self.controls
        c["experts"].observe(self._clamp_topk, names="value")
        for name, control in c.items():
            if name not in ("cpp_dir", "fault", "seed"):
                control.observe(lambda _change: self.validate(), names="value")
            control.observe(self._settings_changed, names="value")
        c["fault"].observe(lambda _change: self.show_fault(), names="value")
        self.run_button.on_click(lambda _button: self.run())
        self.profile_button.on_click(lambda _button: self.run_profile())

        def row(*names: str) -> W.VBox:  # each control with its note below it
            return W.VBox([W.VBox([W.HBox([c[n]]), self.notes[n]]) for n in names])  # HBox: keeps the readout

        config_box = W.VBox(
            [
                row("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "intermediate"),
                row("seq_len", "batch", "seed", "padding", "decode"),
                row("qk_norm", "untied", "rope", "moe", "experts", "topk", "shared", "topk_renorm"),
            ]
        )
        debug_box = W.VBox(
            [
                row("kernels", "kv_cache", "fault"),
                self.fault_note,
                row("cpp_dir"),
                W.HBox([self.run_button, self.profile_button, self.progress]),
                self.status,
                self.profile_status,
            ]
        )
        self.text = TextPanel(self._text_source)  # greedy text on both sides for the same model
        super().__init__(
            [
                W.HTML("<h3>CelerInfer Lab explorer</h3>"),
                *([self.model_note] if model is not None else []),
                W.HBox([config_box, debug_box]),
                self.text,
                self.result_html,
                self.plots,
                self.profile_html,
                self.profile_plots,
            ]
        )
        self._clamp_topk()
        if model is not None:
            self._open_model(model)
        self.validate()

    # ---- a model file -----------------------------------------------------------------------
    def _open_model(self, model: str | Path | Model) -> None:
        """Load the model (any failure is kept as its named error, shown, never raised), show its
        config and inputs on the controls and disable them, and find its tokenizer."""
        from .modelfile import Model
        from .reader import load_model

        name = "the Model given" if isinstance(model, Model) else str(model)
        try:
            if isinstance(model, Model):
                model.check(name)
                loaded = model
            else:
                loaded = load_model(model)
                self.model_path = Path(model)
        except Exception as exc:  # noqa: BLE001 (a file that does not load is shown, the kernel lives on)
            self.model_path = None
            self.model_error = f"{type(exc).__name__}: {exc}"
            for control in self.controls.values():
                control.disabled = True
            self.text.button.disabled = True
            self.message = self.model_error
            text = f"<span style='color:#b00'><b>{_escape(name)} did not load</b>: {_escape(self.model_error)}</span>"
            self.model_note.value = self.status.value = text
            self.text.note.value = text
            return
        self.model = loaded
        self._switching = True  # showing the file's values is not a user's change
        try:
            self._show_file_values(loaded)
        finally:
            self._switching = False
        config = loaded.config
        self.model_note.value = (
            f"<b>Model: {_escape(name)}</b> ({config.num_parameters():,} parameters, inputs batch "
            f"{loaded.batch_size} x seq {loaded.seq_len}). <span style='color:#666'>The config and input "
            f"controls show the file's values and are off: its weights fix them. Decode steps, kernels, "
            f"fault and C++ folder apply.</span>"
        )
        self._open_tokenizer()

    def _show_file_values(self, model: Model) -> None:
        config, c = model.config, self.controls
        values: dict[str, object] = {
            "hidden": config.hidden_size,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "vocab": config.vocab_size,
            "intermediate": config.intermediate_size,
            "qk_norm": config.qk_norm,
            "rope": config.rope_pairing,
            "untied": not config.tie_word_embeddings,
            "moe": config.use_moe,
            "experts": config.num_experts,
            "topk": config.num_experts_per_tok,
            "shared": config.n_shared_experts,
            "topk_renorm": config.topk_renorm,
            "seq_len": model.seq_len,
            "batch": model.batch_size,
            "padding": _padding_of(model.attention_mask),
        }
        seed = model.meta.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            values["seed"] = seed
        for name, value in values.items():
            control = c[name]
            if isinstance(value, int) and not isinstance(value, bool) and hasattr(control, "max"):
                control.max = max(control.max, value)  # a file may be larger than the sliders' range
                control.min = min(control.min, value)
            control.value = value
        for name in _FILE_CONTROLS:
            c[name].disabled = True

    def _open_tokenizer(self) -> None:
        """The tokenizer kept with the model file; without one, the Text row says so and uses the one
        trained here (if the vocabulary fits); a malformed one is said and Complete refuses."""
        from .errors import TokenizerError
        from .tokenizer import load_tokenizer, tokenizer_paths

        assert self.model is not None
        vocab = self.model.config.vocab_size
        if self.model_path is not None and tokenizer_paths(self.model_path)[0].is_file():
            try:
                self.tokenizer = load_tokenizer(self.model_path, vocab)
            except TokenizerError as exc:
                self.tokenizer_error = f"the tokenizer kept with {self.model_path.name} did not load: {exc}"
                self.text.note.value = f"<span style='color:#a00'>{_escape(self.tokenizer_error)}</span>"
                return
            self.text.note.value = (
                f"<span style='color:#666'>tokenizer: the one kept with {_escape(self.model_path.name)} "
                f"({self.tokenizer.vocab_size} ids)</span>"
            )
            return
        where = (
            f"no tokenizer kept with {self.model_path.name}"
            if self.model_path is not None
            else "a Model given in memory has no tokenizer kept with it"
        )
        if vocab >= MIN_VOCAB:
            self.text.note.value = (
                f"<span style='color:#a60'>{_escape(where)}: the text uses the byte-level BPE trained here at "
                f"the model's vocabulary (not the ids it learned: the text is noise, but both sides must "
                f"still agree)</span>"
            )
        else:
            self.text.note.value = (
                f"<span style='color:#a00'>{_escape(where)}, and its vocabulary ({vocab} ids) is too small "
                f"for the one trained here (at least {MIN_VOCAB})</span>"
            )

    def _registered_sets(self, cpp_dir: str) -> list[str]:
        """The kernel sets the folder (plus extra_source) registers; a folder that does not compile
        shows the project's two until Run reports the error."""
        try:
            return engine_for(cpp_dir, None, self.extra_source).kernel_sets
        except Exception:  # noqa: BLE001 (Run shows the error in the widget)
            return list(_DEFAULT_SETS)

    def _set_kernel_sets(self, sets: list[str]) -> None:
        toggle = self.controls["kernels"]
        if list(toggle.options) != [*sets, "all"]:
            value = toggle.value
            toggle.options = [*sets, "all"]
            toggle.value = value if value in toggle.options else ("fast" if "fast" in sets else sets[0])

    @property
    def kernel_sets(self) -> list[str]:
        """The kernel sets the toggle offers (without "all")."""
        return [k for k in self.controls["kernels"].options if k != "all"]

    def chosen_sets(self) -> list[str]:
        value = self.controls["kernels"].value
        return self.kernel_sets if value == "all" else [value]

    # ---- validation ------------------------------------------------------------------------
    def _clamp_topk(self, _change: object = None) -> None:
        """top-k can never exceed the expert count: the slider's range follows it."""
        self.controls["topk"].max = self.controls["experts"].value

    def config(self) -> ModelConfig:
        if self.model is not None:
            return self.model.config  # every field, those without a control too (eps, theta, YaRN, ...)
        c = {k: w.value for k, w in self.controls.items()}
        return ModelConfig(
            hidden_size=c["hidden"],
            num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"],
            num_key_value_heads=c["kv_heads"],
            head_dim=c["head_dim"] or None,
            vocab_size=c["vocab"],
            intermediate_size=c["intermediate"] or None,
            max_position_embeddings=max(TINY.max_position_embeddings, c["seq_len"] + c["decode"]),
            qk_norm=c["qk_norm"],
            rope_pairing=c["rope"],
            use_moe=c["moe"],
            num_experts=c["experts"],
            num_experts_per_tok=c["topk"],
            n_shared_experts=c["shared"],
            topk_renorm=c["topk_renorm"],
            tie_word_embeddings=not c["untied"],
        )

    def validate(self) -> bool:
        """Show why the current combination is invalid next to the control concerned; disable Run."""
        for note in self.notes.values():
            note.value = ""
        if self.model_error:
            self.run_button.disabled = True
            self.message = self.model_error
            return False
        moe = self.controls["moe"].value
        for name in ("experts", "topk", "shared", "topk_renorm"):
            self.controls[name].disabled = not moe or self.model is not None
        try:
            config = self.config()
            # a model file's positions must hold its inputs and the decode steps (random models grow to fit)
            extra = self.controls["decode"].value if self.model is not None else 0
            config.validate(seq_len=self.controls["seq_len"].value + extra)
            ok = True
            grey = "<span style='color:#666'>{}</span>"
            if not self.controls["head_dim"].value:
                self.notes["head_dim"].value = grey.format(f"0: hidden/heads = {config.head_dim}")
            if not self.controls["intermediate"].value:
                self.notes["intermediate"].value = grey.format(f"0: the sizing rule's {config.intermediate_size}")
            if not self.controls["decode"].value:
                self.notes["decode"].value = grey.format("0: compare the prefill only")
        except ConfigError as exc:
            named = [f for f in re.findall(r"(\w+)=", str(exc)) if f in _FIELD_CONTROL] or ["hidden_size"]
            targets = [t for f in named for t in _FIELD_CONTROL[f]] if self.model is None else ["decode"]
            for target in dict.fromkeys(targets):  # every control the rule names
                self.notes[target].value = f"<span style='color:#b00'>✗ {_escape(str(exc))}</span>"
            self.message = str(exc)
            ok = False
        self.run_button.disabled = not ok
        if not self._switching:
            self._render_fault_note()
        return ok

    def _text_source(self) -> TextJob | str:
        """What the text row runs: the controls' model and seed (or the model file and its tokenizer),
        the engine with the chosen fault, the first chosen kernel set; or why it cannot run (a model file
        that did not load, an invalid config, a C++ that does not compile)."""
        if self.model_error:
            return f"the model did not load: {self.model_error}"
        if self.tokenizer_error:
            return self.tokenizer_error
        if self.model is None and not self.validate():
            return f"the config is invalid: {self.message}"
        fault = self._fault()
        try:
            native = engine_for(self.controls["cpp_dir"].value, fault.name if fault else None, self.extra_source)
        except Exception as exc:  # noqa: BLE001 (shown in the widget)
            return f"the C++ did not load: {exc}"
        model = self.model if self.model is not None else self.config()
        c = self.controls
        return TextJob(model, c["seed"].value, native, self.chosen_sets()[0], self.tokenizer, c["kv_cache"].value)

    # ---- faults: run each where it shows ---------------------------------------------------
    def _fault(self) -> Fault | None:
        name = self.controls["fault"].value
        return None if name == "none" else FAULTS[name]

    def _mask(self, config: ModelConfig) -> np.ndarray | None:
        """The attention mask the current controls generate (cheap: inputs only, no weights); the
        file's own with a model file."""
        from .generate import random_inputs

        if self.model is not None:
            return self.model.attention_mask
        c = self.controls
        try:
            return random_inputs(config, c["batch"].value, c["seq_len"].value, c["seed"].value, c["padding"].value)[1]
        except ConfigError:
            return None

    def fault_problems(self, fault: Fault | None = None) -> list[str]:
        """Why ``fault`` (default: the chosen one) cannot show with the current controls; [] when it
        shows (or when the config is invalid: validate() explains that)."""
        fault = fault or self._fault()
        if fault is None:
            return []
        try:
            config = self.config()
        except ConfigError:
            return []
        reasons = why_it_cannot_show(fault, config, self._mask(config), self.controls["kv_cache"].value)
        if not set(self.chosen_sets()) & set(fault.kernels):
            reasons.append(
                f"it changes only the {' and '.join(fault.kernels)} kernels, and the kernel set is "
                f"{self.controls['kernels'].value}"
            )
        for key in ("batch_size", "seq_len"):  # inputs the fault is tuned to (a kernel's row tail)
            control = self.controls[_INPUT_SETTER[key]]
            if key in fault.inputs and control.value != fault.inputs[key]:
                reasons.append(f"it shows with {key}={fault.inputs[key]}, and {control.description} is {control.value}")
        decode = self.controls["decode"].value
        if fault.step > decode:
            reasons.append(f"it first shows at decode step {fault.step}, and decode steps is {decode}")
        return reasons

    def show_fault(self) -> list[str]:
        """If the chosen fault cannot show on the current controls, switch them to a model and kernel
        set that show it (the fault's model overrides, input padding and kernel sets); the note under
        the fault says what changed. Returns the changes ("padding none → left", ...)."""
        fault = self._fault()
        self._switch_text, self.switched = "", []
        reasons = self.fault_problems(fault) if fault is not None else []
        if fault is None or not reasons:
            self._render_fault_note()
            return []
        c, changes = self.controls, []

        def put(name: str, value: object) -> None:
            old = c[name].value
            if old != value:
                c[name].value = value
                changes.append(f"{c[name].description} {_shown(old)} → {_shown(c[name].value)}")

        fixed = self.model is not None  # a model file fixes the config and inputs: only decode and kernels switch
        self._switching = True
        try:
            for field in (
                []
                if fixed
                else sorted(fault.model, key=lambda f: list(_FIELD_SETTER).index(f) if f in _FIELD_SETTER else 99)
            ):
                wanted = fault.model[field]
                if field not in _FIELD_SETTER:
                    continue  # stays a reason below
                try:
                    config = self.config()
                except ConfigError:
                    config = None
                if field == "num_key_value_heads" and config is not None and config.n_rep > 1:
                    continue  # query heads already share kv heads: what a GQA bug needs
                if config is None or getattr(config, field) != wanted:
                    put(_FIELD_SETTER[field], (not wanted) if field == "tie_word_embeddings" else wanted)
            for key, wanted in [] if fixed else fault.inputs.items():
                if key == "padding":
                    if c["padding"].value == "none":
                        put("padding", wanted)
                    put("batch", max(c["batch"].value, 2))  # generate pads every row but the first
                    put("seq_len", max(c["seq_len"].value, 2))
                elif key in _INPUT_SETTER:
                    put(_INPUT_SETTER[key], wanted)
            if fault.step > c["decode"].value:
                put("decode", fault.step)
            if fault.kv_cache != "f32" and c["kv_cache"].value != fault.kv_cache:
                put("kv_cache", fault.kv_cache)
            if not set(self.chosen_sets()) & set(fault.kernels):
                usable = [k for k in fault.kernels if k in self.kernel_sets]
                if usable:
                    put("kernels", usable[0])
        finally:
            self._switching = False
        self.switched = changes
        left = self.fault_problems(fault)
        try:
            config = self.config()
        except ConfigError:
            config = None
        for field, wanted in fault.model.items():
            if fixed:
                break  # why_it_cannot_show named the file's fields already
            if field not in _FIELD_SETTER and (config is None or getattr(config, field) != wanted):
                left.append(f"the explorer has no control for {field}")
        if left:
            where = "on this model file" if fixed else "in the explorer"
            self._switch_text = (
                f"<span style='color:#b00'>✗ It cannot show {where}: {_escape('; '.join(left))}"
                f"{'' if not changes else ' (switched ' + _escape(', '.join(changes)) + ')'}. "
                f"Outside the explorer: celerinfer-lab compare --fault {fault.name} on a model "
                f"that shows it.</span>"
            )
        else:
            self._switch_text = (
                f"<span style='color:#05a'>↻ <b>Switched {_escape(', '.join(changes))}</b> so that "
                f"the fault shows (as you had it, {_escape('; '.join(reasons))}).</span>"
            )
        self.validate()
        return changes

    def _render_fault_note(self) -> None:
        fault = self._fault()
        if fault is None:
            self.fault_note.value = ""
            return
        text = (
            f"<b>{fault.name}</b>: {_escape(fault.breaks)}. Changes the {' and '.join(fault.kernels)} kernels; "
            f"the debugger should name <code>{fault.culprit}</code>."
        )
        problems = self.fault_problems(fault)
        if problems and not self._switch_text.startswith("<span style='color:#b00'>"):
            text += (
                f"<br><span style='color:#a60'>⚠ It cannot show on these settings "
                f"({_escape('; '.join(problems))}): Run switches them to ones that show it.</span>"
            )
        elif self._switch_text:
            text += "<br>" + self._switch_text
        self.fault_note.value = text

    # ---- running ---------------------------------------------------------------------------
    def clear_results(self, status: str = "") -> None:
        """Forget the last run's results and take them off the screen (the table, the plots, the
        status): after an error or a change of settings, nothing stale stays shown."""
        self.report, self.reports, self.step_reports, self.figures = None, {}, {}, []
        self.timings, self.timing_details = {}, {}
        self.result_html.value = ""
        self.plots.clear_output()
        self.plots.outputs = ()  # clear_output() does nothing outside a kernel
        self.status.value = status
        self.progress.value = 0

    def _settings_changed(self, _change: object = None) -> None:
        if self._running or self._switching or not (self.report is not None or self.result_html.value):
            return
        self.clear_results("<span style='color:#666'>settings changed: press Run for new results</span>")

    def _step(self, text: str) -> None:
        self.progress.value += 1
        self.status.value = f"<i>{text}…</i>"

    def run(self) -> None:
        """Generate, run both forwards, time them, compare, plot, for the chosen kernel set(s).
        Errors land in the widget."""
        self._running = True
        try:
            self._run()
        finally:
            self._running = False

    def _run(self) -> None:
        from .bench import time_cpp, time_torch
        from .compare import Comparison, compare, compare_decode
        from .generate import generate_model

        self.clear_results()
        if self.model_error:
            self.message = self.model_error
            self.status.value = f"<span style='color:#b00'>the model did not load: {_escape(self.model_error)}</span>"
            return
        switched = self.show_fault() if self.fault_problems() else []
        if not self.validate():
            self.status.value = f"<span style='color:#b00'>invalid config: {_escape(self.message)}</span>"
            return
        try:
            c = {k: w.value for k, w in self.controls.items()}
            config = self.config()
            if self.model is not None:
                self._step("taking the model file's model")
                model = self.model
            else:
                self._step("generating the model")
                model = generate_model(config, c["batch"], c["seq_len"], c["seed"], c["padding"])
            self._step("compiling the C++")
            fault = None if c["fault"] == "none" else c["fault"]
            native = engine_for(c["cpp_dir"], fault, self.extra_source)
            self._set_kernel_sets(native.kernel_sets)
            chosen = self.controls["kernels"].value
            sets = self.chosen_sets()
            self._step(f"timing PyTorch and the {', '.join(sets)} kernels")
            kv = c["kv_cache"]
            self.timing_details = {"torch_ms": time_torch(model, 2, 15, kv)}
            for name in sets:
                self.timing_details[f"cpp_{name}_ms"] = time_cpp(model, native, 2, 15, name, kv)
            self.timings = {key: t.median_ms for key, t in self.timing_details.items()}
            if c["decode"]:
                self._step(f"comparing every trace point, prefill and {c['decode']} decode steps")
                for name in sets:  # each set's first step that diverges, else its last
                    self.step_reports[name] = compare_decode(model, native, c["decode"], kernels=name, kv_cache=kv)
                    self.reports[name] = next(
                        (r for r in self.step_reports[name] if not r.agrees), self.step_reports[name][-1]
                    )
                shown_report = Comparison(self.reports) if chosen == "all" else self.reports[sets[0]]
            else:
                self._step("comparing every trace point")
                shown_report = compare(model, native, kernels=chosen, kv_cache=kv)
                self.reports = (
                    dict(shown_report.reports) if isinstance(shown_report, Comparison) else {sets[0]: shown_report}
                )
            self.report = shown_report
            self._step("plotting")
            for report in self.reports.values():
                self.figures += [report.plot("depth"), report.plot("logits")]
                if report.culprit is not None and ".self_attn." in report.culprit.name:
                    self.figures.append(report.plot("heatmap"))
        except Exception as exc:  # the widget shows every failure; the kernel lives on
            self.clear_results()  # nothing half-made or from an earlier run stays on screen
            self.message = f"{type(exc).__name__}: {exc}"
            self.status.value = (
                f"<span style='color:#b00'><b>{type(exc).__name__}</b></span><pre>{_escape(str(exc))}</pre>"
            )
            self.result_html.value = (
                f"<details><summary>traceback</summary><pre>{_escape(traceback.format_exc())}</pre></details>"
            )
            return
        verdicts = []
        for name, report in self.reports.items():
            step = f" at decode step {report.meta['step']}" if report.meta.get("step") else ""
            if report.agrees:
                verdicts.append(
                    f"{name} kernels agree" + (f" (prefill and {c['decode']} decode steps)" if c["decode"] else "")
                )
            else:
                where = report.culprit or report.first_divergent
                verdicts.append(
                    f"{name} kernels: {'culprit' if report.culprit else 'first divergent'} "
                    f"{where.name if where else '?'}{step}"
                )
        self.message = f"{config.num_parameters():,} parameters; {', '.join(verdicts)}"
        if switched:
            self.message += f" (switched {', '.join(switched)} so that the fault shows)"
        if self.fault_problems():
            self.message += f" (the fault cannot show here: {'; '.join(self.fault_problems())})"
        times, warning = self._timing_parts()
        self.status.value = f"{times} — {_escape(self.message)}{warning}"
        shown = (
            f"<p>Decode step {shown_report.meta['step']} of {c['decode']} (the first that diverges, else the last)</p>"
            if c["decode"] and not isinstance(shown_report, Comparison)
            else ""
        )
        self.result_html.value = _TABLE_STYLE + shown + shown_report._repr_html_()
        self.plots.clear_output()
        with self.plots:
            for fig in self.figures:
                display(fig)

    # ---- profiling -------------------------------------------------------------------------
    def clear_profile(self, status: str = "") -> None:
        self.profile, self.profile_figures = None, []
        self.profile_html.value = ""
        self.profile_plots.clear_output()
        self.profile_plots.outputs = ()
        self.profile_status.value = status

    def run_profile(self) -> None:
        """Profile the model the controls describe (or the model file) on the chosen kernel set (the
        first of "all"), with the decode steps asked for: the per-op tables and rooflines. Every
        failure is shown in the widget, never raised."""
        from .generate import generate_model
        from .machine import machine_limits
        from .profile import profile_model

        self.clear_profile("<i>profiling…</i>")
        try:
            if self.model_error:
                raise ValueError(f"the model did not load: {self.model_error}")
            if not self.validate():
                raise ValueError(f"invalid config: {self.message}")
            c = {k: w.value for k, w in self.controls.items()}
            model = self.model or generate_model(self.config(), c["batch"], c["seq_len"], c["seed"], c["padding"])
            native = engine_for(c["cpp_dir"], None if c["fault"] == "none" else c["fault"], self.extra_source)
            self._set_kernel_sets(native.kernel_sets)
            kernels = self.chosen_sets()[0]
            if self.profile_limits is None:
                self.profile_status.value = "<i>measuring the machine's limits (once per machine, a few seconds)…</i>"
                self.profile_limits = machine_limits()
            self.profile_status.value = f"<i>profiling the {kernels} kernels and PyTorch…</i>"
            prof = profile_model(
                model, kernels, c["decode"], repeat=3, engine=native, limits=self.profile_limits, kv_cache=c["kv_cache"]
            )
            figures = [prof.plot(phase) for phase in prof.cpp]
        except Exception as exc:  # the widget shows every failure; the kernel lives on
            self.clear_profile()
            self.profile_message = f"{type(exc).__name__}: {exc}"
            self.profile_status.value = (
                f"<span style='color:#b00'><b>profile: {type(exc).__name__}</b></span><pre>{_escape(str(exc))}</pre>"
            )
            return
        self.profile, self.profile_figures = prof, figures
        self.profile_message = (
            f"profiled {kernels} kernels: C++ {1e3 * prof.cpp['prefill'].unprofiled_best:.3f} ms, "
            f"PyTorch {1e3 * prof.torch['prefill'].unprofiled_best:.3f} ms per prefill"
        )
        self.profile_status.value = _escape(self.profile_message)
        parts = []
        for phase in prof.cpp:
            head, *_ = prof.lines(phase)
            table = prof.table(phase)
            parts.append(
                f"<p><b>{_escape(head)}</b></p>" + table.to_html(float_format=lambda v: f"{v:.3g}", na_rep="—")
            )
        self.profile_html.value = _TABLE_STYLE + "".join(parts)
        with self.profile_plots:
            for fig in figures:
                display(fig)

    def timing_html(self) -> str:
        """ "PyTorch 1.234 ms (IQR ...), C++ fast 0.040 ms (IQR ...; 30.9x faster)", each ratio marked
        noisy when bench.Timing says it is unreliable (a wide spread or a loaded machine)."""
        times, warning = self._timing_parts()
        return times + warning

    def _timing_parts(self) -> tuple[str, str]:
        """timing_html's times and its noise warning ("" when the timings are reliable)."""
        d = self.timing_details
        torch_t = d["torch_ms"]
        parts = [f"PyTorch {torch_t.median_ms:.3f} ms <small>({torch_t.spread})</small>"]
        noisy = [torch_t.noise_reason] if torch_t.noise_reason else []  # noisy: has a reason
        for key, t in d.items():
            if key == "torch_ms":
                continue
            ratio, unreliable = t.ratio(torch_t)
            faster = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
            flag = " <span style='color:#a60'>noisy</span>" if unreliable else ""
            parts.append(f"C++ {key[4:-3]} {t.median_ms:.3f} ms <small>({t.spread})</small> ({faster}{flag})")
            if t.noise_reason:
                noisy.append(f"{key[4:-3]}: {t.noise_reason}")
        text = "<b>" + ", ".join(parts) + "</b>"
        warning = (
            (
                f"<br><span style='color:#a60'>⚠ noisy timings, ratios unreliable "
                f"({_escape('; '.join(dict.fromkeys(noisy)))})</span>"
            )
            if noisy
            else ""
        )
        return text, warning


# Widget HTML is not styled like notebook output: keep the report tables' columns apart.
_TABLE_STYLE = (
    "<style>.jupyter-widgets table td, .jupyter-widgets table th, .widget-html table td, "
    ".widget-html table th {padding: 2px 10px; text-align: right; white-space: nowrap;} "
    ".widget-html table {border-collapse: collapse;} "
    ".widget-html table tr:nth-child(even) {background: rgba(0,0,0,0.04);}</style>"
)


def _shown(value: object) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _padding_of(mask: np.ndarray) -> str:
    """The padding dropdown's word for an attention mask: none, left (each padded row's zeros first),
    right (last), or mixed."""
    import numpy as np

    rows = [row for row in mask if not row.all()]
    if not rows:
        return "none"
    left = all(np.all(np.diff(row) >= 0) for row in rows)  # 0 ... 0 1 ... 1
    right = all(np.all(np.diff(row) <= 0) for row in rows)  # 1 ... 1 0 ... 0
    return "left" if left else "right" if right else "mixed"


def explorer(
    cpp_dir: str | Path | None = None, extra_source: str = "", model: str | Path | Model | None = None
) -> Explorer:
    """The explorer layout: config controls, kernel set, fault selector, C++ folder, Run, results.
    ``extra_source``: C++ compiled after the headers (your own kernel set joins the toggle).
    ``model``: a model file's path (or a loaded Model) to explore instead of a random model: the
    config controls show its config and are off, Run compares it, the Text row uses the tokenizer
    kept with the file; a file that does not load is shown as its error."""
    return Explorer(cpp_dir, extra_source, model)
