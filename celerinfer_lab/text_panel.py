"""The explorer's text row: a prompt, greedy generation on both sides (complete.py) for the explorer's
model, the two texts side by side and the first divergence judged.

With a random model (the explorer's sliders) the text is noise; what the panel shows is the
debugger's answer on tokens: identical, a tie, or the op where a bug starts (a fault from the
explorer's menu). With a model file (``explorer(model=...)``) the tokenizer is the one kept with the
file; without one (and for random models) it is the byte-level BPE trained on the shipped text
(tokenizer.py), at the model's vocabulary size.
"""

from __future__ import annotations

import html
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import ipywidgets as W

from .config import ModelConfig

if TYPE_CHECKING:
    from .complete import Completion
    from .modelfile import Model
    from .native import NativeEngine
    from .tokenizer import Tokenizer

MIN_VOCAB = 260  # byte-level BPE: 256 byte tokens and the chat specials
MAX_TOKENIZER_VOCAB = 2048  # larger vocabularies reuse a 2,048-id tokenizer (the shipped text has no more merges)


@dataclass
class TextJob:
    """What the panel runs: a model (a config: the random model ``seed`` makes of it; or a loaded
    model file), the C++ engine, its kernel set, the tokenizer (None: the one trained here) and the
    KV cache's format on both sides."""

    model: ModelConfig | Model
    seed: int
    native: NativeEngine
    kernels: str
    tokenizer: Tokenizer | None = None
    kv_cache: str = "f32"


# What the panel needs from the explorer: a TextJob, or the reason it cannot run.
Source = Callable[[], "TextJob | str"]


class TextPanel(W.VBox):
    def __init__(self, source: Source):
        self.source = source
        self.prompt = W.Text(value="First Citizen:", description="prompt", layout=W.Layout(width="420px"))
        self.new_tokens = W.IntSlider(value=16, min=1, max=64, description="new tokens")
        self.button = W.Button(description="Complete", icon="align-left")
        self.output = W.HTML()
        self.note = W.HTML()  # which tokenizer, when the explorer has a model file
        self.completion: Completion | None = None
        self._tokenizers: dict[int, Tokenizer] = {}
        self.button.on_click(lambda _button: self.complete())
        super().__init__(
            [
                W.HTML("<b>Text</b> (greedy, both sides)"),
                self.note,
                W.HBox([self.prompt, self.new_tokens, self.button]),
                self.output,
            ]
        )

    def tokenizer(self, vocab_size: int) -> Tokenizer:
        from .tokenizer import train_tokenizer

        size = min(vocab_size, MAX_TOKENIZER_VOCAB)
        if size not in self._tokenizers:
            self._tokenizers[size] = train_tokenizer(vocab_size=size)
        return self._tokenizers[size]

    def complete(self) -> None:
        """Generate on both sides and show the result; every failure is shown here, never raised."""
        self.completion = None
        source = self.source()
        if isinstance(source, str):
            self.output.value = f"<span style='color:#a00'>{html.escape(source)}</span>"
            return
        config = source.model if isinstance(source.model, ModelConfig) else source.model.config
        if source.tokenizer is None and config.vocab_size < MIN_VOCAB:
            self.output.value = (
                f"<span style='color:#a00'>text needs a vocabulary of at least {MIN_VOCAB} ids (byte-level BPE: "
                f"256 bytes and the specials); vocab is {config.vocab_size}</span>"
            )
            return
        self.output.value = "<i>generating on both sides…</i>"
        try:
            self.completion = self._complete(source)
        except Exception as exc:  # noqa: BLE001 (the widget shows every failure)
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            self.output.value = f"<span style='color:#a00'>{html.escape(last)}</span>"
            return
        self.output.value = completion_html(self.completion)

    def _complete(self, job: TextJob) -> Completion:
        from .complete import complete
        from .generate import generate_model

        if isinstance(job.model, ModelConfig):
            model = generate_model(job.model, batch_size=1, seq_len=4, seed=job.seed)
        else:
            model = job.model
        return complete(
            model,
            self.prompt.value,
            self.new_tokens.value,
            native=job.native,
            kernels=job.kernels,
            tokenizer=job.tokenizer or self.tokenizer(model.config.vocab_size),
            stop_at_eos=False,
            kv_cache=job.kv_cache,
        )


def completion_html(done: Completion) -> str:
    """The side-by-side lines, ending with the verdict (identical, or the first divergence judged),
    in red when it is a bug."""
    color = "#a00" if done.divergence is not None and done.divergence.verdict == "bug" else "#060"
    steps = done.lines
    n_verdict = 1 if done.divergence is None else len(done.divergence.summary().splitlines())
    body, verdict = "\n".join(steps[:-n_verdict]), "\n".join(steps[-n_verdict:])
    return (
        f"<pre style='font-size:11px;margin:0'>{html.escape(body)}</pre>"
        f"<pre style='color:{color};margin:0'>{html.escape(verdict)}</pre>"
    )
