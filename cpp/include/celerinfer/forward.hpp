// The forward pass, top to bottom, one op per line, in trace order, written once over any kernel
// set (readable.hpp, fast.hpp, or your own: see kernel_set.hpp).
#pragma once
#include <cstdint>
#include <string>

#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"
#include "workspace.hpp"

namespace CELERINFER_NS {

// y = down(silu(gate(x)) * up(x)) for `rows` rows; traces gate/up/act under `layer` when given.
template <class Kernels>
inline void ffn(const Kernels& K, float* y, const float* x, const FFNWeights& w, int rows, int H, int I, Workspace& ws,
                TraceSink* trace = nullptr, int layer = -1, int B = 0, int T = 0) {
    K.linear(ws.gate.data(), x, w.gate, rows, H, I);
    trace_point(trace, layer, "mlp.gate_proj", ws.gate.data(), {B, T, I});
    K.linear(ws.up.data(), x, w.up, rows, H, I);
    trace_point(trace, layer, "mlp.up_proj", ws.up.data(), {B, T, I});
    K.swiglu(ws.act.data(), ws.gate.data(), ws.up.data(), size_t(rows) * I);
    trace_point(trace, layer, "mlp.act", ws.act.data(), {B, T, I});
    K.linear(y, ws.act.data(), w.down, rows, I, H);
}

// Mixture of experts: softmax router, top-k, experts summed in expert order, shared experts added.
template <class Kernels>
inline void moe(const Kernels& K, float* y, const float* x, const LayerWeights& L, const Config& c, int T,
                Workspace& ws, TraceSink* trace, int layer) {
    const int B = ws.B, N = B * T, H = c.hidden, E = c.experts, topk = c.topk, I = c.moe_intermediate;
    K.linear(ws.router_probs.data(), x, L.router, N, H, E);
    softmax(ws.router_probs.data(), N, E);
    trace_point(trace, layer, "mlp.router_probs", ws.router_probs.data(), {B, T, E});
    CELERINFER_NS::topk(ws.topk_idx.data(), ws.topk_weight.data(), ws.router_probs.data(), N, E, topk, c.renormalises_topk());
    if (trace) {  // the trace holds floats: record the indices as floats, read back a teacher's
        for (int i = 0; i < N * topk; ++i) ws.topk_idx_f[i] = float(ws.topk_idx[i]);
        trace_point(trace, layer, "mlp.topk_idx", ws.topk_idx_f.data(), {B, T, topk});
        for (int i = 0; i < N * topk; ++i) ws.topk_idx[i] = int64_t(ws.topk_idx_f[i]);
    }
    trace_point(trace, layer, "mlp.topk_weight", ws.topk_weight.data(), {B, T, topk});
    for (size_t i = 0; i < size_t(N) * H; ++i) y[i] = 0.0f;
    for (int e = 0; e < E; ++e) {
        int n = 0;  // gather the tokens routed to expert e
        for (int t = 0; t < N; ++t)
            for (int s = 0; s < topk; ++s)
                if (ws.topk_idx[size_t(t) * topk + s] == e) {
                    ws.expert_rows[n] = t * topk + s;
                    for (int i = 0; i < H; ++i) ws.expert_in[size_t(n) * H + i] = x[size_t(t) * H + i];
                    ++n;
                }
        if (n == 0) continue;
        ffn(K, ws.expert_out.data(), ws.expert_in.data(), L.experts[e], n, H, I, ws);
        for (int r = 0; r < n; ++r) {
            const int t = ws.expert_rows[r] / topk;
            const float w = ws.topk_weight[ws.expert_rows[r]];
            for (int i = 0; i < H; ++i) y[size_t(t) * H + i] += ws.expert_out[size_t(r) * H + i] * w;
        }
    }
    trace_point(trace, layer, "mlp.routed_experts", y, {B, T, H});
    for (size_t s = 0; s < L.shared_experts.size(); ++s) {  // MiniMind adds each in turn, weight 1
        ffn(K, ws.expert_out.data(), x, L.shared_experts[s], N, H, I, ws);
        if (trace) {
            const std::string suffix = "mlp.shared_experts." + std::to_string(s);
            trace_point(trace, layer, suffix.c_str(), ws.expert_out.data(), {B, T, H});
        }
        add(y, y, ws.expert_out.data(), size_t(N) * H);
    }
}

// The kernel set's attention, observed when tracing: its scores and probs rows are recorded (and
// replaced by a teacher's) through the taps; points the kernel does not observe stay out of the trace.
template <class Kernels>
inline void attention_traced(const Kernels& K, float* context, const float* q, int l, const int64_t* mask,
                             const AttnDims& d, Workspace& ws, TraceSink* trace) {
    AttentionTaps taps;
    if (!trace) return K.attention(context, q, l, mask, d, ws, taps);
    const size_t n = size_t(d.B) * d.heads * d.T * d.P;
    if (ws.trace_scores.size() < n) ws.trace_scores.resize(n);
    if (ws.trace_probs.size() < n) ws.trace_probs.resize(n);
    taps.scores = ws.trace_scores.data();
    taps.probs = ws.trace_probs.data();
    const std::string scores = point_name(l, "self_attn.scores"), probs = point_name(l, "self_attn.probs");
    taps.scores_teacher = trace->teacher(scores, n);
    taps.probs_teacher = trace->teacher(probs, n);
    K.attention(context, q, l, mask, d, ws, taps);
    const std::vector<int64_t> shape{d.B, d.heads, d.T, d.P};
    if (taps.wrote_scores) trace->record(scores, taps.scores, shape);
    if (taps.wrote_probs) trace->record(probs, taps.probs, shape);
}

// logits [B, T, vocab] for T new tokens input_ids [B, T] at positions start ... start + T - 1;
// mask [B, start + T] covers the cached keys and the new ones (1 = token, 0 = padding).
// The new keys and values join the workspace's KV cache.
template <class Kernels>
inline void forward_tokens(const Model& m, const Kernels& K, const int64_t* input_ids, const int64_t* mask, int T,
                           int start, Workspace& ws, float* logits, TraceSink* trace = nullptr) {
    const Config& c = m.config;
    const int B = ws.B, N = B * T, H = c.hidden, hd = c.head_dim;
    const int nh = c.heads, kvh = c.kv_heads, I = c.intermediate;
    CI_CHECK(T >= 1 && T <= ws.T, "forward: ", T, " new tokens, the workspace holds up to ", ws.T);
    CI_CHECK(start >= 0 && start + T <= ws.max_len, "forward: positions up to ", start + T,
             " exceed the workspace's KV cache of ", ws.max_len);
    const AttnDims dims{B, T, start + T, ws.max_len, nh, kvh, hd};
    float* h = ws.h.data();
    float* x = ws.x.data();

    embed(h, input_ids, m.embed, N, c.vocab, H);
    trace_point(trace, -1, "model.embed_tokens", h, {B, T, H});
    for (int l = 0; l < c.layers; ++l) {
        const LayerWeights& L = m.layers[l];
        // --- attention ---
        K.rmsnorm(x, h, L.input_norm, N, H, c.eps);
        trace_point(trace, l, "input_layernorm", x, {B, T, H});
        K.linear(ws.q.data(), x, L.wq, N, H, c.q_dim());
        trace_point(trace, l, "self_attn.q_proj", ws.q.data(), {B, T, c.q_dim()});
        K.linear(ws.k.data(), x, L.wk, N, H, c.kv_dim());
        trace_point(trace, l, "self_attn.k_proj", ws.k.data(), {B, T, c.kv_dim()});
        K.linear(ws.v.data(), x, L.wv, N, H, c.kv_dim());
        trace_point(trace, l, "self_attn.v_proj", ws.v.data(), {B, T, c.kv_dim()});
        if (c.qk_norm) {
            K.rmsnorm(ws.q.data(), ws.q.data(), L.q_norm, N * nh, hd, c.eps);
            trace_point(trace, l, "self_attn.q_norm", ws.q.data(), {B, T, nh, hd});
            K.rmsnorm(ws.k.data(), ws.k.data(), L.k_norm, N * kvh, hd, c.eps);
            trace_point(trace, l, "self_attn.k_norm", ws.k.data(), {B, T, kvh, hd});
        }
        rope_at(ws.q.data(), m.rope_cos, m.rope_sin, B, T, start, nh, hd, c.rope_interleaved);
        trace_point(trace, l, "self_attn.rope_q", ws.q.data(), {B, T, nh, hd});
        rope_at(ws.k.data(), m.rope_cos, m.rope_sin, B, T, start, kvh, hd, c.rope_interleaved);
        trace_point(trace, l, "self_attn.rope_k", ws.k.data(), {B, T, kvh, hd});
        K.store_kv(l, ws.k.data(), ws.v.data(), dims, ws);
        attention_traced(K, ws.context.data(), ws.q.data(), l, mask, dims, ws, trace);
        trace_point(trace, l, "self_attn.context", ws.context.data(), {B, T, c.q_dim()});
        K.linear(ws.attn_out.data(), ws.context.data(), L.wo, N, c.q_dim(), H);
        trace_point(trace, l, "self_attn.o_proj", ws.attn_out.data(), {B, T, H});
        add(h, h, ws.attn_out.data(), size_t(N) * H);
        trace_point(trace, l, "attn_residual", h, {B, T, H});
        // --- feed-forward ---
        K.rmsnorm(x, h, L.post_norm, N, H, c.eps);
        trace_point(trace, l, "post_attention_layernorm", x, {B, T, H});
        if (c.moe) {
            moe(K, ws.mlp_out.data(), x, L, c, T, ws, trace, l);
        } else {
            ffn(K, ws.mlp_out.data(), x, L.ffn, N, H, I, ws, trace, l, B, T);
            trace_point(trace, l, "mlp.down_proj", ws.mlp_out.data(), {B, T, H});
        }
        add(h, h, ws.mlp_out.data(), size_t(N) * H);
        trace_point(trace, l, "", h, {B, T, H});
    }
    K.rmsnorm(x, h, m.final_norm, N, H, c.eps);
    trace_point(trace, -1, "model.norm", x, {B, T, H});
    K.linear(logits, x, m.head(), N, H, c.vocab);
    trace_point(trace, -1, "lm_head", logits, {B, T, c.vocab});
}

}  // namespace CELERINFER_NS
