"""The fault catalogue: deliberate bugs, each a source edit applied to a scratch copy of cpp/ (the
way you inject your own), to prove the debugger finds them. No fault code lives under cpp/.

For each fault: what it breaks, its edits, the kernel sets it applies to (a bug in ops.hpp's
readable loops cannot show in the fast set), the trace point that must be named as the culprit
(the first layer it touches), words the diagnosis must contain (when a diagnosis applies), the
model settings and inputs that expose it (a GQA bug is invisible when every query head has its
own kv head; a tail bug needs a size that is not a multiple of the kernel's block; default inputs:
batch 2, 8 tokens, no padding), the decode step where it first shows (0: the prefill; a
decode-only fault leaves the prefill exact, so only compare_decode finds it), and the KV cache
format that exposes it (a bug in the bf16 cache's rounding needs ``kv_cache="bf16"``).
tests/test_faults.py runs each fault on every kernel set: found and diagnosed where it applies,
agreement where it does not.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ModelConfig
from .errors import FaultError  # noqa: E402,F401  (defined in errors.py, re-exported here)
from .flags import flag_for
from .paths import copy_cpp, edit_source, include_dir

if TYPE_CHECKING:  # for annotations only: the catalogue itself needs no numpy
    import numpy as np


@dataclass(frozen=True)
class Edit:
    file: str  # under cpp/include/celerinfer
    old: str  # must occur exactly once
    new: str


@dataclass(frozen=True)
class Fault:
    name: str
    breaks: str
    edits: tuple[Edit, ...]
    kernels: tuple[str, ...]  # the kernel sets whose code the edits change
    culprit: str  # trace point name
    diagnosis: str | None  # words the diagnosis contains, or None when no pattern applies
    model: dict = field(default_factory=dict)  # ModelConfig overrides that expose the fault
    inputs: dict = field(default_factory=dict)  # generate_model inputs: batch_size, seq_len, padding
    step: int = 0  # the decode step where it first shows (0: the prefill)
    kv_cache: str = "f32"  # the KV cache format that exposes it ("bf16": a bug in the cache's rounding)


BOTH = ("readable", "fast")
# The bf16/q8 sets (reduced.hpp) derive from these two: a fault in readable.hpp, fast.hpp or the
# readable ops also reaches its derived sets (their attention, rmsnorm, swiglu); the catalogue lists
# the set each fault is written against. Faults in reduced.hpp list the reduced sets they change.
DERIVED = {"readable": ("readable-bf16", "readable-q8"), "fast": ("bf16", "q8")}
REDUCED = ("readable-bf16", "readable-q8", "bf16", "q8")
L0, L1 = "model.layers.0.", "model.layers.1."


def _edit(file: str, old: str, new: str) -> tuple[Edit, ...]:
    return (Edit(file, old, new),)


CATALOGUE: list[Fault] = [
    # ---- the shared forward body and shared ops: every kernel set ------------------------------
    Fault(
        "rope_pairing_swapped",
        "RoPE rotates interleaved pairs where the model uses half-split ones (or the reverse)",
        _edit(
            "ops.hpp",
            "    const int half = hd / 2;\n    for (int b = 0; b < B; ++b)",
            "    interleaved = !interleaved;\n    const int half = hd / 2;\n    for (int b = 0; b < B; ++b)",
        ),
        BOTH,
        L0 + "self_attn.rope_q",
        "RoPE pairing",
    ),
    Fault(
        "gqa_modulo",
        "query head j reads kv head j % kv_heads instead of j // (heads / kv_heads)",
        _edit(
            "ops.hpp",
            "inline int kv_head(int h, const AttnDims& d) { return h / d.n_rep(); }",
            "inline int kv_head(int h, const AttnDims& d) { return h % d.kv_heads; }",
        ),
        BOTH,
        L0 + "self_attn.scores",
        "kv head j % kv_heads",
        dict(num_attention_heads=8, num_key_value_heads=2),
    ),
    Fault(
        "gate_up_swapped",
        "gate_proj and up_proj weights swapped",
        (
            Edit("forward.hpp", "{ws.gate.data(), w.gate, I}", "{ws.gate.data(), w.up, I}"),
            Edit("forward.hpp", "{ws.up.data(), w.up, I}", "{ws.up.data(), w.gate, I}"),
        ),
        BOTH,
        L0 + "mlp.gate_proj",
        "mlp.up_proj",
    ),
    Fault(
        "untied_head_as_embedding",
        "an untied lm_head is read as the embedding",
        _edit(
            "model.hpp",
            "const float* head() const { return config.tied ? embed : lm_head; }",
            "const float* head() const { return embed; }",
        ),
        BOTH,
        "lm_head",
        "lm_head read as the embedding",
        dict(tie_word_embeddings=False),
    ),
    Fault(
        "moe_topk_not_renormalised",
        "MoE top-k weights not divided by their sum",
        _edit("ops.hpp", "        if (renormalise) {", "        if (false) {"),
        BOTH,
        L0 + "mlp.topk_weight",
        "not renormalised",
        dict(use_moe=True, num_experts=4, num_experts_per_tok=2, topk_renorm="always"),
    ),
    Fault(
        "output_never_written",
        "the logits buffer is never written (the original tool's all-zero logits)",
        _edit("forward.hpp", "    lm_head_kept(K, logits, x, m.head(), B, S, L, H, c.vocab);\n", ""),
        BOTH,
        "lm_head",
        "never written",
    ),
    Fault(
        "residual_missing",
        "the attention output replaces the residual stream instead of adding to it",
        _edit(
            "forward.hpp",
            "        add(h, h, ws.attn_out.data(), size_t(N) * H);",
            "        std::memcpy(h, ws.attn_out.data(), sizeof(float) * size_t(N) * H);",
        ),
        BOTH,
        L0 + "attn_residual",
        "self_attn.o_proj",
    ),
    Fault(
        "qk_norm_skipped",
        "the query RMSNorm (q_norm) is skipped",
        _edit("forward.hpp", "            K.rmsnorm(ws.q.data(), ws.q.data(), L.q_norm, N * nh, hd, c.eps);\n", ""),
        BOTH,
        L0 + "self_attn.q_norm",
        "self_attn.q_proj",
        dict(qk_norm=True),
    ),
    Fault(
        "rope_wrong_direction",
        "RoPE rotates by -theta: the sin terms have the wrong sign",
        _edit(
            "ops.hpp",
            "                    v[i0] = x0 * c[i] - x1 * sn[i];\n                    v[i1] = x1 * c[i] + x0 * sn[i];",
            "                    v[i0] = x0 * c[i] + x1 * sn[i];\n                    v[i1] = x1 * c[i] - x0 * sn[i];",
        ),
        BOTH,
        L0 + "self_attn.rope_q",
        "RoPE rotates the wrong way",
    ),
    Fault(
        "rope_start_ignored",
        "decode rotates the new tokens as if they were at position 0 (rope drops `start`)",
        _edit(
            "ops.hpp",
            "            const float* c = cos + size_t(start + s) * hd;\n            const float* sn = sin + size_t(start + s) * hd;",
            "            const float* c = cos + size_t(s) * hd;\n            const float* sn = sin + size_t(s) * hd;",
        ),
        BOTH,
        L0 + "self_attn.rope_q",
        "RoPE at the wrong position",
        step=1,
    ),
    Fault(
        "residual_added_twice",
        "the attention output is added to the residual stream twice (a duplicated line)",
        _edit(
            "forward.hpp",
            "        add(h, h, ws.attn_out.data(), size_t(N) * H);\n",
            "        add(h, h, ws.attn_out.data(), size_t(N) * H);\n        add(h, h, ws.attn_out.data(), size_t(N) * H);\n",
        ),
        BOTH,
        L0 + "attn_residual",
        "residual added twice",
    ),
    Fault(
        "shared_expert_dropped",
        "the shared expert is computed (and traced) but never added to the MoE output",
        _edit("forward.hpp", "        add(y, y, ws.expert_out.data(), size_t(N) * H);\n", ""),
        BOTH,
        "model.layers.0",
        "shared expert 0 dropped",
        dict(use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    ),
    Fault(
        "final_norm_wrong_weight",
        "the final RMSNorm uses the last layer's post-attention norm weight",
        _edit(
            "forward.hpp",
            "    K.rmsnorm(x, h, m.final_norm, N, H, c.eps);",
            "    K.rmsnorm(x, h, m.layers[c.layers - 1].post_norm, N, H, c.eps);",
        ),
        BOTH,
        "model.norm",
        "post_attention_layernorm.weight",
    ),
    # ---- the readable kernels (ops.hpp, readable.hpp) -------------------------------------------
    Fault(
        "causal_mask_missing",
        "no -inf above the diagonal: every token sees the future",
        _edit("ops.hpp", "                    if (j > d.start() + i) s += neg_inf;\n", ""),
        ("readable",),
        L0 + "self_attn.scores",
        "causal mask missing",
    ),
    Fault(
        "padding_mask_ignored",
        "padded keys are not masked",
        _edit("ops.hpp", "                    if (mask[size_t(b) * d.P + j] == 0) s += -1e9f;\n", ""),
        ("readable",),
        L0 + "self_attn.scores",
        "padding mask ignored",
        inputs=dict(padding="left"),
    ),
    Fault(
        "rmsnorm_eps_outside_sqrt",
        "RMSNorm divides by sqrt(mean(x^2)) + eps instead of sqrt(mean(x^2) + eps)",
        _edit(
            "ops.hpp",
            "const float inv_rms = 1.0f / std::sqrt(dot(xr, xr, n) / float(n) + eps);",
            "const float inv_rms = 1.0f / (std::sqrt(dot(xr, xr, n) / float(n)) + eps);",
        ),
        ("readable",),
        L0 + "input_layernorm",
        "eps outside the square root",
    ),
    Fault(
        "rmsnorm_weight_ignored",
        "RMSNorm never multiplies by its weight",
        _edit("ops.hpp", "yr[i] = weight[i] * (xr[i] * inv_rms);", "yr[i] = xr[i] * inv_rms;"),
        ("readable",),
        L0 + "input_layernorm",
        "norm weight ignored",
    ),
    Fault(
        "attention_scale_1_over_d",
        "scores divided by head_dim instead of sqrt(head_dim)",
        _edit(
            "ops.hpp",
            "    const float scale = float(std::sqrt(double(d.hd)));\n    const float neg_inf",
            "    const float scale = float(d.hd);\n    const float neg_inf",
        ),
        ("readable",),
        L0 + "self_attn.scores",
        "scale error",
    ),
    Fault(
        "silu_as_gelu",
        "GELU where SwiGLU's SiLU belongs",
        _edit(
            "ops.hpp",
            "for (size_t i = 0; i < n; ++i) act[i] = silu(gate[i]) * up[i];",
            "for (size_t i = 0; i < n; ++i) act[i] = 0.5f * gate[i] * (1.0f + std::erf(gate[i] * 0.70710678f)) * up[i];",
        ),
        ("readable",),
        L0 + "mlp.act",
        "GELU",
    ),
    Fault(
        "softmax_wrong_axis",
        "attention softmax over queries instead of keys",
        _edit(
            "readable.hpp",
            "        softmax(scores, int(rows), d.P);\n",
            "        for (size_t blk = 0; blk < rows / d.S; ++blk)  // down each column of a (b, h) block\n"
            "            for (int j = 0; j < d.P; ++j) {\n"
            "                float* col = scores + blk * d.S * d.P + j;\n"
            "                float max = col[0], sum = 0.0f;\n"
            "                for (int i = 1; i < d.S; ++i) max = col[size_t(i) * d.P] > max ? col[size_t(i) * d.P] : max;\n"
            "                for (int i = 0; i < d.S; ++i) sum += (col[size_t(i) * d.P] = std::exp(col[size_t(i) * d.P] - max));\n"
            "                for (int i = 0; i < d.S; ++i) col[size_t(i) * d.P] /= sum;\n"
            "            }\n",
        ),
        ("readable",),
        L0 + "self_attn.probs",
        "softmax over the wrong axis",
    ),
    Fault(
        "causal_mask_off_by_one",
        "the causal mask also covers the diagonal: a token cannot see itself",
        _edit("ops.hpp", "if (j > d.start() + i) s += neg_inf;", "if (j >= d.start() + i) s += neg_inf;"),
        ("readable",),
        L0 + "self_attn.scores",
        "causal mask off by one",
    ),
    Fault(
        "context_head_skipped",
        "the context loop stops one head early: the last head is never written",
        _edit(
            "ops.hpp",
            "            for (int h = 0; h < d.heads; ++h) {\n                float* out = context",
            "            for (int h = 0; h < d.heads - 1; ++h) {\n                float* out = context",
        ),
        ("readable",),
        L0 + "self_attn.context",
        "only in head 7 of 8",
    ),
    Fault(
        "context_layout_transposed",
        "the context is written [B, heads, S, hd] where o_proj reads [B, S, heads, hd]",
        _edit(
            "ops.hpp",
            "float* out = context + ((size_t(b) * d.S + i) * d.heads + h) * d.hd;",
            "float* out = context + ((size_t(b) * d.heads + h) * d.S + i) * d.hd;",
        ),
        ("readable",),
        L0 + "self_attn.context",
        "layout transposed",
    ),
    # The isolated (teacher-forced) run follows the plain run in the same workspace: at layer 0 the
    # context buffer still holds the plain run's last context, so layer 0 is where it shows.
    Fault(
        "context_accumulator_not_cleared",
        "the context accumulator is never zeroed: it adds onto the buffer's old value",
        _edit("ops.hpp", "                for (int e = 0; e < d.hd; ++e) out[e] = 0.0f;\n", ""),
        ("readable",),
        L0 + "self_attn.context",
        "accumulator not cleared",
    ),
    # ---- the fast kernels (fast.hpp) -------------------------------------------------------------
    Fault(
        "fast_attention_scale",
        "the fused attention divides scores by head_dim instead of sqrt(head_dim)",
        _edit(
            "fast.hpp",
            "    const float scale = float(std::sqrt(double(d.hd)));\n    const vf16 vscale",
            "    const float scale = float(d.hd);\n    const vf16 vscale",
        ),
        ("fast",),
        L0 + "self_attn.scores",
        "scale error",
    ),
    Fault(
        "fast_rmsnorm_eps_outside_sqrt",
        "the fast RMSNorm adds eps outside the square root",
        _edit(
            "fast.hpp",
            "const float inv_rms = 1.0f / std::sqrt(dot(xr, xr, n) / float(n) + eps);",
            "const float inv_rms = 1.0f / (std::sqrt(dot(xr, xr, n) / float(n)) + eps);",
        ),
        ("fast",),
        L0 + "input_layernorm",
        "eps outside the square root",
    ),
    Fault(
        "fast_gemm_row_tail",
        "the GEMM's seven-row tail runs the six-row tile: the last row is never computed",
        _edit(
            "fast.hpp",
            "if (n == R) gemm_tile<R, NP>(y, x, w, in, out, panel);",
            "if (n == R) gemm_tile<R == 7 ? 6 : R, NP>(y, x, w, in, out, panel);",
        ),
        ("fast",),
        L0 + "self_attn.q_proj",
        "only in token row 14 of 15",
        inputs=dict(batch_size=1, seq_len=15),
    ),
    Fault(
        "fast_gemm_panel_tail",
        "a partial panel (out % 16 != 0) is never stored: the last outputs are left stale",
        _edit(
            "fast.hpp",
            "            } else {\n                float tmp[16];\n                vstore(tmp, acc[r][p]);\n"
            "                std::memcpy(y + size_t(r) * out + o, tmp, sizeof(float) * valid);\n            }\n",
            "            }\n",
        ),
        ("fast",),
        L0 + "mlp.gate_proj",
        "only in output columns 64..71",
        dict(intermediate_size=72),
    ),
    Fault(
        "fast_gemm_panel_triples_floor",
        "panel triples rounded down: a matrix whose panels are not a multiple of 3 loses its last ones",
        _edit("fast.hpp", "return (W.panels + 2) / 3; }", "return W.panels / 3; }"),
        ("fast",),
        L0 + "self_attn.q_proj",
        "only in output columns 48..63",
    ),
    Fault(
        "fast_gemm_row_chunk_end",
        "the last row chunk also stops at a multiple of kGemmRows (8): rows past it are never computed",
        _edit(
            "fast.hpp",
            "const int r1 = chunk + 1 == row_chunks ? rows : int(int64_t(rows) * (chunk + 1) / row_chunks) / kGemmRows * kGemmRows;",
            "const int r1 = int(int64_t(rows) * (chunk + 1) / row_chunks) / kGemmRows * kGemmRows;",
        ),
        ("fast",),
        L0 + "self_attn.q_proj",
        "only in token rows 48..49 of 50",
        inputs=dict(batch_size=2, seq_len=25),
    ),
    Fault(
        "fast_dot_tail_dropped",
        "fast::dot drops the scalar tail (n % 16 elements): RMSNorm's sum of squares is short",
        _edit("fast.hpp", "    for (; i < n; ++i) s += a[i] * b[i];\n", ""),
        ("fast",),
        L0 + "input_layernorm",
        "misses the last 8",
        dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2),
    ),
    Fault(
        "fast_swiglu_tail_dropped",
        "fast::swiglu drops its scalar tail: the last n % 16 activations are stale",
        _edit(
            "fast.hpp",
            "    for (size_t i = blocks * 16; i < n; ++i) act[i] = CELERINFER_NS::silu(gate[i]) * up[i];\n",
            "",
        ),
        ("fast",),
        L0 + "mlp.act",
        "only in the last 8",
        dict(intermediate_size=72),
        dict(batch_size=1, seq_len=7),
    ),
    Fault(
        "fast_vexp_term_dropped",
        "vexp's polynomial loses a term: exp is a little off (a precision loss, not a wrong formula)",
        _edit("fast.hpp", "    p = p * r + 4.1665795894e-2f;\n", ""),
        ("fast",),
        L0 + "mlp.act",
        "precision loss",
    ),
    Fault(
        "fast_padding_mask_ignored",
        "the fused attention's `padded` test is inverted: padded keys are never masked",
        _edit(
            "fast.hpp",
            "return std::find(key_mask, key_mask + d.P, int64_t(0)) != key_mask + d.P;",
            "return std::find(key_mask, key_mask + d.P, int64_t(0)) == key_mask + d.P;",
        ),
        ("fast",),
        L0 + "self_attn.scores",
        "padding mask ignored",
        inputs=dict(padding="left"),
    ),
    Fault(
        "fast_causal_off_by_one",
        "the fused attention's causal key count is one short: the diagonal is masked",
        _edit(
            "fast.hpp",
            "{ return d.start() + i + 1; }",
            "{ return d.start() + i; }",
        ),
        ("fast",),
        L0 + "self_attn.scores",
        "causal mask off by one",
    ),
    Fault(
        "fast_key_cache_stride",
        "the fused attention reads the transposed key cache with row stride P instead of kt_stride",
        (  # both paths: the prefill's key blocks and the decode's score tiles
            Edit(
                "fast.hpp",
                "std::memcpy(kblock_p + e * 16, kt + size_t(e) * kt_stride + j0 + 16 * p, 64);",
                "std::memcpy(kblock_p + e * 16, kt + size_t(e) * d.P + j0 + 16 * p, 64);",
            ),
            Edit(
                "fast.hpp",
                "attention_decode_scores(s_rows, qs, kt, kt_stride, d);",
                "attention_decode_scores(s_rows, qs, kt, d.P, d);",
            ),
        ),
        ("fast",),
        L0 + "self_attn.scores",
        "key cache read with row stride",
    ),
    Fault(
        "fast_decode_context_tail",
        "the decode attention stores only whole vectors of a context row (head_dim % 16 values dropped): at "
        "head_dim 10, a decode step's context is never written",
        _edit(
            "fast.hpp",
            "const int width = std::min(16 * EV, hd - e0);",
            "const int width = std::min(16 * EV, hd - e0) / 16 * 16;",
        ),
        ("fast",),
        L0 + "self_attn.context",
        None,
        dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2),
        step=1,  # 8 prompt tokens take the blocked path; the decode path runs from step 1
    ),
    Fault(
        "fast_key_cache_slot",
        "new keys go to transposed-cache slot i instead of start + i: decode overwrites key 0",
        _edit("fast.hpp", "d.hd * kt_stride + d.start();", "d.hd * kt_stride;"),
        ("fast",),
        L0 + "self_attn.scores",
        "KV-cache slot",
        step=1,
    ),
    Fault(
        "fast_value_cache_slot",
        "new values go to cache slot i instead of start + i: decode overwrites value 0",
        _edit(
            "fast.hpp",
            "        cache_store(ws.layer_v(layer), v, d);\n    }\n    void attention(",
            "        cache_store(ws.layer_v(layer), v, AttnDims{d.B, d.S, d.S, d.max_len, d.heads, d.kv_heads, d.hd});\n"
            "    }\n    void attention(",
        ),
        ("fast",),
        L0 + "self_attn.context",
        "value cache slot",
        step=1,
    ),
]
CATALOGUE += [
    # ---- the bf16 KV cache (an engine option): the rounding in ops.hpp, shared by every kernel set ---
    Fault(
        "kv_bf16_truncation",
        "the bf16 KV cache truncates each key and value (drops the low 16 bits) instead of rounding to nearest even",
        _edit(
            "ops.hpp",
            "        else u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;",
            "        else u = u & 0xffff0000u;",
        ),
        BOTH,
        L0 + "self_attn.k_cached",
        "truncates",
        kv_cache="bf16",
    ),
]
CATALOGUE += [
    # ---- the bf16 / q8 kernel sets (reduced.hpp), judged on the same decoded weights --------------
    Fault(
        "q8_neighbour_block_scale",
        "the q8 packing gives each block the scale of the next block along the row",
        _edit(
            "reduced.hpp",
            "P.scales[(p * P.blocks + b) * 16 + lane] = q8_scale(row, b);",
            "P.scales[(p * P.blocks + b) * 16 + lane] = q8_scale(row, std::min(b + 1, P.blocks - 1));",
        ),
        ("q8",),
        L0 + "self_attn.q_proj",
        None,
    ),
    Fault(
        "q8_int8_read_as_uint8",
        "the readable q8 decoding reads each int8 weight as unsigned: negative weights become 128 ... 255",
        (
            Edit(
                "reduced.hpp",
                "inline int8_t q8_value(const uint8_t* row, int k) {",
                "inline uint8_t q8_value(const uint8_t* row, int k) {",
            ),
            Edit(
                "reduced.hpp",
                "    return int8_t(row[size_t(k / kQ8Block)",
                "    return uint8_t(row[size_t(k / kQ8Block)",
            ),
        ),
        ("readable-q8",),
        L0 + "self_attn.q_proj",
        None,
    ),
    Fault(
        "reduced_gemv_odd_activation",
        "the bf16/q8 GEMV (decode) multiplies the weight at k + 1 by the activation at k (one k in four)",
        (
            Edit("reduced.hpp", "a1[r] += w1 * xr[1];", "a1[r] += w1 * xr[0];"),
            # the q8 GEMV on VNNI: the activation at k + 1 replaced by the one at k before its digits
            Edit(
                "reduced.hpp",
                "__m512 v[2] = {_mm512_maskz_loadu_ps(m0, xb), _mm512_maskz_loadu_ps(m1, xb + 16)};",
                "__m512 v[2] = {_mm512_maskz_loadu_ps(m0, xb), _mm512_maskz_loadu_ps(m1, xb + 16)};\n"
                "            for (__m512& u : v) u = _mm512_permutexvar_ps("
                "_mm512_set_epi32(15, 14, 12, 12, 11, 10, 8, 8, 7, 6, 4, 4, 3, 2, 0, 0), u);",
            ),
        ),
        ("bf16", "q8"),
        L0 + "self_attn.q_proj",
        None,
        step=1,
    ),
]
FAULTS: dict[str, Fault] = {f.name: f for f in CATALOGUE}


def get_fault(name: str | None) -> Fault | None:
    if name is None:
        return None
    if not isinstance(name, str) or name not in FAULTS:
        raise FaultError(f"unknown fault {name!r}; `celerinfer-lab compare --list-faults` lists them")
    return FAULTS[name]


_scratch_root: Path | None = None


def _scratch_dir(name: str) -> Path:
    """A new folder for one faulty copy, under one per-process root removed at exit."""
    global _scratch_root
    if _scratch_root is None:
        _scratch_root = Path(tempfile.mkdtemp(prefix="celerinfer-faults-"))
        atexit.register(shutil.rmtree, _scratch_root, True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_scratch_root))


def apply_fault(fault: Fault, source: str | Path, dest: str | Path | None = None) -> Path:
    """Copy the C++ in ``source`` to ``dest`` (default: a scratch folder) and apply the fault's edits."""
    include = include_dir(Path(source))
    dest = copy_cpp(Path(dest) if dest is not None else _scratch_dir(fault.name), include.parent)
    for edit in fault.edits:
        try:
            edit_source(dest / "include" / "celerinfer" / edit.file, edit.old, edit.new)
        except ValueError as exc:
            raise FaultError(f"fault {fault.name!r} no longer applies to {source}: {exc}") from None
    return dest


def why_it_cannot_show(
    fault: Fault, config: ModelConfig, attention_mask: np.ndarray | None = None, kv_cache: str = "f32"
) -> list[str]:
    """What keeps ``fault`` from showing on a model: each reason names the generate flag that fixes it."""
    reasons = []
    for key, wanted in fault.model.items():
        have = getattr(config, key)
        if key == "num_key_value_heads":  # what matters is that query heads share kv heads
            if config.n_rep > 1:
                continue
            reasons.append(
                f"every query head has its own kv head (GQA bugs need heads > kv heads): {flag_for(key, wanted)}"
            )
        elif have != wanted:
            reasons.append(f"{key} is {have!r}, the fault needs {wanted!r}: {flag_for(key, wanted)}")
    if fault.kv_cache != "f32" and kv_cache != fault.kv_cache:
        reasons.append(
            f"the KV cache is {kv_cache}, the fault is in the {fault.kv_cache} cache: --kv-cache {fault.kv_cache}"
        )
    padding = fault.inputs.get("padding", "none")
    if padding != "none" and attention_mask is not None and attention_mask.all():
        reasons.append(f"the inputs have no padding: --padding {padding}")
    return reasons
