// The forward pass, top to bottom, one op per line, in trace order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"

namespace CELERINFER_NS {

// Every buffer the forward needs for a [B, S] batch, allocated once up front.
struct Workspace {
    int B, S;
    std::vector<float> h, x, q, k, v, scores, context, attn_out, gate, up, act, mlp_out, tmp;
    std::vector<float> router_probs, topk_weight, topk_idx_f;  // MoE only
    std::vector<int64_t> topk_idx;
    std::vector<float> expert_in, expert_gate, expert_up, expert_out;     // MoE: rows routed to one expert
    std::vector<int> expert_rows;

    Workspace(const Config& c, int B_, int S_) : B(B_), S(S_) {
        CI_CHECK(B > 0 && S > 0, "workspace: batch and sequence length must be >= 1");
        CI_CHECK(S <= c.max_pos, "sequence length ", S, " is longer than max_position_embeddings ", c.max_pos);
        const size_t T = size_t(B) * S, H = c.hidden;
        h.resize(T * H); x.resize(T * H); attn_out.resize(T * H); mlp_out.resize(T * H); tmp.resize(T * H);
        q.resize(T * c.q_dim()); k.resize(T * c.kv_dim()); v.resize(T * c.kv_dim());
        context.resize(T * c.q_dim());
        scores.resize(size_t(B) * c.heads * S * S);
        const size_t I = c.moe ? c.moe_intermediate : c.intermediate;
        gate.resize(T * I); up.resize(T * I); act.resize(T * I);
        if (c.moe) {
            router_probs.resize(T * c.experts);
            topk_weight.resize(T * c.topk); topk_idx.resize(T * c.topk); topk_idx_f.resize(T * c.topk);
            expert_in.resize(T * H); expert_out.resize(T * H); expert_rows.resize(T);
        }
    }
};

// y = down(silu(gate(x)) * up(x)) for `rows` rows; traces gate/up/act under `layer` when given.
inline void ffn(float* y, const float* x, const FFNWeights& w, int rows, int H, int I, Workspace& ws,
                TraceSink* trace = nullptr, int layer = -1, int B = 0, int S = 0) {
    const float *w_gate = w.gate, *w_up = w.up;
#ifdef CELERINFER_FAULT_GATE_UP_SWAPPED
    std::swap(w_gate, w_up);
#endif
    linear(ws.gate.data(), x, w_gate, rows, H, I);
    trace_point(trace, layer, "mlp.gate_proj", ws.gate.data(), {B, S, I});
    linear(ws.up.data(), x, w_up, rows, H, I);
    trace_point(trace, layer, "mlp.up_proj", ws.up.data(), {B, S, I});
    swiglu(ws.act.data(), ws.gate.data(), ws.up.data(), size_t(rows) * I);
    trace_point(trace, layer, "mlp.act", ws.act.data(), {B, S, I});
    linear(y, ws.act.data(), w.down, rows, I, H);
}

// Mixture of experts: softmax router, top-k, experts summed in expert order, shared experts added.
inline void moe(float* y, const float* x, const LayerWeights& L, const Config& c, Workspace& ws,
                TraceSink* trace, int layer) {
    const int B = ws.B, S = ws.S, T = B * S, H = c.hidden, E = c.experts, K = c.topk, I = c.moe_intermediate;
    linear(ws.router_probs.data(), x, L.router, T, H, E);
    softmax(ws.router_probs.data(), T, E);
    trace_point(trace, layer, "mlp.router_probs", ws.router_probs.data(), {B, S, E});
    topk(ws.topk_idx.data(), ws.topk_weight.data(), ws.router_probs.data(), T, E, K, c.renormalises_topk());
    if (trace) {  // the trace holds floats: record the indices as floats, read back a teacher's
        for (size_t i = 0; i < ws.topk_idx.size(); ++i) ws.topk_idx_f[i] = float(ws.topk_idx[i]);
        trace_point(trace, layer, "mlp.topk_idx", ws.topk_idx_f.data(), {B, S, K});
        for (size_t i = 0; i < ws.topk_idx.size(); ++i) ws.topk_idx[i] = int64_t(ws.topk_idx_f[i]);
    }
    trace_point(trace, layer, "mlp.topk_weight", ws.topk_weight.data(), {B, S, K});
    for (size_t i = 0; i < size_t(T) * H; ++i) y[i] = 0.0f;
    for (int e = 0; e < E; ++e) {
        int n = 0;  // gather the tokens routed to expert e
        for (int t = 0; t < T; ++t)
            for (int s = 0; s < K; ++s)
                if (ws.topk_idx[size_t(t) * K + s] == e) {
                    ws.expert_rows[n] = t * K + s;
                    for (int i = 0; i < H; ++i) ws.expert_in[size_t(n) * H + i] = x[size_t(t) * H + i];
                    ++n;
                }
        if (n == 0) continue;
        ffn(ws.expert_out.data(), ws.expert_in.data(), L.experts[e], n, H, I, ws);
        for (int r = 0; r < n; ++r) {
            const int t = ws.expert_rows[r] / K;
            const float w = ws.topk_weight[ws.expert_rows[r]];
            for (int i = 0; i < H; ++i) y[size_t(t) * H + i] += ws.expert_out[size_t(r) * H + i] * w;
        }
    }
    trace_point(trace, layer, "mlp.routed_experts", y, {B, S, H});
    for (size_t s = 0; s < L.shared_experts.size(); ++s) {  // MiniMind adds each in turn, weight 1
        ffn(ws.expert_out.data(), x, L.shared_experts[s], T, H, I, ws);
        trace_point(trace, layer, "mlp.shared_experts." + std::to_string(s), ws.expert_out.data(), {B, S, H});
        add(y, y, ws.expert_out.data(), size_t(T) * H);
    }
}

// logits [B, S, vocab] for input_ids / attention_mask [B, S] (mask: 1 = token, 0 = padding).
inline void forward(const Model& m, const int64_t* input_ids, const int64_t* mask, Workspace& ws, float* logits,
                    TraceSink* trace = nullptr) {
    const Config& c = m.config;
    const int B = ws.B, S = ws.S, T = B * S, H = c.hidden, hd = c.head_dim;
    const int nh = c.heads, kvh = c.kv_heads, I = c.intermediate;
    CI_CHECK(S <= c.max_pos, "sequence length ", S, " is longer than max_position_embeddings ", c.max_pos);
    float* h = ws.h.data();
    float* x = ws.x.data();

    embed(h, input_ids, m.embed, T, c.vocab, H);
    trace_point(trace, -1, "model.embed_tokens", h, {B, S, H});
    for (int l = 0; l < c.layers; ++l) {
        const LayerWeights& L = m.layers[l];
        // --- attention ---
        rmsnorm(x, h, L.input_norm, T, H, c.eps);
        trace_point(trace, l, "input_layernorm", x, {B, S, H});
        linear(ws.q.data(), x, L.wq, T, H, c.q_dim());
        trace_point(trace, l, "self_attn.q_proj", ws.q.data(), {B, S, c.q_dim()});
        linear(ws.k.data(), x, L.wk, T, H, c.kv_dim());
        trace_point(trace, l, "self_attn.k_proj", ws.k.data(), {B, S, c.kv_dim()});
        linear(ws.v.data(), x, L.wv, T, H, c.kv_dim());
        trace_point(trace, l, "self_attn.v_proj", ws.v.data(), {B, S, c.kv_dim()});
        if (c.qk_norm) {
#ifndef CELERINFER_FAULT_QK_NORM_SKIPPED
            rmsnorm(ws.q.data(), ws.q.data(), L.q_norm, T * nh, hd, c.eps);
#endif
            trace_point(trace, l, "self_attn.q_norm", ws.q.data(), {B, S, nh, hd});
            rmsnorm(ws.k.data(), ws.k.data(), L.k_norm, T * kvh, hd, c.eps);
            trace_point(trace, l, "self_attn.k_norm", ws.k.data(), {B, S, kvh, hd});
        }
        rope(ws.q.data(), m.rope_cos, m.rope_sin, B, S, nh, hd, c.rope_interleaved);
        trace_point(trace, l, "self_attn.rope_q", ws.q.data(), {B, S, nh, hd});
        rope(ws.k.data(), m.rope_cos, m.rope_sin, B, S, kvh, hd, c.rope_interleaved);
        trace_point(trace, l, "self_attn.rope_k", ws.k.data(), {B, S, kvh, hd});
        attention_scores(ws.scores.data(), ws.q.data(), ws.k.data(), mask, B, S, nh, kvh, hd);
        trace_point(trace, l, "self_attn.scores", ws.scores.data(), {B, nh, S, S});
        softmax(ws.scores.data(), B * nh * S, S);
        trace_point(trace, l, "self_attn.probs", ws.scores.data(), {B, nh, S, S});
        attention_context(ws.context.data(), ws.scores.data(), ws.v.data(), B, S, nh, kvh, hd);
        trace_point(trace, l, "self_attn.context", ws.context.data(), {B, S, c.q_dim()});
        linear(ws.attn_out.data(), ws.context.data(), L.wo, T, c.q_dim(), H);
        trace_point(trace, l, "self_attn.o_proj", ws.attn_out.data(), {B, S, H});
#ifdef CELERINFER_FAULT_RESIDUAL_MISSING
        std::copy(ws.attn_out.begin(), ws.attn_out.end(), ws.h.begin());
#else
        add(h, h, ws.attn_out.data(), size_t(T) * H);
#endif
        trace_point(trace, l, "attn_residual", h, {B, S, H});
        // --- feed-forward ---
        rmsnorm(x, h, L.post_norm, T, H, c.eps);
        trace_point(trace, l, "post_attention_layernorm", x, {B, S, H});
        if (c.moe) {
            moe(ws.mlp_out.data(), x, L, c, ws, trace, l);
        } else {
            ffn(ws.mlp_out.data(), x, L.ffn, T, H, I, ws, trace, l, B, S);
            trace_point(trace, l, "mlp.down_proj", ws.mlp_out.data(), {B, S, H});
        }
        add(h, h, ws.mlp_out.data(), size_t(T) * H);
        trace_point(trace, l, "", h, {B, S, H});
    }
    rmsnorm(x, h, m.final_norm, T, H, c.eps);
    trace_point(trace, -1, "model.norm", x, {B, S, H});
#ifndef CELERINFER_FAULT_OUTPUT_NEVER_WRITTEN
    linear(logits, x, m.head(), T, H, c.vocab);
#endif
    trace_point(trace, -1, "lm_head", logits, {B, S, c.vocab});
}

}  // namespace CELERINFER_NS
