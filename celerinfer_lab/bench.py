"""Timing both forwards: medians over repeats after warm-up, model loading excluded."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from .config import ModelConfig
from .errors import UsageError
from .generate import generate_model
from .kvcache import check_kv_cache
from .modelfile import Model
from .torch_threads import restores_torch_threads

if TYPE_CHECKING:  # matplotlib, pandas and the engine load only in the functions that use them
    import pandas as pd
    from matplotlib.figure import Figure

    from .history import BenchStore
    from .native import NativeEngine, NativeModel


# A timing is "noisy" (its ratios are not to be trusted) when its interquartile range is more than
# NOISY_SPREAD of its median, or when the machine was loaded while it ran: a 1-minute load average
# above the core count (our own process counts for about 1 of it).
NOISY_SPREAD = 0.25


def machine_load() -> tuple[float, int]:
    """(1-minute load average, cores); load -1.0 where the OS does not tell."""
    import os

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = -1.0
    return load, os.cpu_count() or 1


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    q1_ms: float | None = None  # quartiles of the runs; None: only min/max known
    q3_ms: float | None = None
    load: float = -1.0  # 1-minute load average when timed (-1: unknown)
    cores: int = 0
    samples_ms: list[float] = field(default_factory=list)  # every timed run, in order (the history keeps them)

    @property
    def spread_ms(self) -> float:
        """The interquartile range (max - min when the quartiles are unknown)."""
        if self.q1_ms is None or self.q3_ms is None:
            return self.max_ms - self.min_ms
        return self.q3_ms - self.q1_ms

    @property
    def spread(self) -> str:
        """The spread as text: "IQR a-b ms" (or "min-max a-b ms")."""
        if self.q1_ms is None or self.q3_ms is None:
            return f"min–max {self.min_ms:.3g}–{self.max_ms:.3g} ms"
        return f"IQR {self.q1_ms:.3g}–{self.q3_ms:.3g} ms"

    @property
    def loaded(self) -> bool:
        return self.cores > 0 and self.load > self.cores

    @property
    def noise_reason(self) -> str | None:
        """Why the timing is unreliable, or None."""
        reasons = []
        if self.median_ms > 0 and self.spread_ms > NOISY_SPREAD * self.median_ms:
            reasons.append(f"spread {100 * self.spread_ms / self.median_ms:.0f}% of the median")
        if self.loaded:
            reasons.append(f"load {self.load:.1f} on {self.cores} cores")
        return "; ".join(reasons) or None

    @property
    def noisy(self) -> bool:
        return self.noise_reason is not None

    def ratio(self, other: "Timing") -> tuple[float, bool]:
        """(other's median / this median, whether that ratio is noisy): how many times faster this is."""
        return other.median_ms / self.median_ms, self.noisy or other.noisy

    def ratio_text(self, other: "Timing") -> str:
        """ "3.20x faster" / "0.50x (2.0x slower)", with ", noisy" when either timing is."""
        value, noisy = self.ratio(other)
        text = f"{value:.2f}x" if value >= 1 else f"{value:.2f}x ({1 / value:.1f}x slower)"
        return text + (" — noisy" if noisy else "")

    def short(self) -> str:
        """ "0.123 ms (IQR 0.120–0.130 ms)" plus " — noisy (...)" when it is."""
        text = f"{self.median_ms:.3g} ms ({self.spread})"
        return text + (f" — noisy ({self.noise_reason})" if self.noisy else "")

    def __str__(self) -> str:
        text = (
            f"median {self.median_ms:.3f} ms ({self.spread}; min {self.min_ms:.3f}, max {self.max_ms:.3f}; "
            f"{self.runs} runs)"
        )
        return text + (f" — noisy: {self.noise_reason}" if self.noisy else "")


def time_call(fn: Callable[[], object], warmup: int = 2, repeat: int = 10) -> Timing:
    """Call fn warmup times untimed, then repeat times timed: median, quartiles, min, max, and the
    machine's load while it ran (see Timing.noisy)."""
    return time_calls_interleaved({"": fn}, warmup, repeat)[""]


def time_calls_interleaved(
    fns: dict[str, Callable[[], object]], warmup: int = 2, repeat: int = 10
) -> dict[str, Timing]:
    """time_call for several functions in rounds: each function warmed up, then ``repeat`` rounds that
    call every function once in turn, so the shared host's drifting load hits them alike and the
    ratio of two samples of one round compares them on the same machine (round_ratios)."""
    if repeat < 1:
        raise ValueError(f"repeat={repeat}: need at least one timed run")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    load, cores = machine_load()
    timings = {}
    for name, samples in times.items():
        q1, median, q3 = (float(v) for v in np.percentile(samples, [25, 50, 75]))
        timings[name] = Timing(median, float(min(samples)), float(max(samples)), repeat, q1, q3, load, cores, samples)
    return timings


def round_ratios(base: Timing, other: Timing) -> list[float]:
    """How many times faster ``other`` ran than ``base``, round by round (time_calls_interleaved)."""
    return [b / o for b, o in zip(base.samples_ms, other.samples_ms)]


def time_torch(model: Model, warmup: int = 2, repeat: int = 10, kv_cache: str = "f32") -> Timing:
    """The PyTorch reference as a user runs it: float32, inference mode, torch's default threads (its
    KV cache in ``kv_cache``'s format)."""
    from .reference import ReferenceModel

    ref = ReferenceModel(model, kv_cache=kv_cache)
    return time_call(lambda: ref.forward(), warmup, repeat)


def time_cpp(
    model: Model,
    native: NativeEngine,
    warmup: int = 2,
    repeat: int = 10,
    kernels: str | None = None,
    kv_cache: str = "f32",
) -> Timing:
    """The C++ forward through cppyy (``kernels``, default the engine's; ``kv_cache``: "f32" or
    "bf16"): inputs checked and logits allocated once, outside the timing."""
    return time_call(_cpp_forward(native.prepare(model, kernels, kv_cache)), warmup, repeat)


def _cpp_forward(prepared: NativeModel) -> Callable[[], None]:
    """One timed C++ forward of the model file's inputs: inputs checked and logits allocated once."""
    ids, mask = prepared.check_inputs(None, None)
    logits = np.empty((*ids.shape, prepared.config.vocab_size), dtype=np.float32)
    return lambda: prepared.run(ids, mask, logits)


def sweep(
    cases: Iterable[tuple[str, ModelConfig, int, int]],
    native: NativeEngine | None = None,
    warmup: int = 1,
    repeat: int = 5,
    progress: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Time both forwards for each (label, config, batch, seq_len); a pandas DataFrame, one row each:
    medians (torch_ms, cpp_ms), their quartiles (*_q1_ms, *_q3_ms), min and max, the speedup and
    whether it is noisy (see Timing.noisy)."""
    import pandas as pd

    from .native import load_native

    native = native or load_native(kernels="fast")
    rows = []
    for label, config, batch, seq_len in cases:
        if progress:
            progress(label)
        model = generate_model(config, batch, seq_len, seed=0)
        torch_t, cpp_t = time_torch(model, warmup, repeat), time_cpp(model, native, warmup, repeat)
        row = {"case": label, "parameters": config.num_parameters(), "tokens": batch * seq_len}
        for side, t in (("torch", torch_t), ("cpp", cpp_t)):
            row.update(
                {
                    f"{side}_ms": t.median_ms,
                    f"{side}_q1_ms": t.q1_ms,
                    f"{side}_q3_ms": t.q3_ms,
                    f"{side}_min_ms": t.min_ms,
                    f"{side}_max_ms": t.max_ms,
                }
            )
        speedup, noisy = cpp_t.ratio(torch_t)
        row.update(
            speedup=speedup,
            noisy=noisy,
            note="; ".join(f"{side}: {t.noise_reason}" for side, t in (("torch", torch_t), ("cpp", cpp_t)) if t.noisy),
        )
        rows.append(row)
    return pd.DataFrame(rows).set_index("case")


def plot_sweep(table: pd.DataFrame, x: str = "parameters", figsize: tuple[float, float] = (8, 4)) -> Figure:
    """Forward time against size (log-log), one line per side from sweep()'s table: the medians, with
    a band from the lower to the upper quartile (min to max when the table has no quartiles); noisy
    cases are marked with an open ring and named in the title."""
    from matplotlib.figure import Figure

    from .plots import show_figures_in_ipython

    show_figures_in_ipython()  # a Figure made without pyplot displays in Jupyter once this is done
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    order = table.sort_values(x)
    for side, label, marker in (("torch", "PyTorch", "o"), ("cpp", "C++ (cppyy)", "s")):
        (line,) = ax.plot(order[x], order[f"{side}_ms"], marker=marker, label=f"{label} (median)")
        bands = (("q1", "q3"), ("min", "max"))  # the IQR when measured, else the range
        band = next(((f"{side}_{a}_ms", f"{side}_{b}_ms") for a, b in bands if f"{side}_{a}_ms" in order), None)
        if band is not None:
            ax.fill_between(
                order[x],
                order[band[0]].astype(float),
                order[band[1]].astype(float),
                color=line.get_color(),
                alpha=0.25,
                linewidth=0,
                label=f"{label} ({'IQR' if f'{side}_q1_ms' in order else 'min–max'})",
            )
    for label, row in order.iterrows():
        ax.annotate(str(label), (row[x], row["cpp_ms"]), xytext=(4, -10), textcoords="offset points", fontsize=8)
    noisy = order.index[order["noisy"].astype(bool)] if "noisy" in order else []
    if len(noisy):
        ax.scatter(
            order.loc[noisy, x],
            order.loc[noisy, "cpp_ms"],
            s=160,
            facecolors="none",
            edgecolors="red",
            label="noisy (ratio unreliable)",
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # "3x10^5 4x10^5" labels overlap
    ax.set_xlabel(x)
    ax.set_ylabel("forward time (ms)")
    title = "forward time against size: median and interquartile band"
    if len(noisy):
        title += f"\nnoisy: {', '.join(map(str, noisy))}"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


# ---- the benchmark workflow (celerinfer-lab bench) ----------------------------------------------
def machine_info(cpp_threads: int | None = None) -> dict:
    """The bench record's machine: the CPU and cores as the history's fingerprint reads them, the
    threads of both sides, the versions."""
    import platform

    import torch

    from .fingerprint import machine_fingerprint

    machine = machine_fingerprint()
    return {
        "cpu": machine["cpu"],
        "cores": machine["cores"],
        "torch_threads": torch.get_num_threads(),
        "cpp_threads": cpp_threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _stats(times: Timing, prefix: str) -> dict:
    return {
        f"{prefix}_ms": times.median_ms,
        f"{prefix}_min_ms": times.min_ms,
        f"{prefix}_max_ms": times.max_ms,
        f"{prefix}_q1_ms": times.q1_ms,
        f"{prefix}_q3_ms": times.q3_ms,
        f"{prefix}_noisy": times.noisy,
    }


def _step_ms(marks: list[float]) -> list[float]:
    """Per decode step milliseconds from the marks: the end of the prefill, then the end of each step."""
    return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def decode_torch(
    model: Model, new_tokens: int, kv_cache: str = "f32", steps_ms: list[float] | None = None
) -> tuple[np.ndarray, float]:
    """Greedy decoding with PyTorch's KV cache (``kv_cache``: "f32" or "bf16"): the new tokens and the
    decode time (prefill excluded). ``steps_ms``, when given, receives each decode step's time."""
    from .reference import ReferenceModel, greedy_generate

    marks: list[float] = []
    tokens = greedy_generate(
        ReferenceModel(model, kv_cache=kv_cache),
        model.input_ids,
        model.attention_mask,
        new_tokens,
        after_prefill=lambda: marks.append(time.perf_counter()),
        on_step=lambda step: marks.append(time.perf_counter()) if step >= 1 else None,
    )
    if steps_ms is not None:
        steps_ms.extend(_step_ms(marks))
    return tokens, time.perf_counter() - marks[0]


def decode_cpp(prepared: NativeModel, new_tokens: int, steps_ms: list[float] | None = None) -> tuple[np.ndarray, float]:
    """Greedy decoding with the C++ KV cache, as generate() runs it (the loop in C++; the Python loop for a
    ``--cpp-dir`` copy older than generate_greedy): the new tokens and the decode time (prefill
    excluded). ``steps_ms``, when given, receives each decode step's time."""
    if hasattr(prepared.ns, "generate_greedy"):
        tokens, step_end = prepared.generate_timed(new_tokens)
        marks = list(step_end)
    else:
        marks = []

        def mark(step: int, _tokens: np.ndarray) -> bool:
            if step >= 1:
                marks.append(time.perf_counter())
            return True

        tokens = prepared.generate(new_tokens, after_prefill=lambda: marks.append(time.perf_counter()), on_token=mark)
    if steps_ms is not None:
        steps_ms.extend(_step_ms(marks))
    return tokens, float(marks[-1] - marks[0])


def bench_kernel_sets(native: NativeEngine, kernels: str | list[str] = "fast") -> list[str]:
    """The kernel sets a bench times: one name, a list (or names joined by commas), or "all" (every
    registered set, the fast set first, so the flat JSON keys keep meaning the fast kernels)."""
    if kernels == "all":
        names = native.kernel_sets
        return sorted(names, key=lambda name: name != "fast")  # stable: registration order after fast
    names = kernels.split(",") if isinstance(kernels, str) else list(kernels)  # "fast,bf16,q8": each in turn
    if not names:
        raise ValueError("no kernel set to time")
    return [native.check_kernels(name) for name in names]


@dataclass
class BenchResult:
    """What a bench measured: ``record``, the flat JSON the CLI writes (see run_bench), and the
    timings and logits statistics the printed summary reads."""

    record: dict
    torch_forward: Timing
    cpp_forward: dict[str, Timing]  # kernel set -> its cppyy forward
    logits_stats: dict[str, tuple[list[int], float, float, float]]  # "torch", "cpp (set)" -> shape, min, max, mean
    decode_steps_ms: dict[str, list[float]] = field(default_factory=dict)  # "torch" / kernel set -> each step's time
    llama_cpp_samples: dict[str, list[float]] = field(default_factory=dict)  # "llama.cpp prefill (f32)", ... -> ms

    @property
    def sets(self) -> list[str]:
        return self.record["kernels"]

    def samples(self) -> dict[str, list[float]]:
        """Every timed sample per figure, in milliseconds (lower is faster): "torch prefill",
        "cpp prefill (SET)" for each kernel set (one sample per forward), and with decoding
        "torch decode step", "cpp decode step (SET)" (one per decode step), and llama.cpp's
        "llama.cpp prefill (TYPE)" / "llama.cpp decode step (TYPE)". The benchmark history keeps
        these; base_line_micro reports only its median and is left out."""
        figures = {"torch prefill": list(self.torch_forward.samples_ms)}
        figures.update({f"cpp prefill ({name})": list(t.samples_ms) for name, t in self.cpp_forward.items()})
        for side, steps in self.decode_steps_ms.items():
            figures["torch decode step" if side == "torch" else f"cpp decode step ({side})"] = list(steps)
        return figures | self.llama_cpp_samples


def _logits_stats(logits: np.ndarray) -> tuple[list[int], float, float, float]:
    return list(logits.shape), float(logits.min()), float(logits.max()), float(logits.mean())


def _load_times(config: ModelConfig, batch: int, seq_len: int, seed: int, work: Path) -> tuple[dict, Model, Path, Path]:
    """Write the model twice (JSON, and JSON with a safetensors sidecar) and time Python's load of
    each: (timings, the sidecar model, the JSON path, the sidecar path)."""
    from .reader import load_model

    times = {}
    start = time.perf_counter()
    json_path = generate_model(config, batch, seq_len, seed, output=work / "model.json")
    side_path = generate_model(config, batch, seq_len, seed, output=work / "model_sidecar.json", sidecar=True)
    times["generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    load_model(json_path)
    times["python_load_json_ms"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    model = load_model(side_path)
    times["python_load_sidecar_ms"] = (time.perf_counter() - start) * 1e3
    return times, model, json_path, side_path


def _format_file(model: Model, work: Path, files: dict[str, Path]) -> Path:
    """``model`` (a bf16/q8 model) written once per weight format in ``work``, for base_line_micro."""
    fmt = model.weight_format
    if fmt not in files:
        files[fmt] = work / f"model_{fmt}.json"
        model.save(files[fmt])
    return files[fmt]


# A decoder for the interleaved rounds: new tokens -> (tokens, seconds after the prefill, each step's ms).
Decoder = Callable[[int], tuple[np.ndarray, float, list[float]]]


def _cpp_decoder(prepared: NativeModel) -> Decoder:
    def run(new_tokens: int) -> tuple[np.ndarray, float, list[float]]:
        steps: list[float] = []
        tokens, seconds = decode_cpp(prepared, new_tokens, steps)
        return tokens, seconds, steps

    return run


def interleaved_decode(
    decoders: dict[str, Decoder], decode: int, passes: int, steps: int, steps_ms: dict[str, list[float]]
) -> tuple[dict[str, list[float]], dict[str, list[np.ndarray]]]:
    """``passes`` rounds in which every decoder decodes ``decode`` tokens in turn (after one warm-up of
    3 each): per decoder its tokens/s in every pass (``steps`` steps per pass) and its tokens. Decode
    reads every weight once per token, so its speed follows the machine's memory traffic, which on a
    shared machine drifts by a quarter within a minute (measured): rates taken in the same round see
    the same machine, and their ratio holds where rates from separate runs do not."""
    for run in decoders.values():
        run(3)
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    tokens: dict[str, list[np.ndarray]] = {name: [] for name in decoders}
    for _ in range(passes):
        for name, run in decoders.items():
            out, seconds, step_times = run(decode)
            rates[name].append(steps / seconds)
            tokens[name].append(np.asarray(out))
            steps_ms.setdefault(name, []).extend(step_times)
    return rates, tokens


READ_PROBE = "read bandwidth"  # the decoder name of the read probe in the decode rounds


def _read_probe(native: NativeEngine, nbytes: float) -> Decoder | None:
    """A decoder that reads ``nbytes`` (a float32 decode step's bytes) once per "step" on the kernels'
    own thread pool (read_probe.hpp); None for a copy of the C++ without read_probe.hpp."""
    fast = getattr(native.ns, "fast", None)
    read = getattr(fast, "read_sum", None) if fast is not None else None
    if read is None:
        return None
    buffer = np.ones(max(64, int(nbytes) // 4 // 64 * 64), dtype=np.float32)  # numpy asks for huge pages

    def run(new_tokens: int) -> tuple[np.ndarray, float, list[float]]:
        marks = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            read(buffer, buffer.size)
            marks.append(time.perf_counter())
        return np.zeros(0, dtype=np.int64), marks[-1] - marks[0], _step_ms(marks)

    return run


def pass_ratios(rates: dict[str, list[float]], name: str, base: str) -> list[float]:
    """``name``'s decode rate over ``base``'s, pass by pass (the same round: the same machine)."""
    return [a / b for a, b in zip(rates[name], rates[base])]


def _measure_torch(model: Model, warmup: int, repeat: int, kv_cache: str = "f32") -> tuple[Timing, np.ndarray]:
    """The PyTorch reference's forward time and its logits (its KV cache in ``kv_cache``'s format)."""
    from .reference import ReferenceModel

    ref = ReferenceModel(model, kv_cache=kv_cache)
    timing = time_call(lambda: ref.forward(), warmup, repeat)
    return timing, ref.forward()[0].numpy()


def _agreement(model: Model, torch_logits: np.ndarray, cpp_logits: np.ndarray, alone_logits: np.ndarray | None) -> dict:
    """How far the C++ logits (cppyy and the standalone binary, when it ran) are from PyTorch's
    (float32 weights: for a bf16/q8 set this includes what the precision costs), over real tokens."""
    real = model.attention_mask.astype(bool)
    diff = np.abs(cpp_logits - torch_logits)[real]
    return {
        "max_abs_diff": float(diff.max()),
        "standalone_max_abs_diff": None
        if alone_logits is None
        else float(np.abs(alone_logits - torch_logits)[real].max()),
        "logits_rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(torch_logits[real])),
    }


def _measure_decode(
    model: Model,
    native: NativeEngine,
    prepared_sets: dict[str, NativeModel],
    llama_engines: dict,
    decode: int,
    passes: int,
    batch: int,
    per_set: dict[str, dict],
    llama_figures: dict,
    kv_cache: str = "f32",
    steps_ms: dict[str, list[float]] | None = None,
    llama_samples: dict[str, list[float]] | None = None,
) -> dict:
    """Greedy decoding of ``decode`` tokens: PyTorch once (its tokens are the reference; a warm-up of
    3 first), then every kernel set and llama.cpp engine in ``passes`` interleaved rounds
    (interleaved_decode), with a read probe (_read_probe) in every round. Each set's median tokens/s,
    its rate per pass, whether every pass produced PyTorch's tokens, the bytes a step reads as GB/s
    (profile.forward_cost) and that as a fraction of the probe's GB/s in the same pass go into
    ``per_set``; llama.cpp's rates into ``llama_figures``. Returns PyTorch's rate, the first set's
    and the probe's GB/s. ``steps_ms`` receives each side's step times ("torch", then each set's
    name), ``llama_samples`` llama.cpp's."""
    from .profile import forward_cost

    steps_ms = {} if steps_ms is None else steps_ms
    decode_torch(model, 3, kv_cache)  # warm-up
    torch_tokens, torch_s = decode_torch(model, decode, kv_cache, steps_ms.setdefault("torch", []))
    steps = batch * (decode - 1)
    decoders = {name: _cpp_decoder(prepared) for name, prepared in prepared_sets.items()}
    decoders |= {f"llama.cpp ({t})": engine.decode for t, engine in llama_engines.items()}
    start = model.input_ids.shape[1] + (decode - 1) / 2  # a step's average cached tokens

    def step_bytes(fmt: str) -> float:
        return forward_cost(model.config, fmt, batch, 1, start, kv_cache).bytes

    probe = _read_probe(native, step_bytes("f32"))
    if probe is not None:
        decoders[READ_PROBE] = probe
    llama_steps: dict[str, list[float]] = {}
    rates, tokens = interleaved_decode(decoders, decode, passes, steps, llama_steps)
    read_gbs = [r / batch * step_bytes("f32") * 1e-9 for r in rates[READ_PROBE]] if probe else []
    for name in prepared_sets:
        steps_ms[name] = llama_steps.pop(name)
        gbs = [r / batch * step_bytes(per_set[name]["weight_format"]) * 1e-9 for r in rates[name]]
        per_set[name].update(
            cpp_decode_tok_s=float(np.median(rates[name])),
            cpp_decode_tok_s_passes=rates[name],
            decode_tokens_equal=all(bool((torch_tokens == t).all()) for t in tokens[name]),
            decode_gbs=float(np.median(gbs)),
            decode_of_read_bandwidth=float(np.median([a / b for a, b in zip(gbs, read_gbs)])) if read_gbs else None,
            decode_of_read_bandwidth_passes=[a / b for a, b in zip(gbs, read_gbs)],
        )
    for gguf_type in llama_engines:
        name = f"llama.cpp ({gguf_type})"
        llama_figures[gguf_type].update(decode_tok_s=float(np.median(rates[name])), decode_tok_s_passes=rates[name])
        if llama_samples is not None:
            llama_samples[f"llama.cpp decode step ({gguf_type})"] = llama_steps[name]
    first = per_set[next(iter(prepared_sets))]
    return {
        "decode_tokens": decode,
        "decode_passes": passes,
        "torch_decode_tok_s": steps / torch_s,
        "decode_read_gbs": float(np.median(read_gbs)) if read_gbs else None,
        "decode_read_gbs_passes": read_gbs,
        "cpp_decode_tok_s": first["cpp_decode_tok_s"],
        "decode_tokens_equal": first["decode_tokens_equal"],
    }


def _measure_llama_cpp(
    model: Model,
    types: list[str],
    work: Path,
    threads: int | None,
    warmup: int,
    repeat: int,
    decode: int,
    kv_cache: str,
    torch_logits: np.ndarray,
    stack: contextlib.ExitStack,
    samples: dict[str, list[float]] | None = None,
) -> tuple[dict, dict]:
    """llama.cpp on the same weights and tokens, per GGUF type: its prefill Timing's figures and its
    logits against PyTorch's (float32 weights: F16/Q8_0 include what their precision costs), and the
    engines, left open on ``stack`` for the decode rounds (_measure_decode adds their rates).
    ({"skipped": why}, {}) when it cannot run. ``samples`` receives every timed prefill (for the
    benchmark history)."""
    from .llama_cpp_engine import LlamaCppModel, llama_cpp_missing

    missing = llama_cpp_missing()
    if missing:
        return {"skipped": missing}, {}
    samples = {} if samples is None else samples
    figures: dict = {}
    engines: dict = {}
    for gguf_type in types:
        engine = LlamaCppModel(model, gguf_type, work, threads, decode, kv_cache, logits_all=True)
        stack.callback(engine.close)
        engines[gguf_type] = engine
        timing = time_call(engine.prefill, warmup, repeat)
        samples[f"llama.cpp prefill ({gguf_type})"] = list(timing.samples_ms)
        logits = engine.logits()
        diff = np.abs(logits - torch_logits[0])
        figures[gguf_type] = {
            **_stats(timing, "forward"),
            "max_abs_diff": float(diff.max()),
            "logits_rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(torch_logits[0])),
            "top1_agreement": float((logits.argmax(-1) == torch_logits[0].argmax(-1)).mean()),
        }
    return figures, engines


@restores_torch_threads
def measure_bench(
    config: ModelConfig,
    batch: int,
    seq_len: int,
    seed: int = 123,
    threads: int | None = None,
    repeat: int = 10,
    warmup: int = 3,
    decode: int = 0,
    work_dir: str | Path = ".",
    cpp_dir: str | None = None,
    kernels: str | list[str] = "fast",
    progress: Callable[[str], None] | None = None,
    kv_cache: str = "f32",
    standalone: bool = True,
    llama_cpp: list[str] | None = None,
    decode_passes: int = 3,
) -> BenchResult:
    """generate -> PyTorch forward -> C++ through cppyy -> standalone C++ -> comparison (-> decode),
    the C++ steps once per kernel set in ``kernels`` (a name, a list, or "all"); the model files and
    builds in ``work_dir``. ``progress`` hears what is about to be measured. Prints nothing.
    ``kv_cache``: "f32" or "bf16" for both sides (base_line_micro has only the float32 cache: with
    "bf16" it is not run for the forward rows). ``standalone=False``: base_line_micro is neither
    built nor run (its figures None), as when only the timed samples matter (the history).
    ``llama_cpp``: GGUF types (f32, f16, q8_0) to time llama.cpp in too, on the same weights
    (record["llama_cpp"]; skipped with the reason when llama-cpp-python is absent). ``decode_passes``:
    the interleaved decode rounds (see interleaved_decode); each rate is their median."""
    import torch

    from .native import load_native
    from .standalone import cached_standalone, run_standalone

    check_kv_cache(kv_cache)
    if decode == 1:  # the first token comes from the prefill: a rate counts the steps after it
        raise UsageError("decode=1: no decode step to time after the prefill's token; give 2 or more (or 0)")
    if decode and (isinstance(decode_passes, bool) or not isinstance(decode_passes, int) or decode_passes < 1):
        raise UsageError(f"decode_passes={decode_passes!r}: the interleaved decode rounds, a whole number >= 1")
    if llama_cpp:
        from .llama_cpp_engine import check_gguf_types

        llama_cpp = check_gguf_types(llama_cpp)  # before any work, as an unknown kernel set
        if batch != 1:
            raise UsageError(f"llama.cpp runs one sequence: --batch-size {batch}, need 1 with the llama.cpp engine")
    native = load_native(cpp_dir, kernels="fast")  # first: an unknown kernel set fails before any work
    sets = bench_kernel_sets(native, kernels)
    pool_before = native.threads  # the C++ pool is process-wide too: put back as torch's count is
    try:
        if threads:
            torch.set_num_threads(threads)
            native.set_threads(threads)
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        record: dict = {
            "config": config.to_dict(),
            "batch": batch,
            "seq_len": seq_len,
            "parameters": config.num_parameters(),
            "kernels": sets,
            "kv_cache": kv_cache,
            "cpp_dir": str(cpp_dir) if cpp_dir else None,  # None: this project's cpp/
        }
        if progress:
            progress(
                f"model: {config.num_parameters():,} parameters, batch {batch} x seq {seq_len}; "
                f"kernels {', '.join(sets)}; files in {work}"
            )
        times, model, json_path, side_path = _load_times(config, batch, seq_len, seed, work)
        record.update(times)

        torch_t, torch_logits = _measure_torch(model, warmup, repeat, kv_cache)
        record.update(_stats(torch_t, "torch_forward"))
        stats = {"torch": _logits_stats(torch_logits)}

        binary = cached_standalone(cpp_dir, build_dir=work / "build") if standalone else None
        env_threads = {"THREADS": str(threads)} if threads else {}
        per_set: dict[str, dict] = {}
        prepared_sets = {name: native.prepare(model, name, kv_cache) for name in sets}
        # The sets' forwards in interleaved rounds: their ratios (prefill bf16 / fast) are taken round by round.
        cpp_timings = time_calls_interleaved(
            {name: _cpp_forward(prepared) for name, prepared in prepared_sets.items()}, warmup, repeat
        )
        fmt_files: dict[str, Path] = {}
        for name in sets:
            cpp_logits = prepared_sets[name].forward().logits
            stats[f"cpp ({name})"] = _logits_stats(cpp_logits)
            fmt = native.kernel_format(name)
            # A bf16/q8 set reads a file of its own format (written once per format, as `quantize` would).
            path = json_path if fmt == "f32" else _format_file(prepared_sets[name].model, work, fmt_files)
            alone_env = {**env_threads, "KERNELS": name, "KV_CACHE": kv_cache}
            alone = run_standalone(binary, path, work / f"out_{name}", warmup, repeat, alone_env) if binary else None
            per_set[name] = {
                **_stats(cpp_timings[name], "cpp_forward"),
                # its prefill speed over the fast set's, round by round (None without fast, or for fast)
                "cpp_forward_vs_fast_rounds": round_ratios(cpp_timings["fast"], cpp_timings[name])
                if "fast" in cpp_timings and name != "fast"
                else None,
                "weight_format": fmt,
                "standalone_forward_ms": alone.forward_ms if alone else None,
                "standalone_load_ms": alone.load_ms if alone else None,
                **_agreement(model, torch_logits, cpp_logits, alone.logits if alone else None),
            }
        record.update(per_set[sets[0]])
        record["standalone_load_sidecar_ms"] = None
        if binary is not None:
            record["standalone_load_sidecar_ms"] = run_standalone(
                binary, side_path, work / "out_sidecar", 0, 1, {**env_threads, "KERNELS": "fast"}
            ).load_ms
        record["machine"] = machine_info(native.threads)

        steps_ms: dict[str, list[float]] = {}
        llama_samples: dict[str, list[float]] = {}
        with contextlib.ExitStack() as stack:  # llama.cpp's engines stay open for the decode rounds
            llama_engines: dict = {}
            if llama_cpp:
                if progress:
                    progress(f"llama.cpp: {', '.join(llama_cpp)} (GGUF of the same weights)")
                # llama.cpp on as many threads as the C++ (llama-cpp-python's own default is half the cores)
                record["llama_cpp"], llama_engines = _measure_llama_cpp(
                    model, llama_cpp, work, native.threads, warmup, repeat, decode, kv_cache, torch_logits, stack,
                    llama_samples,
                )  # fmt: skip
            if decode:
                if progress:
                    progress(f"decode: {decode} tokens, {decode_passes} interleaved passes")
                record.update(
                    _measure_decode(
                        model, native, prepared_sets, llama_engines, decode, decode_passes, batch, per_set,
                        record.get("llama_cpp") or {}, kv_cache, steps_ms, llama_samples,
                    )
                )  # fmt: skip
        record["kernel_sets"] = per_set
        return BenchResult(record, torch_t, cpp_timings, stats, steps_ms, llama_samples)
    finally:
        native.set_threads(pool_before)


def bench_lines(result: BenchResult) -> list[str]:
    """The bench's summary as printed: each forward's time and ratio to PyTorch, load times, logits
    statistics, the largest difference from PyTorch per set, and the decode rates."""
    record, torch_t, sets = result.record, result.torch_forward, result.sets
    per_set = record["kernel_sets"]
    lines = [] if record.get("kv_cache", "f32") == "f32" else ["KV cache: bf16 on both sides (keys and values rounded)"]
    lines += [
        f"{'PyTorch forward':28s} {torch_t.median_ms:10.3f} ms   1.00x   ({torch_t.spread}; min {torch_t.min_ms:.3f}, "
        f"max {torch_t.max_ms:.3f})" + (f" — noisy: {torch_t.noise_reason}" if torch_t.noisy else "")
    ]
    for name in sets:
        cpp_t = result.cpp_forward[name]
        for label, ms, spread in (
            (f"C++ via cppyy ({name})", per_set[name]["cpp_forward_ms"], f"   ({cpp_t.spread})"),
            (f"C++ standalone ({name})", per_set[name]["standalone_forward_ms"], ""),
        ):
            if ms is None:
                why = "keeps a float32 KV cache" if record.get("kv_cache", "f32") != "f32" else "not run"
                lines.append(f"{label:28s}        n/a   (base_line_micro {why})")
                continue
            noisy = torch_t.noisy or (cpp_t.noisy and spread)
            lines.append(
                f"{label:28s} {ms:10.3f} ms  {torch_t.median_ms / ms:5.2f}x faster{spread}"
                + (" — noisy, ratio unreliable" if noisy else "")
            )
    for label, alone_key, python_key in (
        ("load, JSON only", "standalone_load_ms", "python_load_json_ms"),
        ("load, safetensors sidecar", "standalone_load_sidecar_ms", "python_load_sidecar_ms"),
    ):
        alone = record[alone_key]
        alone_text = f"{alone:10.1f} ms" if alone is not None else f"{'n/a':>13s}"
        lines.append(f"{label:28s} {alone_text} (base_line_micro), {record[python_key]:.1f} ms (Python)")
    for name in sets:
        rounds = per_set[name].get("cpp_forward_vs_fast_rounds")
        if rounds:
            lines.append(
                f"prefill {name} / fast: {float(np.median(rounds)):.2f}x (median of {len(rounds)} interleaved "
                f"rounds; {_pass_range(rounds, 'x').replace('per pass', 'per round')})"
            )
    for label, (shape, low, high, mean) in result.logits_stats.items():
        lines.append(f"logits {label:16s}: shape {shape} min {low:.6f} max {high:.6f} mean {mean:.6f}")
    for name in sets:
        r = per_set[name]
        alone = r["standalone_max_abs_diff"]
        lines.append(
            f"max |cpp - torch| ({name}) {r['max_abs_diff']:.3e} (relative L2 {r['logits_rel_l2']:.2e}); "
            + (f"standalone {alone:.3e}" if alone is not None else "standalone n/a")
            + (f" ({r['weight_format']} weights against float32)" if r["weight_format"] != "f32" else "")
        )
    if "decode_tokens" in record:
        torch_rate = record["torch_decode_tok_s"]
        passes = record.get("decode_passes", 1)
        for name in sets:
            r = per_set[name]
            lines.append(
                f"decode {record['decode_tokens']} tokens after {record['seq_len']} ({name}): torch {torch_rate:.1f} "
                f"tok/s, C++ {r['cpp_decode_tok_s']:.1f} tok/s ({r['cpp_decode_tok_s'] / torch_rate:.2f}x; "
                f"{_pass_range(r.get('cpp_decode_tok_s_passes'), '')}); same tokens: {r['decode_tokens_equal']}"
                + (f" ({r['weight_format']} weights)" if r["weight_format"] != "f32" else "")
            )
        read = record.get("decode_read_gbs")
        for name in sets:
            r = per_set[name]
            if read and r.get("decode_of_read_bandwidth") is not None:
                lines.append(
                    f"decode ({name}) reads {r['decode_gbs']:.1f} GB/s: {r['decode_of_read_bandwidth']:.2f} of the read "
                    f"bandwidth in the same passes ({read:.1f} GB/s; "
                    f"{_pass_range(r['decode_of_read_bandwidth_passes'], '', 2)})"
                )
        if "fast" in per_set:
            rates = {
                name: per_set[name].get("cpp_decode_tok_s_passes") or [per_set[name]["cpp_decode_tok_s"]]
                for name in sets
            }
            for name in sets:
                if name != "fast":
                    ratios = pass_ratios(rates, name, "fast")
                    lines.append(
                        f"decode {name} / fast: {float(np.median(ratios)):.2f}x (median of {passes} interleaved "
                        f"passes; {_pass_range(ratios, 'x')})"
                    )
    return lines + _llama_cpp_lines(record, torch_t)


def _pass_range(values: list[float] | None, unit: str, digits: int | None = None) -> str:
    """The spread of a figure over the interleaved decode passes, as "per pass 1.83–1.95x" (``digits``
    after the point: 2 with a unit, else 1)."""
    if not values or len(values) < 2:
        return "one pass"
    d = (2 if unit else 1) if digits is None else digits
    return f"per pass {min(values):.{d}f}–{max(values):.{d}f}{unit}"


def _llama_cpp_lines(record: dict, torch_t: Timing) -> list[str]:
    """llama.cpp's rows: its prefill against PyTorch, its logits against PyTorch's, and its decode rate
    beside the first kernel set's."""
    llama = record.get("llama_cpp")
    if llama is None:
        return []
    if "skipped" in llama:
        return [f"llama.cpp: skipped — {llama['skipped']}"]
    lines = []
    first = record["kernels"][0]
    for gguf_type, r in llama.items():
        label = f"llama.cpp ({gguf_type})"
        lines.append(
            f"{label:28s} {r['forward_ms']:10.3f} ms  {torch_t.median_ms / r['forward_ms']:5.2f}x faster   "
            f"(IQR {r['forward_q1_ms']:.3g}–{r['forward_q3_ms']:.3g} ms); max |llama.cpp - torch| "
            f"{r['max_abs_diff']:.3e} (relative L2 {r['logits_rel_l2']:.2e}, top-1 agreement {r['top1_agreement']:.3f})"
            + (" — noisy, ratio unreliable" if r["forward_noisy"] or torch_t.noisy else "")
        )
        if "decode_tok_s" in r:
            cpp = record["kernel_sets"][first]
            ratios = [a / b for a, b in zip(cpp.get("cpp_decode_tok_s_passes", []), r.get("decode_tok_s_passes", []))]
            lines.append(
                f"decode {record['decode_tokens']} tokens ({label}): {r['decode_tok_s']:.1f} tok/s; "
                f"C++ ({first}) / {label}: "
                + (
                    f"{float(np.median(ratios)):.2f}x (interleaved passes; {_pass_range(ratios, 'x')})"
                    if ratios
                    else f"{cpp['cpp_decode_tok_s'] / r['decode_tok_s']:.2f}x"
                )
            )
    return lines


def run_bench(
    config: ModelConfig,
    batch: int,
    seq_len: int,
    seed: int = 123,
    threads: int | None = None,
    repeat: int = 10,
    warmup: int = 3,
    decode: int = 0,
    work_dir: str | None = None,
    cpp_dir: str | None = None,
    log: Callable[[str], None] = print,
    kernels: str | list[str] = "fast",
    kv_cache: str = "f32",
    standalone: bool = True,
    store: BenchStore | None = None,
    llama_cpp: list[str] | None = None,
    decode_passes: int = 3,
) -> dict:
    """``celerinfer-lab bench``: measure_bench, then its summary to ``log`` line by line; returns the
    record (the JSON the CLI writes). With ``store`` (``bench --save``) the result, its samples and
    provenance are appended to that benchmark history (history.py) and ``record["saved_id"]`` is its id.

    The record's flat keys (cpp_forward_ms, standalone_forward_ms, max_abs_diff, cpp_decode_tok_s,
    ...) are the first set's; ``record["kernel_sets"]`` holds every set's, by name. The model files
    and builds go to ``work_dir`` (kept), or to a temporary folder removed on return (hundreds of MB
    for large presets)."""
    import tempfile

    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="celerinfer-bench-"))
        result = measure_bench(
            config,
            batch,
            seq_len,
            seed,
            threads,
            repeat,
            warmup,
            decode,
            work_dir,
            cpp_dir,
            kernels,
            progress=log,
            kv_cache=kv_cache,
            standalone=standalone,
            llama_cpp=llama_cpp,
            decode_passes=decode_passes,
        )
    for line in bench_lines(result):
        log(line)
    if store is not None:
        result.record["saved_id"] = store.save(result.record, result.samples())
        log(f"saved result #{result.record['saved_id']} to {store.path} ({len(result.samples())} figures with samples)")
    return result.record
