"""llama.cpp as a third engine: the model written as GGUF (gguf_export) and run through
llama-cpp-python, so a bench puts llama.cpp's F32 / F16 / Q8_0 beside PyTorch and this C++ on the
very same weights and tokens.

llama-cpp-python is an optional extra (``pip install 'celerinfer-lab[llama]'`` builds llama.cpp from
source); without it, ``llama_cpp_missing()`` says why and the bench leaves llama.cpp out with that
reason. The KV cache is llama.cpp's F32 (BF16 with ``kv_cache="bf16"``), as this C++ keeps it —
llama.cpp's own default is F16, which would make its attention cheaper and its logits rounder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .gguf_export import GGUF_TYPES, write_gguf
from .modelfile import Model

GGML_TYPE_F32, GGML_TYPE_BF16 = 0, 30  # ggml_type values of llama.cpp's KV cache


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (None when it can)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install 'celerinfer-lab[llama]' builds it from source)"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the gguf package is not installed (pip install 'celerinfer-lab[real]')"
    return None


def check_gguf_types(types: str | list[str]) -> list[str]:
    """The GGUF types to run: names joined by commas, or a list; each one of GGUF_TYPES."""
    names = [t.strip() for t in types.split(",")] if isinstance(types, str) else list(types)
    bad = [t for t in names if t not in GGUF_TYPES]
    if not names or bad:
        raise UsageError(f"llama.cpp types {bad or names}: each must be one of {', '.join(GGUF_TYPES)}")
    return names


def prompt_tokens(model: Model) -> list[int]:
    """The token ids llama.cpp is fed: the model file's first row, which must be unpadded (llama.cpp
    runs one sequence without an attention mask)."""
    ids, mask = model.input_ids, model.attention_mask
    if ids.shape[0] != 1:
        raise UsageError(f"llama.cpp runs one sequence: the model's inputs have batch {ids.shape[0]}, need 1")
    if mask is not None and not bool(np.all(mask[0] == 1)):
        raise UsageError("llama.cpp runs unpadded sequences: the model's attention_mask has padding")
    return [int(t) for t in ids[0]]


@contextlib.contextmanager
def _without_amx(llama_cpp: Any) -> Iterator[None]:
    """Models loaded inside load without llama.cpp's extra buffer types when its build has AMX.

    ggml's AMX buffer type segfaults in ``ggml_backend_amx_mul_mat`` on this project's Q8_0 models
    (measured on an Intel Xeon with AMX: the whole process dies, a pytest run with it; upstream
    ggml-org/llama.cpp#20824 is open). ``Llama`` takes no argument for it, so the default model
    parameters it starts from are swapped for a copy with ``use_extra_bufts`` off. A build without
    AMX (every AMD machine of this kind) is left as it is, repacking included."""
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        yield
        return
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def without_extra_bufts() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_extra_bufts
    try:
        yield
    finally:
        module.llama_model_default_params = default


class LlamaCppModel:
    """One GGUF of ``model`` loaded in llama.cpp, sized for a prompt of ``len(tokens)`` and
    ``decode`` new tokens, the prompt evaluated in one batch (as this C++ prefills), on ``threads``
    threads (None: every core, as this C++ and PyTorch take)."""

    def __init__(
        self,
        model: Model,
        gguf_type: str,
        work: Path,
        threads: int | None = None,
        decode: int = 0,
        kv_cache: str = "f32",
        logits_all: bool = False,
    ) -> None:
        missing = llama_cpp_missing()
        if missing:
            raise UsageError(f"llama.cpp cannot run: {missing}")
        import llama_cpp

        self.gguf_type = check_gguf_types([gguf_type])[0]
        self.tokens = prompt_tokens(model)
        self.vocab_size = model.config.vocab_size
        self.path = write_gguf(model, Path(work) / f"model-{gguf_type}.gguf", gguf_type)
        n = len(self.tokens)
        kv = {"f32": GGML_TYPE_F32, "bf16": GGML_TYPE_BF16}[kv_cache]
        with _without_amx(llama_cpp):
            self.llm: Any = llama_cpp.Llama(
                str(self.path),
                n_ctx=n + decode + 1,
                n_batch=n,
                n_ubatch=n,
                n_threads=threads or os.cpu_count(),  # llama-cpp-python's default is half the cores
                n_threads_batch=threads or os.cpu_count(),
                type_k=kv,
                type_v=kv,
                logits_all=logits_all,
                verbose=False,
            )

    def prefill(self) -> None:
        """Evaluate the prompt from an empty cache."""
        self.llm.reset()
        self.llm.eval(self.tokens)

    def logits(self) -> np.ndarray:
        """Every prompt position's logits [seq, vocab] of the last prefill (needs logits_all)."""
        return np.array(self.llm.scores[: len(self.tokens), : self.vocab_size], dtype=np.float32)

    def decode(self, new_tokens: int) -> tuple[list[int], float, list[float]]:
        """Greedy decoding as the C++'s ``generate`` times it: the prompt prefilled untimed, then
        ``new_tokens`` choices on llama.cpp's own last logits with ``new_tokens - 1`` one-token steps
        between them: (tokens, seconds after the prefill, each step's milliseconds)."""
        import llama_cpp

        self.prefill()
        out: list[int] = []
        marks = [time.perf_counter()]
        for step in range(new_tokens):
            last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            out.append(int(np.argmax(np.ctypeslib.as_array(last, shape=(self.vocab_size,)))))
            if step + 1 < new_tokens:
                self.llm.eval([out[-1]])
                marks.append(time.perf_counter())
        steps_ms = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
        return out, time.perf_counter() - marks[0], steps_ms

    def close(self) -> None:
        self.llm.close()
        self.path.unlink(missing_ok=True)
