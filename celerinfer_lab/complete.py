"""Text in, text out: greedy generation on both sides, side by side, and the first divergence diagnosed.

``complete(model, prompt)`` encodes the prompt with the tokenizer kept with the model file
(tokenizer.py; ``chat=True`` renders it through the chat template first), then decodes greedily
with the KV cache on both sides in lockstep: the float32 PyTorch reference and the C++ forward
each choose their own next token from their own logits and feed it back, so after a divergence
each side goes on with its own text. Each step is one line (both texts' ends side by side).

At the first step k where the chosen tokens differ, the decode comparison runs on the prompt and
the k tokens both sides agreed on (``compare_decode(..., feed=...)``: prefill and k steps, every
trace point against the float64 oracle, accumulated and teacher forced). The verdict:

* **bug** — a forward up to step k diverges: its culprit and diagnosis are the answer (the first
  forward that diverges, which may be before k: an error can stay below a top-1 change for a while);
* **tie** — every forward agrees within tolerance and the two chosen tokens' float64 logits differ
  by no more than the float floor of the logits at step k: FACTOR times the float32 reference's
  largest error on that row (``PointTolerance.elem_tol``, the rule that counts bad elements).
  Either token is right; rounding picked one. Not a bug;
* **within tolerance** — every forward agrees, yet the gap is above that floor: reported with
  both numbers (it has not been seen; it would mean the tolerance is too loose at lm_head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:
    from .modelfile import Model
    from .native import NativeEngine
    from .report import Report
    from .tokenizer import Tokenizer

VERDICTS = ("bug", "tie", "within tolerance")
TAIL = 34  # characters of each text shown per line


@dataclass
class Divergence:
    """The first step whose chosen tokens differ, and why."""

    step: int  # 0: the token chosen after the prefill
    torch_id: int | None  # None: that side had stopped (end of sequence)
    cpp_id: int | None
    verdict: str  # one of VERDICTS
    report: Report  # the forward the verdict rests on (the first that diverges, else step `step`'s)
    report_step: int
    gap: float  # |float64 logit of torch's token - of the C++ token| at step `step`
    margin: float  # the float floor of the logits there (a gap at most this is a tie)
    culprit: str | None = None
    diagnosis: str | None = None

    def summary(self, tokenizer: Tokenizer | None = None) -> str:
        def tok(i: int | None) -> str:
            if i is None:
                return "(stopped)"
            return f"{tokenizer.decode([i])!r} (id {i})" if tokenizer is not None else f"id {i}"

        head = f"first divergence at step {self.step}: torch chose {tok(self.torch_id)}, C++ chose {tok(self.cpp_id)}"
        numbers = f"float64 logit gap {self.gap:.3g}, float floor of the logits {self.margin:.3g}"
        if self.verdict == "bug":
            where = (
                "" if self.report_step == self.step else f" (the forward of step {self.report_step} already diverges)"
            )
            lines = [head, f"verdict: bug{where}", f"culprit: {self.culprit or 'none isolated'}"]
            if self.diagnosis:
                lines.append(f"diagnosis: {self.diagnosis}")
            return "\n".join(lines)
        if self.verdict == "tie":
            return "\n".join(
                [
                    head,
                    f"verdict: tie: the two tokens' logits are closer than float32 can tell apart ({numbers}); "
                    "every trace point agrees within tolerance: either choice is right, not a bug",
                ]
            )
        return "\n".join([head, f"verdict: within tolerance: every trace point agrees, but {numbers}"])


@dataclass
class Completion:
    """Both sides' greedy continuations of one prompt."""

    prompt: str  # the text encoded (after the chat template, with --chat)
    prompt_ids: list[int]
    torch_ids: list[int]
    cpp_ids: list[int]
    torch_text: str
    cpp_text: str
    kernels: str
    divergence: Divergence | None
    lines: list[str]  # what was printed, step by step

    @property
    def identical(self) -> bool:
        return self.torch_ids == self.cpp_ids

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _shown(text: str, width: int = TAIL) -> str:
    """The end of ``text`` on one line, padded to ``width``: newlines as ⏎, other control characters
    escaped (a random model's vertical tab would break the columns)."""
    flat = "".join(
        "⏎" if c == "\n" else c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return (("…" + flat[-(width - 1) :]) if len(flat) > width else flat).ljust(width)


class _ReferenceStepper:
    """The float32 reference decoding one token at a time with its own KV cache."""

    def __init__(self, model: Model, prompt: np.ndarray, kv_cache: str = "f32") -> None:
        import torch

        from .reference import KVCache, ReferenceModel

        self.torch = torch
        self.ref, self.cache = ReferenceModel(model, kv_cache=kv_cache), KVCache.empty()
        self.ids = torch.from_numpy(prompt)
        self.mask = torch.ones_like(self.ids)

    def step(self) -> int:
        logits, _ = self.ref.forward(self.ids, self.mask, cache=self.cache, logits_to_keep=1)  # the last is read
        chosen = int(logits[0, -1].argmax())
        self.ids = self.torch.tensor([[chosen]], dtype=self.torch.int64)
        self.mask = self.torch.cat([self.mask, self.torch.ones_like(self.ids)], dim=1)
        return chosen


def _diagnose(
    model: Model,
    native: NativeEngine,
    kernels: str,
    agreed: list[int],
    torch_id: int | None,
    cpp_id: int | None,
    kv_cache: str = "f32",
) -> Divergence:
    """Compare the prefill and the ``agreed`` steps; judge the choice at step len(agreed)."""
    from .compare import compare_decode

    step = len(agreed)
    feed = np.array([agreed], dtype=np.int64).reshape(1, step)
    reports = compare_decode(model, native, kernels=kernels, feed=feed, kv_cache=kv_cache)
    last = reports[-1]
    oracle = np.asarray(last.runs["oracle"]["lm_head"][0, -1], dtype=np.float64)
    ref32 = np.asarray(last.runs["ref32"]["lm_head"][0, -1], dtype=np.float64)
    margin = last.tolerances.at("lm_head").elem_tol(float(np.max(np.abs(ref32 - oracle))))
    gap = abs(oracle[torch_id] - oracle[cpp_id]) if torch_id is not None and cpp_id is not None else float("inf")
    bad = next((r for r in reports if not r.agrees), None)
    if bad is not None:
        point = bad.culprit or bad.first_divergent
        return Divergence(
            step,
            torch_id,
            cpp_id,
            "bug",
            bad,
            int(bad.meta["step"]),
            float(gap),
            margin,
            culprit=point.name if point is not None else None,
            diagnosis=bad.diagnosis,
        )
    verdict = "tie" if gap <= margin else "within tolerance"
    return Divergence(step, torch_id, cpp_id, verdict, last, step, float(gap), margin)


def complete(
    model: str | Path | Model,
    prompt: str | list[dict[str, str]],
    max_new_tokens: int = 32,
    *,
    chat: bool = False,
    kernels: str | None = None,
    native: NativeEngine | None = None,
    tokenizer: Tokenizer | None = None,
    stop_at_eos: bool = True,
    on_line: Callable[[str], object] | None = None,
    kv_cache: str = "f32",
) -> Completion:
    """Greedy generation of ``max_new_tokens`` on both sides from ``prompt``, side by side.

    ``model``: a model file (its tokenizer is the one kept with it: tokenizer.py), or a Model with
    ``tokenizer`` given. ``prompt``: text; with ``chat``, the user message (or a list of messages)
    rendered by the chat template. ``native``: the C++ engine (default: this project's cpp/; a
    ``load_native(fault=...)`` one to see a bug found); ``kernels``: its kernel set. ``stop_at_eos``:
    a side stops after choosing the tokenizer's eos_token. ``on_line``: called with each line as it
    is made (the CLI prints them). ``kv_cache``: the KV cache's format on both sides ("f32" or "bf16",
    keys and values rounded as they join it)."""
    from .native import load_native
    from .reader import load_model
    from .tokenizer import load_tokenizer

    if isinstance(model, (str, Path)):
        path, model = model, load_model(model)
        tokenizer = tokenizer or load_tokenizer(path, model.config.vocab_size)
    elif tokenizer is None:
        raise UsageError("complete(Model, ...) needs tokenizer=...; a model file path brings its own")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens={max_new_tokens!r}: must be a whole number >= 1")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {model.config.vocab_size}"
        )
    if chat or not isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text, ids = prompt, tokenizer.encode(prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens: give some text")
    positions = len(ids) + max_new_tokens - 1  # the last token chosen is never fed back
    if positions > model.config.max_position_embeddings:
        raise UsageError(
            f"the prompt ({len(ids)} tokens) and max_new_tokens={max_new_tokens} need {positions} positions; "
            f"the model has max_position_embeddings={model.config.max_position_embeddings}"
        )
    model.config.validate(seq_len=positions)
    prompt_ids = np.array([ids], dtype=np.int64)
    run_model = dataclasses.replace(model, input_ids=prompt_ids, attention_mask=np.ones_like(prompt_ids))
    native = native or load_native()
    prepared = native.prepare(run_model, kernels, kv_cache)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    emit(f"prompt ({len(ids)} tokens): {text!r}")
    # A bf16/q8 set's model is quantized (prepared.model): torch decodes on the same weights, so a
    # different token is the kernel's doing, not the quantization's.
    fmt = prepared.model.weight_format
    torch_label = "torch (float32)" if fmt == "f32" else f"torch ({fmt} weights)"
    if kv_cache != "f32":
        torch_label = f"{torch_label[:-1]}, {kv_cache} KV)"
    emit(f"{'step':>4s}   {torch_label:{TAIL}s} | C++ ({prepared.kernels})")
    torch_ids: list[int] = []
    cpp_ids: list[int] = []
    first: list[int] = []  # the first step where the choices differ
    ref = _ReferenceStepper(prepared.model, prompt_ids, kv_cache)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    state = {"torch_done": False}

    def show(step: int, torch_id: int | None, cpp_id: int | None) -> None:
        if torch_id != cpp_id and not first:
            first.append(step)
        mark = "≠" if torch_id != cpp_id else " "
        torch_text, cpp_text = tokenizer.decode(torch_ids), tokenizer.decode(cpp_ids)
        emit(f"{step:4d} {mark} {_shown(torch_text)} | {_shown(cpp_text).rstrip()}")

    def both(step: int, chosen: np.ndarray) -> bool:
        cpp_id = int(chosen[0, 0])
        cpp_ids.append(cpp_id)
        torch_id = None
        if not state["torch_done"]:
            torch_id = ref.step()
            torch_ids.append(torch_id)
            state["torch_done"] = torch_id == eos
        show(step, torch_id, cpp_id)
        return cpp_id != eos

    prepared.generate(max_new_tokens, prompt_ids, np.ones_like(prompt_ids), on_token=both)
    while not state["torch_done"] and len(torch_ids) < max_new_tokens:  # the C++ stopped first
        torch_ids.append(ref.step())
        state["torch_done"] = torch_ids[-1] == eos
        show(len(torch_ids) - 1, torch_ids[-1], None)
    torch_text, cpp_text = tokenizer.decode(torch_ids), tokenizer.decode(cpp_ids)
    emit(f"torch: {torch_text!r}")
    emit(f"C++:   {cpp_text!r}")
    divergence = None
    if first:
        k = first[0]
        divergence = _diagnose(
            run_model,
            native,
            prepared.kernels,
            torch_ids[:k],
            torch_ids[k] if k < len(torch_ids) else None,
            cpp_ids[k] if k < len(cpp_ids) else None,
            kv_cache,
        )
        for line in divergence.summary(tokenizer).splitlines():
            emit(line)
    else:
        emit(f"identical: {len(cpp_ids)} tokens, the same on both sides")
    return Completion(text, ids, torch_ids, cpp_ids, torch_text, cpp_text, prepared.kernels, divergence, lines)
