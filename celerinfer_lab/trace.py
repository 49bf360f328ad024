"""The trace contract: the name and shape of every op output, in forward order.

Both forwards (PyTorch reference and C++) record exactly these points, so the debugger can line
them up by name. ``POINTS`` below is the one list: reference.py records through ``Point`` (its
members), and the C++ forward through the generated ``cpp/include/celerinfer/trace_points.hpp``
(``trace_points_header``; regenerate with ``python -m celerinfer_lab.cpp_tables``). To add a point:
one row here and its id as a ``Point`` member at the same place (``x = enum.auto()``; the module refuses
to import when the two differ), the op, and one ``tr(Point.x, ...)`` / ``trace_point(trace, l, Point::x,
...)`` call beside it on each side.

Shapes are written once, as symbols (``SYMBOLS``): B (batch), S (new tokens), P (keys: cached +
new), L (positions whose logits the forward keeps: S, or the last ``logits_to_keep``), H (hidden_size), nh / kvh (query / kv heads), hd (head_dim), I (intermediate_size),
E (num_experts), k (num_experts_per_tok), V (vocab); "nh*hd" is a product.
"""

from __future__ import annotations

import enum
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import UsageError

# symbol -> (where Python reads it: a ModelConfig field, or None for B/S/P/L; the C++ expression over a
# TraceDims `d`, as trace_points.hpp evaluates it)
SYMBOLS: dict[str, tuple[str | None, str]] = {
    "B": (None, "d.B"),
    "S": (None, "d.S"),
    "P": (None, "d.P"),
    "L": (None, "d.L"),
    "H": ("hidden_size", "d.config.hidden"),
    "nh": ("num_attention_heads", "d.config.heads"),
    "kvh": ("num_key_value_heads", "d.config.kv_heads"),
    "hd": ("head_dim", "d.config.head_dim"),
    "I": ("intermediate_size", "d.config.intermediate"),
    "E": ("num_experts", "d.config.experts"),
    "k": ("num_experts_per_tok", "d.config.topk"),
    "V": ("vocab_size", "d.config.vocab"),
}


@dataclass(frozen=True)
class PointSpec:
    """One row of the contract. ``suffix``: the name under its layer ("model.layers.{i}.suffix",
    "" for the block output) or, for model-level points (``in_layer=False``), the whole name."""

    id: str  # the identifier on both sides: Point.<id> (Python), Point::<id> (C++)
    suffix: str
    shape: tuple[str, ...]  # symbols, one per axis
    doc: str
    in_layer: bool = True
    # Which models have the point: "always", or "qk_norm" / "dense" / "moe" / "shared_expert" (has_feature),
    # or "kv_bf16" (a forward whose KV cache is bf16: an engine choice, not a model field);
    # a "shared_expert" point repeats once per shared expert, its name ending in the expert's index.
    feature: str = "always"
    dtype: str = "float"  # "float" (the forward's float type) or "int64"
    token_axis: int = 1  # the axis of token positions (2 for attention [B, nh, query, key]); axis 0 is batch


# Forward order. A layer's points are listed between the model-level ones they sit between.
POINTS: tuple[PointSpec, ...] = (
    PointSpec("embed_tokens", "model.embed_tokens", ("B", "S", "H"), "token embeddings", in_layer=False),
    PointSpec("input_layernorm", "input_layernorm", ("B", "S", "H"), "RMSNorm of the block input"),
    PointSpec("q_proj", "self_attn.q_proj", ("B", "S", "nh*hd"), "x @ Wq^T"),
    PointSpec("k_proj", "self_attn.k_proj", ("B", "S", "kvh*hd"), "x @ Wk^T"),
    PointSpec("v_proj", "self_attn.v_proj", ("B", "S", "kvh*hd"), "x @ Wv^T"),
    PointSpec("q_norm", "self_attn.q_norm", ("B", "S", "nh", "hd"), "RMSNorm over each query head", feature="qk_norm"),
    PointSpec("k_norm", "self_attn.k_norm", ("B", "S", "kvh", "hd"), "RMSNorm over each key head", feature="qk_norm"),
    PointSpec("rope_q", "self_attn.rope_q", ("B", "S", "nh", "hd"), "queries after RoPE"),
    PointSpec("rope_k", "self_attn.rope_k", ("B", "S", "kvh", "hd"), "keys after RoPE"),
    PointSpec(
        "k_cached",
        "self_attn.k_cached",
        ("B", "S", "kvh", "hd"),
        "the new keys as the bf16 KV cache holds them (rope_k rounded to bfloat16)",
        feature="kv_bf16",
    ),
    PointSpec(
        "v_cached",
        "self_attn.v_cached",
        ("B", "S", "kvh", "hd"),
        "the new values as the bf16 KV cache holds them (v_proj rounded to bfloat16)",
        feature="kv_bf16",
    ),
    PointSpec(
        "scores",
        "self_attn.scores",
        ("B", "nh", "S", "P"),
        "q.k/sqrt(hd) + causal mask (-inf above the diagonal) + (1-mask)*-1e9, before softmax",
        token_axis=2,
    ),
    PointSpec("probs", "self_attn.probs", ("B", "nh", "S", "P"), "softmax of the scores over keys", token_axis=2),
    PointSpec("context", "self_attn.context", ("B", "S", "nh*hd"), "probs @ v, heads concatenated, before o_proj"),
    PointSpec("o_proj", "self_attn.o_proj", ("B", "S", "H"), "context @ Wo^T"),
    PointSpec(
        "attn_residual", "attn_residual", ("B", "S", "H"), "block input + o_proj (the residual stream mid-block)"
    ),
    PointSpec("post_attention_layernorm", "post_attention_layernorm", ("B", "S", "H"), "RMSNorm of attn_residual"),
    PointSpec(
        "router_probs", "mlp.router_probs", ("B", "S", "E"), "softmax of the router logits over experts", feature="moe"
    ),
    PointSpec(
        "topk_idx",
        "mlp.topk_idx",
        ("B", "S", "k"),
        "chosen experts, by descending probability",
        feature="moe",
        dtype="int64",
    ),
    PointSpec(
        "topk_weight",
        "mlp.topk_weight",
        ("B", "S", "k"),
        "their weights, renormalised under topk_renorm",
        feature="moe",
    ),
    PointSpec(
        "routed_experts",
        "mlp.routed_experts",
        ("B", "S", "H"),
        "sum over chosen experts of weight * expert(x)",
        feature="moe",
    ),
    PointSpec(
        "shared_expert",
        "mlp.shared_experts",
        ("B", "S", "H"),
        "a shared expert's output, added with weight 1",
        feature="shared_expert",
    ),
    PointSpec("gate_proj", "mlp.gate_proj", ("B", "S", "I"), "x @ Wgate^T", feature="dense"),
    PointSpec("up_proj", "mlp.up_proj", ("B", "S", "I"), "x @ Wup^T", feature="dense"),
    PointSpec("act", "mlp.act", ("B", "S", "I"), "silu(gate) * up", feature="dense"),
    PointSpec("down_proj", "mlp.down_proj", ("B", "S", "H"), "act @ Wdown^T", feature="dense"),
    PointSpec("block", "", ("B", "S", "H"), "block output: attn_residual + mlp"),
    PointSpec("norm", "model.norm", ("B", "S", "H"), "final RMSNorm", in_layer=False),
    PointSpec(
        "lm_head", "lm_head", ("B", "L", "V"), "logits (of the last L positions: all S unless kept)", in_layer=False
    ),
)

_ROWS_BY_ID = {spec.id: spec for spec in POINTS}


class Point(enum.Enum):
    """The points as identifiers, in table order: Point.rope_q.value is its PointSpec. The members are
    spelled out (not built from POINTS) so that a type checker knows them; each takes its row by id,
    and the check below refuses a module where the members and the rows differ."""

    _value_: PointSpec

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[Any]) -> PointSpec:
        return _ROWS_BY_ID[name]

    embed_tokens = enum.auto()
    input_layernorm = enum.auto()
    q_proj = enum.auto()
    k_proj = enum.auto()
    v_proj = enum.auto()
    q_norm = enum.auto()
    k_norm = enum.auto()
    rope_q = enum.auto()
    rope_k = enum.auto()
    k_cached = enum.auto()
    v_cached = enum.auto()
    scores = enum.auto()
    probs = enum.auto()
    context = enum.auto()
    o_proj = enum.auto()
    attn_residual = enum.auto()
    post_attention_layernorm = enum.auto()
    router_probs = enum.auto()
    topk_idx = enum.auto()
    topk_weight = enum.auto()
    routed_experts = enum.auto()
    shared_expert = enum.auto()
    gate_proj = enum.auto()
    up_proj = enum.auto()
    act = enum.auto()
    down_proj = enum.auto()
    block = enum.auto()
    norm = enum.auto()
    lm_head = enum.auto()


def members_out_of_step(rows: tuple[PointSpec, ...], members: list[Point]) -> list[str]:
    """How the Point members depart from the table rows: both must list the same ids in the same order."""
    row_ids, member_ids = [row.id for row in rows], [member.name for member in members]
    return [] if row_ids == member_ids else [f"POINTS lists {row_ids}", f"Point has {member_ids}"]


if members_out_of_step(POINTS, list(Point)):
    raise ImportError("trace.Point and trace.POINTS differ: " + "; ".join(members_out_of_step(POINTS, list(Point))))


def point_name(point: Point, layer: int | None = None, index: int | None = None) -> str:
    """The trace name of ``point`` in ``layer`` (for a shared expert: expert ``index``)."""
    spec: PointSpec = point.value
    if not spec.in_layer:
        return spec.suffix
    if layer is None:
        raise ValueError(f"trace point {spec.id} lives in a layer: give its layer")
    name = f"model.layers.{layer}" + (f".{spec.suffix}" if spec.suffix else "")
    if spec.feature == "shared_expert":
        if index is None:
            raise ValueError("a shared expert's trace point needs its index")
        name += f".{index}"
    return name


def shape_of(spec: PointSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of ``spec`` for the symbol values in ``sizes``."""
    return tuple(int(np.prod([sizes[factor] for factor in axis.split("*")])) for axis in spec.shape)


def kept_positions(seq_len: int, logits_to_keep: int = 0) -> int:
    """How many positions' logits a forward of seq_len tokens returns: logits_to_keep as MiniMind's
    forward takes it (0, or more than seq_len: all; L: the last L). forward.hpp's kept_positions."""
    return seq_len if logits_to_keep <= 0 or logits_to_keep > seq_len else logits_to_keep


def check_logits_to_keep(logits_to_keep: object) -> int:
    """logits_to_keep as given by a caller: a whole number >= 0, else a UsageError naming it."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
        raise UsageError(
            f"logits_to_keep={logits_to_keep!r}: the positions whose logits a forward returns, "
            "a whole number >= 0 (0: every position; L: the last L)"
        )
    return int(logits_to_keep)


def symbol_sizes(
    config: ModelConfig, batch: int, seq_len: int, past_len: int = 0, logits_to_keep: int = 0
) -> dict[str, int]:
    sizes = {sym: getattr(config, field) for sym, (field, _) in SYMBOLS.items() if field is not None}
    return {
        **sizes,
        "B": batch,
        "S": seq_len,
        "P": past_len + seq_len,
        "L": kept_positions(seq_len, logits_to_keep),
    }


def has_feature(config: ModelConfig, feature: str, kv_cache: str = "f32") -> bool:
    return {
        "kv_bf16": kv_cache == "bf16",
        "always": True,
        "qk_norm": bool(config.qk_norm),
        "dense": not config.use_moe,
        "moe": bool(config.use_moe),
        "shared_expert": bool(config.use_moe) and config.n_shared_experts > 0,
    }[feature]


@dataclass(frozen=True)
class TracePoint:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float" (the forward's float type) or "int64"
    doc: str
    token_axis: int = 1  # the axis of token positions (2 for attention [B, nh, query, key]); axis 0 is batch


def trace_points(
    config: ModelConfig, batch: int, seq_len: int, past_len: int = 0, kv_cache: str = "f32", logits_to_keep: int = 0
) -> list[TracePoint]:
    """Every trace point of a forward over [batch, seq_len] new tokens, in forward order.

    ``past_len``: tokens already in the KV cache (decode steps); attention spans P = past_len + S keys.
    ``kv_cache``: "bf16" adds the cache points (k_cached, v_cached) after rope_k.
    ``logits_to_keep``: lm_head holds the last L positions (kept_positions).
    """
    sizes = symbol_sizes(config, batch, seq_len, past_len, logits_to_keep)

    def instances(point: Point, layer: int | None) -> list[TracePoint]:
        spec: PointSpec = point.value
        if not has_feature(config, spec.feature, kv_cache):
            return []
        indices = range(config.n_shared_experts) if spec.feature == "shared_expert" else [None]
        shape = shape_of(spec, sizes)
        return [TracePoint(point_name(point, layer, i), shape, spec.dtype, spec.doc, spec.token_axis) for i in indices]

    # Model-level points before the first layer point come before the layers, the others after them.
    order = list(Point)
    first = next(i for i, p in enumerate(order) if p.value.in_layer)
    points = [tp for p in order[:first] for tp in instances(p, None)]
    for layer in range(config.num_hidden_layers):
        points += [tp for p in order if p.value.in_layer for tp in instances(p, layer)]
    return points + [tp for p in order[first:] if not p.value.in_layer for tp in instances(p, None)]


def _cpp_axis(axis: str) -> str:
    return " * ".join(SYMBOLS[factor][1] for factor in axis.split("*"))


def trace_points_header() -> str:
    """cpp/include/celerinfer/trace_points.hpp: ``POINTS`` for the C++ forward (ids, names, shapes)."""
    ids = "\n".join(f"    {s.id},  // {s.suffix or '(block output)'} [{', '.join(s.shape)}]" for s in POINTS)
    rows = "\n".join(
        f'    {{"{s.suffix}", {str(s.in_layer).lower()}, {str(s.feature == "shared_expert").lower()}, '
        f'"{", ".join(s.shape)}"}},  // {s.id}'
        for s in POINTS
    )
    shapes = "\n".join(
        f"        case Point::{s.id}: return {{{', '.join(_cpp_axis(axis) for axis in s.shape)}}};" for s in POINTS
    )
    symbol_list = ", ".join(f"{sym} = {cpp}" for sym, (_, cpp) in SYMBOLS.items()) + "."
    symbols = textwrap.fill(symbol_list, 100, break_on_hyphens=False, initial_indent="//   ", subsequent_indent="//   ")
    return f"""// Generated by celerinfer_lab/cpp_tables.py from POINTS in celerinfer_lab/trace.py: do not edit.
// Regenerate with `python -m celerinfer_lab.cpp_tables`; tests/test_trace_schema.py checks it is current.
// The trace points in forward order: an id per point, its name and its shape, in the symbols
{symbols}
#pragma once
#include <cstdint>
#include <vector>

#include "model.hpp"

namespace CELERINFER_NS {{

enum class Point : int {{
{ids}
}};

// The sizes a shape is written in: B (batch), S (new tokens), P (keys: cached + new), the config's,
// and L (positions whose logits are kept: S, or the last logits_to_keep).
struct TraceDims {{
    int64_t B, S, P;
    const Config& config;
    int64_t L;
}};

struct PointInfo {{
    const char* suffix;  // under "model.layers.{{i}}" when in_layer ("" is the block output), else the whole name
    bool in_layer;
    bool indexed;        // one point per shared expert: the name ends in ".{{index}}"
    const char* shape;   // the symbols
}};

inline constexpr PointInfo kPointInfo[] = {{
{rows}
}};

inline const PointInfo& point_info(Point p) {{ return kPointInfo[int(p)]; }}

inline std::vector<int64_t> point_shape(Point p, const TraceDims& d) {{
    switch (p) {{
{shapes}
    }}
    return {{}};
}}

}}  // namespace CELERINFER_NS
"""


@dataclass
class ForwardResult:
    """What a forward returns, on either side (reference.py, native.py)."""

    logits: np.ndarray  # [B, L, V]: L = S, or the logits_to_keep asked for
    trace: dict[str, np.ndarray] | None  # trace point name -> output, in forward order

    @property
    def points(self) -> dict[str, np.ndarray]:
        """The trace, of a forward that recorded one (trace=True or a teacher)."""
        return recorded(self.trace)


def recorded(trace: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A trace that a forward was asked to record; None (a forward without trace=True) is an error here."""
    if trace is None:
        raise ValueError("this forward recorded no trace: run it with trace=True (or a teacher)")
    return trace


def trace_names(config: ModelConfig, batch: int = 1, seq_len: int = 1, kv_cache: str = "f32") -> list[str]:
    return [p.name for p in trace_points(config, batch, seq_len, kv_cache=kv_cache)]
