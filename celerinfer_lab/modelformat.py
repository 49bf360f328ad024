"""The model file's format, shared by the reader and the writer: its name and version, the dtypes a
tensor may have, the weights a config implies, the JSON text of small objects. Below writer.py,
reader.py and modelfile.py (which re-exports every name here)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from .config import ModelConfig

FORMAT_NAME = "celerinfer-lab"
FORMAT_VERSION = 1
PREVIEW_LEN = 16
DTYPES = {  # file dtype name -> little-endian numpy dtype
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
}


# ---- the weights a config implies -------------------------------------------------------------
def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """MiniMind state-dict names and shapes, in the order the file stores them (tied lm_head omitted)."""
    return dict(iter_weight_shapes(config))


def iter_weight_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """weight_shapes one at a time: a reader looks each up in a file without building them all."""
    H, V = config.hidden_size, config.vocab_size
    yield "model.embed_tokens.weight", (V, H)

    def ffn(prefix: str, inter: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        yield f"{prefix}.gate_proj.weight", (inter, H)
        yield f"{prefix}.up_proj.weight", (inter, H)
        yield f"{prefix}.down_proj.weight", (H, inter)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (H,)
        yield f"{p}.self_attn.q_proj.weight", (config.q_dim, H)
        yield f"{p}.self_attn.k_proj.weight", (config.kv_dim, H)
        yield f"{p}.self_attn.v_proj.weight", (config.kv_dim, H)
        yield f"{p}.self_attn.o_proj.weight", (H, config.q_dim)
        if config.qk_norm:
            yield f"{p}.self_attn.q_norm.weight", (config.head_dim,)
            yield f"{p}.self_attn.k_norm.weight", (config.head_dim,)
        yield f"{p}.post_attention_layernorm.weight", (H,)
        if config.use_moe:
            yield f"{p}.mlp.gate.weight", (config.num_experts, H)
            for e in range(config.num_experts):
                yield from ffn(f"{p}.mlp.experts.{e}", config.moe_intermediate_size)
            for s in range(config.n_shared_experts):
                yield from ffn(f"{p}.mlp.shared_experts.{s}", config.moe_intermediate_size)
        else:
            yield from ffn(f"{p}.mlp", config.intermediate_size)
    yield "model.norm.weight", (H,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (V, H)


# ---- tensors -------------------------------------------------------------------------------------
def _preview(arr: np.ndarray) -> list:
    """The first values, for people. NaN/Inf are written as null: a model file is strict JSON."""
    flat = arr.reshape(-1)[:PREVIEW_LEN]
    if arr.dtype.kind != "f":
        return [int(v) for v in flat]
    return [float(v) if np.isfinite(v) else None for v in flat]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
