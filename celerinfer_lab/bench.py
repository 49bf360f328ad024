"""Timing both forwards: medians over repeats after warm-up, model loading excluded."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from matplotlib.figure import Figure

from . import plots  # noqa: F401  (makes Figures display in Jupyter)
from .config import ModelConfig
from .generate import generate_model
from .modelfile import Model


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int

    def __str__(self) -> str:
        return f"median {self.median_ms:.3f} ms (min {self.min_ms:.3f}, max {self.max_ms:.3f}; {self.runs} runs)"


def time_call(fn: Callable[[], object], warmup: int = 2, repeat: int = 10) -> Timing:
    """Call fn warmup times untimed, then repeat times timed."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat}: need at least one timed run")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(float(np.median(times)), float(min(times)), float(max(times)), repeat)


def time_torch(model: Model, warmup: int = 2, repeat: int = 10) -> Timing:
    """The PyTorch reference as a user runs it: float32, inference mode, torch's default threads."""
    from .reference import ReferenceModel
    ref = ReferenceModel(model)
    return time_call(lambda: ref.forward(), warmup, repeat)


def time_cpp(model: Model, native, warmup: int = 2, repeat: int = 10) -> Timing:
    """The C++ forward through cppyy: inputs checked and logits allocated once, outside the timing."""
    prepared = native.prepare(model)
    ids, mask = prepared.check_inputs(None, None)
    logits = np.empty((model.batch_size, model.seq_len, model.config.vocab_size), dtype=np.float32)
    return time_call(lambda: prepared.run(ids, mask, logits), warmup, repeat)


def sweep(cases: Iterable[tuple[str, ModelConfig, int, int]], native=None, warmup: int = 1, repeat: int = 5,
          progress: Callable[[str], None] | None = None):
    """Time both forwards for each (label, config, batch, seq_len); a pandas DataFrame, one row each."""
    import pandas as pd

    from .native import load_native
    native = native or load_native()
    rows = []
    for label, config, batch, seq_len in cases:
        if progress:
            progress(label)
        model = generate_model(config, batch, seq_len, seed=0)
        torch_t, cpp_t = time_torch(model, warmup, repeat), time_cpp(model, native, warmup, repeat)
        rows.append({"case": label, "parameters": config.num_parameters(), "tokens": batch * seq_len,
                     "torch_ms": torch_t.median_ms, "cpp_ms": cpp_t.median_ms,
                     "speedup": torch_t.median_ms / cpp_t.median_ms})
    return pd.DataFrame(rows).set_index("case")


def plot_sweep(table, x: str = "parameters", figsize=(8, 4)) -> Figure:
    """Forward time against size (log-log), one line per side, from sweep()'s table."""
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    order = table.sort_values(x)
    ax.plot(order[x], order["torch_ms"], marker="o", label="PyTorch")
    ax.plot(order[x], order["cpp_ms"], marker="s", label="C++ (cppyy)")
    for label, row in order.iterrows():
        ax.annotate(str(label), (row[x], row["cpp_ms"]), xytext=(4, -10), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("forward time (ms, median)")
    ax.set_title("forward time against size")
    ax.legend()
    return fig
