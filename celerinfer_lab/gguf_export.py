"""A model as a GGUF file that llama.cpp runs: dense, half-split RoPE models (MiniMind2's shape) as
llama.cpp's ``llama`` architecture, in F32, F16 or Q8_0 — so llama.cpp can be timed on the very
weights this workbench times.

Written with the ``gguf`` package (llama.cpp's own writer). What llama.cpp's converter
(convert_hf_to_gguf.py) does for a Llama checkpoint is done here too: tensor names, the Q/K row
permutation (llama.cpp's ``llama`` RoPE rotates interleaved pairs; HF/MiniMind rotate halves), norms
in F32. Q8_0 tensors are ``quantize.encode(w, "q8")``: byte for byte what gguf's quantizer writes
(tests/test_quantize.py). The tokenizer is a placeholder vocabulary of the model's size (llama.cpp
needs one to load a model; benchmarks feed it random ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UsageError
from .modelfile import Model
from .quantize import encode, q8_blocks

GGUF_TYPES = ("f32", "f16", "q8_0")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Half-split RoPE rows -> interleaved pairs, per head (llama.cpp's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_supported(model: Model, gguf_type: str) -> None:
    c = model.config
    why = []
    if gguf_type not in GGUF_TYPES:
        why.append(f"type {gguf_type!r}: must be one of {', '.join(GGUF_TYPES)}")
    if c.use_moe:
        why.append("use_moe: only dense models are written")
    if c.qk_norm:
        why.append("qk_norm: llama.cpp's llama architecture has no q/k norm")
    if c.rope_pairing != "half":
        why.append("rope_pairing='interleaved': the converter's permutation assumes half-split pairs")
    if c.inference_rope_scaling:
        why.append("inference_rope_scaling: the RoPE cache's YaRN is not written")
    if gguf_type == "q8_0" and any(q8_blocks(n) * 32 != n for n in (c.hidden_size, c.intermediate_size, c.q_dim)):
        why.append("q8_0 needs every input dimension to be a multiple of 32")
    if why:
        raise UsageError("cannot write this model as GGUF: " + "; ".join(why))


def write_gguf(model: Model, path: str | Path, gguf_type: str = "f32") -> Path:
    """Write ``model`` (a float32 model file's weights) as a llama.cpp GGUF of ``gguf_type``."""
    try:
        import gguf
    except ImportError as exc:  # an optional extra
        raise UsageError("writing GGUF needs the gguf package: pip install 'celerinfer-lab[real]'") from exc
    _check_supported(model, gguf_type)
    c = model.config
    w = {name: model.weight_values(name) for name in model.weights}
    out = Path(path)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"celerinfer-lab {c.hidden_size}x{c.num_hidden_layers}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[gguf_type])  # llama_ftype ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(c.vocab_size)])
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_types([1] * c.vocab_size)  # normal tokens

    def matrix(name: str, values: np.ndarray) -> None:
        if gguf_type == "f16":
            writer.add_tensor(name, values.astype(np.float16))
        elif gguf_type == "q8_0":
            writer.add_tensor(name, encode(values, "q8", name), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values.astype(np.float32))

    def vector(name: str, values: np.ndarray) -> None:
        writer.add_tensor(name, values.astype(np.float32))

    matrix("token_embd.weight", w["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        vector(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"])
        matrix(f"blk.{i}.attn_q.weight", _permute(w[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        matrix(f"blk.{i}.attn_k.weight", _permute(w[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        matrix(f"blk.{i}.attn_v.weight", w[p + "self_attn.v_proj.weight"])
        matrix(f"blk.{i}.attn_output.weight", w[p + "self_attn.o_proj.weight"])
        vector(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        matrix(f"blk.{i}.ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
        matrix(f"blk.{i}.ffn_up.weight", w[p + "mlp.up_proj.weight"])
        matrix(f"blk.{i}.ffn_down.weight", w[p + "mlp.down_proj.weight"])
    vector("output_norm.weight", w["model.norm.weight"])
    if not c.tie_word_embeddings:
        matrix("output.weight", w["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
