"""The explorer's text row: a prompt, greedy generation on both sides (complete.py) for the model the
explorer's controls describe, the two texts side by side and the first divergence judged.

The explorer's models are random, so the text is noise; what the panel shows is the debugger's
answer on tokens: identical, a tie, or the op where a bug starts (a fault from the explorer's menu).
The tokenizer is the byte-level BPE trained on the shipped text (tokenizer.py), at the model's
vocabulary size.
"""

from __future__ import annotations

import html
import traceback
from typing import TYPE_CHECKING, Callable

import ipywidgets as W

from .config import ModelConfig

if TYPE_CHECKING:
    from .complete import Completion
    from .native import NativeEngine
    from .tokenizer import Tokenizer

MIN_VOCAB = 260  # byte-level BPE: 256 byte tokens and the chat specials
MAX_TOKENIZER_VOCAB = 2048  # larger vocabularies reuse a 2,048-id tokenizer (the shipped text has no more merges)

# What the panel needs from the explorer: (config, seed, engine, kernel set), or a reason it cannot run.
Source = Callable[[], "tuple[ModelConfig, int, NativeEngine, str] | str"]


class TextPanel(W.VBox):
    def __init__(self, source: Source):
        self.source = source
        self.prompt = W.Text(value="First Citizen:", description="prompt", layout=W.Layout(width="420px"))
        self.new_tokens = W.IntSlider(value=16, min=1, max=64, description="new tokens")
        self.button = W.Button(description="Complete", icon="align-left")
        self.output = W.HTML()
        self.completion: Completion | None = None
        self._tokenizers: dict[int, Tokenizer] = {}
        self.button.on_click(lambda _button: self.complete())
        super().__init__(
            [
                W.HTML("<b>Text</b> (greedy, both sides)"),
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
        config, seed, native, kernels = source
        if config.vocab_size < MIN_VOCAB:
            self.output.value = (
                f"<span style='color:#a00'>text needs a vocabulary of at least {MIN_VOCAB} ids (byte-level BPE: "
                f"256 bytes and the specials); vocab is {config.vocab_size}</span>"
            )
            return
        self.output.value = "<i>generating on both sides…</i>"
        try:
            self.completion = self._complete(config, seed, native, kernels)
        except Exception as exc:  # noqa: BLE001 (the widget shows every failure)
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            self.output.value = f"<span style='color:#a00'>{html.escape(last)}</span>"
            return
        self.output.value = completion_html(self.completion)

    def _complete(self, config: ModelConfig, seed: int, native: NativeEngine, kernels: str) -> Completion:
        from .complete import complete
        from .generate import generate_model

        tokenizer = self.tokenizer(config.vocab_size)
        model = generate_model(config, batch_size=1, seq_len=4, seed=seed)
        return complete(
            model,
            self.prompt.value,
            self.new_tokens.value,
            native=native,
            kernels=kernels,
            tokenizer=tokenizer,
            stop_at_eos=False,
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
