"""The per-op profile: where each forward's time goes, op by op, on both sides, against what this
machine can do (machine.py).

C++: the forward runs with an ``OpTimer`` as its trace sink (trace.hpp). A timing sink takes no
values: at each trace point the hook reads ``steady_clock`` and nothing else, so an op's time is the
time since the previous point, and the kernels run as untraced (no attention taps, no copies). With
no sink the hook is the null check it always was. PyTorch: the reference's own trace points, through
``reference.OpTimer`` (``time.perf_counter`` at each point). Both sides name ops by the same trace
points; the attention's scores, probs and context are one op kind, ``attention`` (the fast kernels
fuse them, and the C++ stamps once after store_kv + attention).

Each op kind has a cost: the FLOPs it must do and the bytes it must move (weights in the kernel
set's format, activations in float32), written once per kind below (``COSTS``). Achieved GFLOP/s and
GB/s follow from the time; the op's limit is the roofline's ``min(peak, intensity × bandwidth)`` with
the machine's FMA peak and its DRAM bandwidth (its cache bandwidth when the model's weights fit in
L3), for the thread count used."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import ModelConfig
from .errors import UsageError
from .machine import MachineLimits
from .modelfile import Model
from .torch_threads import restores_torch_threads
from .trace import Point, has_feature, point_name

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from .native import Cpp, NativeEngine, NativeModel
    from .reference import ReferenceModel

ACT = 4  # bytes of a float32 activation
WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "q8": 34 / 32}  # per weight, by the format a kernel set reads
ATTENTION = ("scores", "probs", "context")  # one op kind: the fast kernels fuse them
# Points booked as one op (trace name of the first point, op kind): attention's three, which the fast
# kernels fuse, and q/k/v and gate/up, which the fast kernel sets run as one thread-pool job at decode
# (forward.hpp's linears) and stamp after it, so booked apart the first would carry the job and the
# others ~0. Both sides and both phases book them alike, so the rows compare.
BOOKED_AS: dict[str, tuple[Point, str]] = {
    **{name: (Point.context, "attention") for name in ATTENTION},
    **{name: (Point.q_proj, "qkv_proj") for name in ("q_proj", "k_proj", "v_proj")},
    **{name: (Point.gate_proj, "gate_up_proj") for name in ("gate_proj", "up_proj")},
}
PHASES = ("prefill", "decode")
# the op kinds that read weights (the rest read only activations)
WEIGHTED = frozenset(
    ("embed_tokens", "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    + ("router_probs", "routed_experts", "shared_expert")
)


@dataclass(frozen=True)
class Work:
    """What one forward computes: the config, B rows of S new tokens after ``start`` cached ones."""

    config: ModelConfig
    B: int
    S: int
    start: float  # cached tokens before the new ones (a decode's average over its steps)
    weight_bytes: float  # bytes per weight in the kernel set's format

    @property
    def N(self) -> int:  # token rows
        return self.B * self.S

    @property
    def keys(self) -> float:
        """(row, key) pairs the causal attention scores, per head: each new token sees the cache and itself."""
        return self.B * (self.S * self.start + self.S * (self.S + 1) / 2)


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


# ---- the cost of each op kind: one small function each -----------------------------------------------
def linear_cost(w: Work, n_in: int, n_out: int, weight_bytes: float | None = None) -> Cost:
    """y = x W^T: 2 FLOPs per weight per row; the weights once, x in and y out."""
    wb = w.weight_bytes if weight_bytes is None else weight_bytes
    return Cost(2.0 * w.N * n_in * n_out, n_in * n_out * wb + ACT * w.N * (n_in + n_out))


def rmsnorm_cost(w: Work, rows: int, n: int) -> Cost:
    """Square, sum, scale, weight: 4 FLOPs per element; x in, y out, the weight once."""
    return Cost(4.0 * rows * n, ACT * (2 * rows * n + n))


def rope_cost(w: Work, heads: int) -> Cost:
    """x·cos + rotate(x)·sin: 3 FLOPs per element; x in and out, the new positions' cos and sin rows."""
    n = w.N * heads * w.config.head_dim
    return Cost(3.0 * n, ACT * (2 * n + 2 * w.S * w.config.head_dim))


def attention_cost(w: Work) -> Cost:
    """Per head and (row, key): q·k (2·hd), softmax (~5), p·v (2·hd). Bytes: q in, context out, each
    cached key and value read once per kv head (as the fast kernels read them), the new ones stored."""
    c = w.config
    flops = c.num_attention_heads * w.keys * (4.0 * c.head_dim + 5)
    kv_dim = c.num_key_value_heads * c.head_dim
    keys_read = w.B * (w.start + w.S)
    return Cost(flops, ACT * (2 * w.N * c.num_attention_heads * c.head_dim + 2 * keys_read * kv_dim + 2 * w.N * kv_dim))


def add_cost(w: Work) -> Cost:
    """A residual add: one FLOP per element, two in, one out."""
    return Cost(1.0 * w.N * w.config.hidden_size, 3 * ACT * w.N * w.config.hidden_size)


def swiglu_cost(w: Work, width: int) -> Cost:
    """silu(g)·u: exp, add, divide, two multiplies (~5 FLOPs, exp counted as one); g, u in, act out."""
    return Cost(5.0 * w.N * width, 3 * ACT * w.N * width)


def embed_cost(w: Work) -> Cost:
    """A row copy per token: no arithmetic."""
    return Cost(0.0, 2 * ACT * w.N * w.config.hidden_size)


def round_cost(w: Work) -> Cost:
    """A bf16 KV cache's rounding of the new keys (or values): one op per element, in and out."""
    n = w.N * w.config.num_key_value_heads * w.config.head_dim
    return Cost(1.0 * n, 2 * ACT * n)


def router_cost(w: Work) -> Cost:
    """The MoE router: a float32 linear to the experts, then its softmax."""
    c = w.config
    lin = linear_cost(w, c.hidden_size, c.num_experts, weight_bytes=4.0)
    return Cost(lin.flops + 5.0 * w.N * c.num_experts, lin.bytes)


def topk_cost(w: Work) -> Cost:
    """Top-k over the experts: about one comparison per expert and choice."""
    c = w.config
    return Cost(1.0 * w.N * c.num_experts * c.num_experts_per_tok, ACT * w.N * (c.num_experts + c.num_experts_per_tok))


def experts_cost(w: Work, rows: float, experts: float) -> Cost:
    """``rows`` token rows through gate, up, swiglu and down of one expert each; ``experts`` distinct
    experts' weights read once."""
    c = w.config
    H, width = c.hidden_size, c.moe_intermediate_size
    flops = rows * (6.0 * H * width + 5.0 * width)
    return Cost(flops, experts * 3 * H * width * w.weight_bytes + ACT * rows * (2 * H + 3 * width))


def routed_cost(w: Work) -> Cost:
    c = w.config
    rows = w.N * c.num_experts_per_tok
    return experts_cost(w, rows, min(c.num_experts, rows))


def shared_cost(w: Work) -> Cost:
    return experts_cost(w, w.N, 1)


# op kind -> its cost for one forward of one layer (or of the model, for model-level points)
COSTS: dict[str, Callable[[Work], Cost]] = {
    "embed_tokens": embed_cost,
    "input_layernorm": lambda w: rmsnorm_cost(w, w.N, w.config.hidden_size),
    "qkv_proj": lambda w: linear_cost(w, w.config.hidden_size, w.config.q_dim + 2 * w.config.kv_dim),
    "q_norm": lambda w: rmsnorm_cost(w, w.N * w.config.num_attention_heads, w.config.head_dim),
    "k_norm": lambda w: rmsnorm_cost(w, w.N * w.config.num_key_value_heads, w.config.head_dim),
    "rope_q": lambda w: rope_cost(w, w.config.num_attention_heads),
    "rope_k": lambda w: rope_cost(w, w.config.num_key_value_heads),
    "k_cached": round_cost,
    "v_cached": round_cost,
    "attention": attention_cost,
    "o_proj": lambda w: linear_cost(w, w.config.q_dim, w.config.hidden_size),
    "attn_residual": add_cost,
    "post_attention_layernorm": lambda w: rmsnorm_cost(w, w.N, w.config.hidden_size),
    "router_probs": router_cost,
    "topk_idx": topk_cost,
    "topk_weight": lambda w: Cost(0.0, 0.0),
    "routed_experts": routed_cost,
    "shared_expert": shared_cost,
    "gate_up_proj": lambda w: linear_cost(w, w.config.hidden_size, 2 * w.config.intermediate_size),
    "act": lambda w: swiglu_cost(w, w.config.intermediate_size),
    "down_proj": lambda w: linear_cost(w, w.config.intermediate_size, w.config.hidden_size),
    "block": add_cost,
    "norm": lambda w: rmsnorm_cost(w, w.N, w.config.hidden_size),
    "lm_head": lambda w: linear_cost(w, w.config.hidden_size, w.config.vocab_size),
}


def kind_of(point: Point) -> str:
    """The op kind a trace point's time is booked under: its id, or its group's (BOOKED_AS)."""
    return BOOKED_AS.get(point.name, (point, point.name))[1]


def forward_cost(
    config: ModelConfig, weight_format: str, batch: int, S: int, start: float, kv_cache: str = "f32"
) -> Cost:
    """A whole forward's cost (S new tokens per row after ``start`` cached ones): the sum of its op
    kinds' as the profile books them (q, k and v one qkv_proj, ...), every layer. At decode its bytes
    are what a step must read: the weights in ``weight_format``, the KV cache, the activations."""
    w = Work(config, batch, S, start, WEIGHT_BYTES[weight_format])
    flops = nbytes = 0.0
    for in_layer in (False, True):
        kinds = {
            kind_of(p): p
            for p in Point
            if p.value.in_layer == in_layer and has_feature(config, p.value.feature, kv_cache)
        }
        for kind, point in kinds.items():
            count = config.n_shared_experts if point.value.feature == "shared_expert" else 1
            count *= config.num_hidden_layers if in_layer else 1
            cost = COSTS[kind](w)
            flops, nbytes = flops + count * cost.flops, nbytes + count * cost.bytes
    return Cost(flops, nbytes)


@dataclass
class PhaseTimes:
    """One phase (prefill, or one decode step on average) of one side: per run, seconds by trace
    name (each name's op kind in ``kinds``), and the same forwards' wall times unprofiled."""

    runs: list[dict[str, float]] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    layers: dict[str, int | None] = field(default_factory=dict)
    unprofiled: list[float] = field(default_factory=list)

    def add_run(self, stamps: list[tuple[Point, int | None, int | None, float]], steps: int = 1) -> None:
        run: dict[str, float] = {}
        for point, layer, index, seconds in stamps:
            # a group's points are booked under its first (BOOKED_AS): one op on both sides
            name = point_name(BOOKED_AS.get(point.name, (point, ""))[0], layer, index)
            self.kinds[name], self.layers[name] = kind_of(point), layer
            run[name] = run.get(name, 0.0) + seconds / steps
        self.runs.append(run)

    def by_name(self) -> dict[str, float]:
        """Median seconds per trace name over the runs, in forward order."""
        names = list(self.runs[0]) if self.runs else []
        return {n: statistics.median(r.get(n, 0.0) for r in self.runs) for n in names}

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, seconds in self.by_name().items():
            out[self.kinds[name]] = out.get(self.kinds[name], 0.0) + seconds
        return out

    @property
    def profiled_best(self) -> float:
        """The fastest profiled forward: the sum of its per-op times."""
        return min(sum(r.values()) for r in self.runs)

    @property
    def unprofiled_best(self) -> float:
        return min(self.unprofiled)

    @property
    def overhead(self) -> float:
        """profiled / unprofiled - 1, each the best of its runs (the 5% rule)."""
        return self.profiled_best / self.unprofiled_best - 1.0


@dataclass
class Profile:
    """Per-op times of both sides for prefill (and decode), with the machine's limits."""

    config: ModelConfig
    kernels: str
    weight_format: str
    threads: int
    torch_threads: int
    batch: int
    seq_len: int
    decode: int
    limits: MachineLimits
    cpp: dict[str, PhaseTimes]
    torch: dict[str, PhaseTimes]
    weight_bytes_total: float
    kv_cache: str = "f32"  # both sides' KV cache format

    def work(self, phase: str) -> Work:
        wb = WEIGHT_BYTES[self.weight_format]
        if phase == "decode":  # a step's cost is linear in its cache length: the average step's
            return Work(self.config, self.batch, 1, self.seq_len + (self.decode - 1) / 2, wb)
        return Work(self.config, self.batch, self.seq_len, 0, wb)

    @property
    def in_cache(self) -> bool:
        """Whether the model's weights fit in L3: then the ops that read weights have the cache's
        bandwidth roof, else DRAM's (every forward streams them all)."""
        return 0 < self.weight_bytes_total <= self.limits.l3_bytes

    @property
    def peak_gflops(self) -> float:
        # A shared machine may measure "all threads" below one thread: the roof is never below one thread's.
        return max(self.limits.peak_gflops(self.threads), self.limits.fma_gflops_1)

    def bandwidth_gbs(self, in_cache: bool | None = None) -> float:
        """The read bandwidth roof, from cache or DRAM (default: where the weights live, ``in_cache``)."""
        cache = self.in_cache if in_cache is None else in_cache
        return max(self.limits.bandwidth_gbs(self.threads, cache), self.limits.bandwidth_gbs(1, cache))

    def op_in_cache(self, kind: str, cost: Cost) -> bool:
        """Where an op's bytes come from: an op that reads weights, from where the weights live; one
        that reads only activations, from cache when they fit in L3 (an upper bound: the roof is L2's)."""
        reads_weights = kind in WEIGHTED
        return self.in_cache if reads_weights else cost.bytes <= max(self.limits.l3_bytes, 1)

    def limit_gflops(self, cost: Cost, in_cache: bool | None = None) -> tuple[float, str]:
        """The roofline's attainable GFLOP/s for an op of this cost, and what bounds it."""
        memory = cost.intensity * self.bandwidth_gbs(in_cache)
        return (memory, "memory") if memory < self.peak_gflops else (self.peak_gflops, "compute")

    def rows(self, phase: str = "prefill", per_layer: bool = False) -> list[dict[str, object]]:
        """One row per op kind (or per trace point with ``per_layer``), in forward order."""
        if phase not in self.cpp:
            raise UsageError(f"no {phase} in this profile (phases: {', '.join(self.cpp)}); decode needs decode > 0")
        cpp, ref = self.cpp[phase], self.torch[phase]
        work = self.work(phase)
        cpp_times = cpp.by_name() if per_layer else cpp.by_kind()
        ref_times = ref.by_name() if per_layer else ref.by_kind()
        total = sum(cpp_times.values())
        counts: dict[str, int] = {}
        for name, kind in cpp.kinds.items():
            counts[kind] = counts.get(kind, 0) + 1
        out = []
        for key, seconds in cpp_times.items():
            kind = cpp.kinds[key] if per_layer else key
            label = _short(key, kind, cpp.layers[key]) if per_layer else key
            calls = 1 if per_layer else counts.get(kind, 1)
            cost_fn = COSTS.get(kind)
            cost = cost_fn(work) if cost_fn else None
            flops = cost.flops * calls if cost else None
            nbytes = cost.bytes * calls if cost else None
            row: dict[str, object] = {"op": label, "calls": calls, "cpp_ms": seconds * 1e3, "share": seconds / total}
            gflops = flops / seconds * 1e-9 if flops and seconds > 0 else None
            row["gflops"], row["gbs"] = gflops, (nbytes / seconds * 1e-9 if nbytes and seconds > 0 else None)
            row["intensity"] = cost.intensity if cost else None
            cached = self.op_in_cache(kind, cost) if cost else False
            row["roof"] = ("cache" if cached else "DRAM") if cost else None
            if cost and cost.flops > 0 and gflops is not None:
                limit, bound = self.limit_gflops(cost, cached)
                row["bound"], row["of_limit"] = bound, gflops / limit
            else:
                row["bound"], row["of_limit"] = ("memory" if cost else None), None
                if cost and cost.bytes and seconds > 0:  # no arithmetic: the fraction of the bandwidth
                    row["of_limit"] = nbytes / seconds * 1e-9 / self.bandwidth_gbs(cached)  # type: ignore[operator]
            t = ref_times.get(key)
            row["torch_ms"] = t * 1e3 if t is not None else None
            row["torch_gflops"] = flops / t * 1e-9 if flops and t else None
            out.append(row)
        return out

    def table(self, phase: str = "prefill", per_layer: bool = False) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame(self.rows(phase, per_layer)).set_index("op")

    def lines(self, phase: str = "prefill", per_layer: bool = False) -> list[str]:
        cpp, ref = self.cpp[phase], self.torch[phase]
        what = (
            f"prefill of {self.seq_len} tokens x batch {self.batch}"
            if phase == "prefill"
            else f"decode: {self.decode} steps after the {self.seq_len}-token prompt, per step"
        )
        kv = "" if self.kv_cache == "f32" else f"; {self.kv_cache} KV cache on both sides"
        out = [
            f"{what}; C++ {self.kernels} kernels on {self.threads} threads, PyTorch on {self.torch_threads}{kv}",
            f"roofs: {self.peak_gflops:.1f} GFLOP/s FMA peak, {self.bandwidth_gbs(False):.1f} GB/s from DRAM, "
            f"{self.bandwidth_gbs(True):.1f} GB/s from cache; weights {self.weight_bytes_total / 1e6:.1f} MB "
            f"({'in' if self.in_cache else 'beyond'} L3 {self.limits.l3_bytes / 2**20:.0f} MB)",
            f"{'op':<28} {'calls':>5} {'C++ ms':>9} {'share':>6} {'GFLOP/s':>8} {'GB/s':>7} {'FLOP/B':>7} "
            f"{'bound':>7} {'roof':>5} {'of limit':>8} {'torch ms':>9} {'C++ vs torch':>12}",
        ]

        def num(v: object, fmt: str) -> str:
            return format(v, fmt) if isinstance(v, (int, float)) else "—"

        for r in self.rows(phase, per_layer):
            ratio = (
                f"{r['torch_ms'] / r['cpp_ms']:.2f}x"  # type: ignore[operator]
                if isinstance(r["torch_ms"], float) and r["cpp_ms"]
                else "—"
            )
            of_limit = f"{100 * r['of_limit']:.0f}%" if isinstance(r["of_limit"], float) else "—"
            out.append(
                f"{str(r['op']):<28} {r['calls']:>5} {num(r['cpp_ms'], '9.3f')} {100 * r['share']:>5.1f}% "  # type: ignore[operator]
                f"{num(r['gflops'], '8.1f')} {num(r['gbs'], '7.1f')} {num(r['intensity'], '7.1f')} "
                f"{str(r['bound'] or '—'):>7} {str(r['roof'] or '—'):>5} {of_limit:>8} {num(r['torch_ms'], '9.3f')} "
                f"{ratio:>12}"
            )
        out.append(
            f"sum of C++ per-op times {1e3 * cpp.profiled_best:.3f} ms vs the unprofiled forward "
            f"{1e3 * cpp.unprofiled_best:.3f} ms ({100 * cpp.overhead:+.1f}%; best of {len(cpp.runs)} each); "
            f"PyTorch {1e3 * ref.profiled_best:.3f} vs {1e3 * ref.unprofiled_best:.3f} ms ({100 * ref.overhead:+.1f}%)"
        )
        return out

    def __str__(self) -> str:
        parts = ["\n".join(self.lines(phase)) for phase in self.cpp]
        return "\n\n".join(parts)

    def roofline_points(self, phase: str = "prefill") -> list[tuple[str, float, float | None, float | None]]:
        """(op kind, arithmetic intensity, C++ GFLOP/s, PyTorch GFLOP/s) for every op kind that computes."""
        out: list[tuple[str, float, float | None, float | None]] = []
        for r in self.rows(phase):
            ai, cpp, ref = r["intensity"], r["gflops"], r["torch_gflops"]
            if isinstance(ai, float) and ai > 0 and isinstance(cpp, float) and cpp > 0:
                out.append((str(r["op"]), ai, cpp, ref if isinstance(ref, float) else None))
        return out

    def plot(self, phase: str = "prefill") -> "Figure":
        """The roofline: each op kind a point per side, the machine's roofs (plots.plot_roofline)."""
        from .plots import plot_roofline

        dram, cache = self.bandwidth_gbs(False), self.bandwidth_gbs(True)
        roofs = {"L2 cache": cache, "DRAM": dram} if self.in_cache else {"DRAM": dram, "L2 cache": cache}
        return plot_roofline(
            self.roofline_points(phase),
            self.peak_gflops,
            roofs,
            title=f"{phase}: C++ {self.kernels} ({self.threads} threads) and PyTorch, {self.config.num_parameters() / 1e6:.1f}M parameters",
        )


def _short(name: str, kind: str, layer: int | None) -> str:
    """A per-layer row's label: "L3.qkv_proj" (a shared expert keeps its index), or the model-level name."""
    if layer is None:
        return name
    index = name.rsplit(".", 1)[-1] if kind == "shared_expert" else ""
    return f"L{layer}.{kind}" + (f".{index}" if index else "")


def _read_timer(timer: "Cpp") -> list[tuple[Point, int | None, int | None, float]]:
    """The C++ OpTimer's stamps as (Point, layer, index, seconds)."""
    members = list(Point)
    n = int(timer.size())
    points, layers, indices, ns = list(timer.points), list(timer.layers), list(timer.indices), list(timer.ns)
    return [
        (
            members[int(points[i])],
            int(layers[i]) if layers[i] >= 0 else None,
            int(indices[i]) if indices[i] >= 0 else None,
            float(ns[i]) * 1e-9,
        )
        for i in range(n)
    ]


def _greedy(logits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(logits[:, -1].argmax(-1)[:, None], dtype=np.int64)


def profile_cpp(
    native: "NativeModel", decode: int = 0, repeat: int = 5, warmup: int = 1, timer: "Cpp" = None
) -> dict[str, PhaseTimes]:
    """Per-op times of the C++ forward (and of ``decode`` greedy steps after it), profiled runs
    interleaved with unprofiled ones. ``timer``: the sink (default: a new OpTimer)."""
    ids, mask = native.check_inputs(None, None)
    B, S = ids.shape
    vocab = native.config.vocab_size
    if timer is None:
        timer = native.ns.OpTimer()
    timer.reserve(64 * (native.config.num_hidden_layers + 1) * max(decode, 1))
    logits = np.empty((B, S, vocab), np.float32)
    prefill = PhaseTimes()
    for _ in range(warmup):
        native.run(ids, mask, logits)
    for _ in range(repeat):
        t0 = time.perf_counter()
        native.run(ids, mask, logits)
        prefill.unprofiled.append(time.perf_counter() - t0)
        native.run(ids, mask, logits, timer)
        prefill.add_run(_read_timer(timer))
    phases = {"prefill": prefill}
    if decode > 0:
        native.config.validate(seq_len=S + decode)
        steps = PhaseTimes()
        step_logits = np.empty((B, 1, vocab), np.float32)
        for r in range(repeat + warmup):
            for profiled in (False, True):
                ws = native.workspace(B, S, S + decode)
                native.run(ids, mask, logits, start=0, workspace=ws)
                token, m = _greedy(logits), mask
                timer.clear()
                timer.accumulate = True  # the steps' stamps stay in C++: read once, after the last step
                wall = 0.0
                for step in range(decode):
                    m = np.ascontiguousarray(np.concatenate([m, np.ones((B, 1), np.int64)], axis=1))
                    t0 = time.perf_counter()
                    native.run(token, m, step_logits, timer if profiled else None, start=S + step, workspace=ws)
                    wall += time.perf_counter() - t0
                    token = _greedy(step_logits)
                timer.accumulate = False
                if r < warmup:
                    continue
                if profiled:
                    steps.add_run(_read_timer(timer), steps=decode)
                else:
                    steps.unprofiled.append(wall / decode)
        phases["decode"] = steps
    return phases


def profile_torch(
    ref: "ReferenceModel", model: Model, decode: int = 0, repeat: int = 5, warmup: int = 1
) -> dict[str, PhaseTimes]:
    """Per-op times of the PyTorch reference (its trace points through reference.OpTimer)."""
    from .reference import KVCache, OpTimer

    ids, mask = np.asarray(model.input_ids, np.int64), np.asarray(model.attention_mask, np.int64)
    B = ids.shape[0]
    timer = OpTimer()
    prefill = PhaseTimes()
    for _ in range(warmup):
        ref.forward(ids, mask)
    for _ in range(repeat):
        t0 = time.perf_counter()
        ref.forward(ids, mask)
        prefill.unprofiled.append(time.perf_counter() - t0)
        ref.timed_forward(ids, mask, timer=timer)
        prefill.add_run(timer.times)
    phases = {"prefill": prefill}
    if decode > 0:
        steps = PhaseTimes()
        for r in range(repeat + warmup):
            for profiled in (False, True):
                cache = KVCache.empty()
                logits, _ = ref.forward(ids, mask, cache=cache)
                token, m = _greedy(logits.numpy()), mask
                stamps: list[tuple[Point, int | None, int | None, float]] = []
                wall = 0.0
                for _ in range(decode):
                    m = np.concatenate([m, np.ones((B, 1), np.int64)], axis=1)
                    t0 = time.perf_counter()
                    if profiled:
                        logits, _ = ref.timed_forward(token, m, cache=cache, timer=timer)
                        stamps += timer.times
                    else:
                        logits, _ = ref.forward(token, m, cache=cache)
                    wall += time.perf_counter() - t0
                    token = _greedy(logits.numpy())
                if r < warmup:
                    continue
                if profiled:
                    steps.add_run(stamps, steps=decode)
                else:
                    steps.unprofiled.append(wall / decode)
        phases["decode"] = steps
    return phases


@restores_torch_threads
def profile_model(
    model: Model,
    kernels: str = "fast",
    decode: int = 0,
    threads: int | None = None,
    repeat: int = 5,
    warmup: int = 1,
    engine: "NativeEngine | None" = None,
    limits: MachineLimits | None = None,
    kv_cache: str = "f32",
) -> Profile:
    """Profile ``model`` on its own inputs: the C++ ``kernels`` set and the PyTorch reference, prefill
    and (``decode`` > 0) that many greedy decode steps; ``threads`` sets both sides (default: theirs).
    ``limits``: the machine's (default: ``machine.machine_limits()``, measured once and cached).
    ``kv_cache``: both sides' KV cache, "f32" or "bf16" (its rounding points are ops of their own)."""
    import torch

    from .kvcache import check_kv_cache
    from .machine import machine_limits
    from .native import load_native
    from .reference import ReferenceModel
    from .writer import weight_bytes

    kv_cache = check_kv_cache(kv_cache)

    if repeat < 1 or warmup < 0 or decode < 0:
        raise UsageError(f"repeat {repeat} (>= 1), warmup {warmup} (>= 0), decode {decode} (>= 0)")
    if threads is not None and threads < 1:
        raise UsageError(f"threads {threads}: must be 1 or more")
    engine = engine or load_native()
    if threads:
        engine.set_threads(threads)
        torch.set_num_threads(threads)
    limits = limits or machine_limits()
    native = engine.prepare(model, kernels, kv_cache)
    cpp = profile_cpp(native, decode, repeat, warmup)
    ref = ReferenceModel(model, kv_cache=kv_cache)
    ref_times = profile_torch(ref, model, decode, repeat, warmup)
    return Profile(
        config=model.config,
        kernels=native.kernels,
        weight_format=native.weight_format,
        threads=engine.threads,
        torch_threads=torch.get_num_threads(),
        batch=model.batch_size,
        seq_len=model.seq_len,
        decode=decode,
        limits=limits,
        cpp=cpp,
        torch=ref_times,
        weight_bytes_total=float(weight_bytes(model.config, native.weight_format)),
        kv_cache=kv_cache,
    )
