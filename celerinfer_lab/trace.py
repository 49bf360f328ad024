"""The trace contract: the name and shape of every op output, in forward order.

Both forwards (PyTorch reference and C++) record exactly these points, so the debugger can
line them up by name. Add a new op here once and both sides follow.

Shapes use B (batch), S (new tokens), P (keys: cached + new), H (hidden_size), nh / kvh (query / kv heads),
hd (head_dim), I (intermediate_size), E (num_experts), k (num_experts_per_tok), V (vocab).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass(frozen=True)
class TracePoint:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float" (the forward's float type) or "int64"
    doc: str
    token_axis: int = 1  # the axis of token positions (2 for attention [B, nh, query, key]); axis 0 is batch


def trace_points(config: ModelConfig, batch: int, seq_len: int, past_len: int = 0) -> list[TracePoint]:
    """Every trace point of a forward over [batch, seq_len] new tokens, in forward order.

    ``past_len``: tokens already in the KV cache (decode steps); attention spans P = past_len + S keys.
    """
    B, S, H = batch, seq_len, config.hidden_size
    P = past_len + seq_len
    nh, kvh, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    points = [TracePoint("model.embed_tokens", (B, S, H), "float", "token embeddings")]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        add = lambda suffix, shape, doc, dtype="float", token_axis=1: points.append(  # noqa: E731
            TracePoint(f"{p}.{suffix}" if suffix else p, shape, dtype, doc, token_axis)
        )
        add("input_layernorm", (B, S, H), "RMSNorm of the block input")
        add("self_attn.q_proj", (B, S, nh * hd), "x @ Wq^T")
        add("self_attn.k_proj", (B, S, kvh * hd), "x @ Wk^T")
        add("self_attn.v_proj", (B, S, kvh * hd), "x @ Wv^T")
        if config.qk_norm:
            add("self_attn.q_norm", (B, S, nh, hd), "RMSNorm over each query head")
            add("self_attn.k_norm", (B, S, kvh, hd), "RMSNorm over each key head")
        add("self_attn.rope_q", (B, S, nh, hd), "queries after RoPE")
        add("self_attn.rope_k", (B, S, kvh, hd), "keys after RoPE")
        add(
            "self_attn.scores",
            (B, nh, S, P),
            "q.k/sqrt(hd) + causal mask (-inf above the diagonal) + (1-mask)*-1e9, before softmax",
            token_axis=2,
        )
        add("self_attn.probs", (B, nh, S, P), "softmax of the scores over keys", token_axis=2)
        add("self_attn.context", (B, S, nh * hd), "probs @ v, heads concatenated, before o_proj")
        add("self_attn.o_proj", (B, S, H), "context @ Wo^T")
        add("attn_residual", (B, S, H), "block input + o_proj (the residual stream mid-block)")
        add("post_attention_layernorm", (B, S, H), "RMSNorm of attn_residual")
        if config.use_moe:
            E, k = config.num_experts, config.num_experts_per_tok
            add("mlp.router_probs", (B, S, E), "softmax of the router logits over experts")
            add("mlp.topk_idx", (B, S, k), "chosen experts, by descending probability", "int64")
            add("mlp.topk_weight", (B, S, k), "their weights, renormalised under topk_renorm")
            add("mlp.routed_experts", (B, S, H), "sum over chosen experts of weight * expert(x)")
            for e in range(config.n_shared_experts):
                add(f"mlp.shared_experts.{e}", (B, S, H), "a shared expert's output, added with weight 1")
        else:
            I = config.intermediate_size  # noqa: E741
            add("mlp.gate_proj", (B, S, I), "x @ Wgate^T")
            add("mlp.up_proj", (B, S, I), "x @ Wup^T")
            add("mlp.act", (B, S, I), "silu(gate) * up")
            add("mlp.down_proj", (B, S, H), "act @ Wdown^T")
        add("", (B, S, H), "block output: attn_residual + mlp")
    points.append(TracePoint("model.norm", (B, S, H), "float", "final RMSNorm"))
    points.append(TracePoint("lm_head", (B, S, config.vocab_size), "float", "logits"))
    return points


@dataclass
class ForwardResult:
    """What a forward returns, on either side (reference.py, native.py)."""

    logits: np.ndarray  # [B, S, V]
    trace: dict[str, np.ndarray] | None  # trace point name -> output, in forward order


def trace_names(config: ModelConfig, batch: int = 1, seq_len: int = 1) -> list[str]:
    return [p.name for p in trace_points(config, batch, seq_len)]
