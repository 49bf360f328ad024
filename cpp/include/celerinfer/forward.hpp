// The forward pass, top to bottom, one op per line, in trace order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "check.hpp"
#include "fast.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"

namespace CELERINFER_NS {

// Every buffer the forward needs, allocated once up front: up to T new tokens per call for a
// batch of B, and a KV cache of max_len positions (prefill alone: max_len == T).
struct Workspace {
    int B, T, max_len;
    int layers = 0;
    size_t kv_dim = 0;
    std::vector<float> h, x, q, k, v, scores, context, attn_out, gate, up, act, mlp_out;
    std::vector<float> k_cache, v_cache;  // [layers][B][max_len][kv_dim]
    int kt_stride = 0;                    // max_len rounded up to 16
    std::vector<float> kt_cache;          // fast kernels: keys transposed, [layers][B][kv_heads][hd][kt_stride]
    std::vector<float> attn_scratch;      // fast attention: a [T][kt_stride] score tile per thread
    std::vector<float> router_probs, topk_weight, topk_idx_f;  // MoE only
    std::vector<int64_t> topk_idx;
    std::vector<float> expert_in, expert_out;  // MoE: the rows routed to one expert
    std::vector<int> expert_rows;

    Workspace(const Config& c, int B_, int T_, int max_len_ = 0) : B(B_), T(T_), max_len(max_len_ ? max_len_ : T_) {
        CI_CHECK(B > 0 && T > 0, "workspace: batch and sequence length must be >= 1");
        CI_CHECK(max_len >= T, "workspace: max_len ", max_len, " is shorter than T ", T);
        CI_CHECK(max_len <= c.max_pos, "sequence length ", max_len, " is longer than max_position_embeddings ", c.max_pos);
        const size_t N = size_t(B) * T, H = c.hidden;
        layers = c.layers;
        kv_dim = c.kv_dim();
        h.resize(N * H); x.resize(N * H); attn_out.resize(N * H); mlp_out.resize(N * H);
        q.resize(N * c.q_dim()); k.resize(N * kv_dim); v.resize(N * kv_dim);
        context.resize(N * c.q_dim());
        scores.resize(size_t(B) * c.heads * T * max_len);
        k_cache.resize(size_t(layers) * B * max_len * kv_dim);
        v_cache.resize(k_cache.size());
        kt_stride = (max_len + 15) / 16 * 16;
        kt_cache.resize(size_t(layers) * B * kv_dim * kt_stride);
        const size_t I = c.moe ? c.moe_intermediate : c.intermediate;
        gate.resize(N * I); up.resize(N * I); act.resize(N * I);
        if (c.moe) {
            router_probs.resize(N * c.experts);
            topk_weight.resize(N * c.topk); topk_idx.resize(N * c.topk); topk_idx_f.resize(N * c.topk);
            expert_in.resize(N * H); expert_out.resize(N * H); expert_rows.resize(N);
        }
    }
    float* layer_k(int l) { return k_cache.data() + size_t(l) * B * max_len * kv_dim; }
    float* layer_v(int l) { return v_cache.data() + size_t(l) * B * max_len * kv_dim; }
    float* layer_kt(int l) { return kt_cache.data() + size_t(l) * B * kv_dim * kt_stride; }
};

// The readable kernels: the plain loops of ops.hpp.
struct ReadableKernels {
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        CELERINFER_NS::linear(y, x, W, rows, in, out);
    }
    void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const {
        CELERINFER_NS::rmsnorm(y, x, w, rows, n, eps);
    }
    void swiglu(float* act, const float* gate, const float* up, size_t n) const { CELERINFER_NS::swiglu(act, gate, up, n); }
    // Attention when no trace is taken: the same three steps as the traced path.
    void attention(float* context, const float* q, int layer, const int64_t* mask, const AttnDims& d,
                   Workspace& ws) const {
        attention_scores(ws.scores.data(), q, ws.layer_k(layer), mask, d);
        softmax(ws.scores.data(), d.B * d.heads * d.T, d.P);
        attention_context(context, ws.scores.data(), ws.layer_v(layer), d);
    }
    void store_keys(const float*, int, const AttnDims&, Workspace&) const {}
};

// Every linear weight of a model, packed once for the fast GEMM.
struct FastWeights {
    std::unordered_map<const float*, PackedMatrix> packed;
    explicit FastWeights(const Model& m) {
        const Config& c = m.config;
        auto add = [&](const float* W, int out, int in) { if (W && !packed.count(W)) packed[W] = pack(W, out, in); };
        auto add_ffn = [&](const FFNWeights& f, int inter) {
            add(f.gate, inter, c.hidden); add(f.up, inter, c.hidden); add(f.down, c.hidden, inter);
        };
        for (const LayerWeights& L : m.layers) {
            add(L.wq, c.q_dim(), c.hidden); add(L.wk, c.kv_dim(), c.hidden); add(L.wv, c.kv_dim(), c.hidden);
            add(L.wo, c.hidden, c.q_dim());
            if (c.moe) {
                add(L.router, c.experts, c.hidden);
                for (const FFNWeights& e : L.experts) add_ffn(e, c.moe_intermediate);
                for (const FFNWeights& e : L.shared_experts) add_ffn(e, c.moe_intermediate);
            } else {
                add_ffn(L.ffn, c.intermediate);
            }
        }
        add(m.head(), c.vocab, c.hidden);
    }
    const PackedMatrix& at(const float* W) const {
        auto it = packed.find(W);
        CI_CHECK(it != packed.end(), "fast kernels: a weight was not packed (was the model rebound after packing?)");
        return it->second;
    }
};

// The fast kernels of fast.hpp: packed, vectorized, threaded.
struct FastKernels {
    const FastWeights& weights;
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        const PackedMatrix& P = weights.at(W);
        CI_CHECK(P.in == in && P.out == out, "fast kernels: packed shape mismatch");
        gemm(y, x, P, rows);
    }
    void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const {
        rmsnorm_fast(y, x, w, rows, n, eps);
    }
    void swiglu(float* act, const float* gate, const float* up, size_t n) const { swiglu_fast(act, gate, up, n); }
    void attention(float* context, const float* q, int layer, const int64_t* mask, const AttnDims& d,
                   Workspace& ws) const {
        // One score tile per thread: set_num_threads() may have raised the count since the
        // workspace was made.
        const size_t need = size_t(num_threads()) * (size_t(d.T) * ws.kt_stride + size_t(d.hd) * 16);
        if (ws.attn_scratch.size() < need) ws.attn_scratch.resize(need);
        attention_fused(context, q, ws.layer_kt(layer), ws.kt_stride, ws.layer_v(layer), mask, d, ws.attn_scratch.data());
    }
    // The fast attention reads keys transposed; keep that copy of the cache too.
    void store_keys(const float* k, int layer, const AttnDims& d, Workspace& ws) const {
        cache_store_transposed(ws.layer_kt(layer), ws.kt_stride, k, d);
    }
};

// y = down(silu(gate(x)) * up(x)) for `rows` rows; traces gate/up/act under `layer` when given.
template <class Kernels>
inline void ffn(const Kernels& K, float* y, const float* x, const FFNWeights& w, int rows, int H, int I, Workspace& ws,
                TraceSink* trace = nullptr, int layer = -1, int B = 0, int T = 0) {
    const float *w_gate = w.gate, *w_up = w.up;
#ifdef CELERINFER_FAULT_GATE_UP_SWAPPED
    std::swap(w_gate, w_up);
#endif
    K.linear(ws.gate.data(), x, w_gate, rows, H, I);
    trace_point(trace, layer, "mlp.gate_proj", ws.gate.data(), {B, T, I});
    K.linear(ws.up.data(), x, w_up, rows, H, I);
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
        trace_point(trace, layer, "mlp.shared_experts." + std::to_string(s), ws.expert_out.data(), {B, T, H});
        add(y, y, ws.expert_out.data(), size_t(N) * H);
    }
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
#ifndef CELERINFER_FAULT_QK_NORM_SKIPPED
            K.rmsnorm(ws.q.data(), ws.q.data(), L.q_norm, N * nh, hd, c.eps);
#endif
            trace_point(trace, l, "self_attn.q_norm", ws.q.data(), {B, T, nh, hd});
            K.rmsnorm(ws.k.data(), ws.k.data(), L.k_norm, N * kvh, hd, c.eps);
            trace_point(trace, l, "self_attn.k_norm", ws.k.data(), {B, T, kvh, hd});
        }
        rope_at(ws.q.data(), m.rope_cos, m.rope_sin, B, T, start, nh, hd, c.rope_interleaved);
        trace_point(trace, l, "self_attn.rope_q", ws.q.data(), {B, T, nh, hd});
        rope_at(ws.k.data(), m.rope_cos, m.rope_sin, B, T, start, kvh, hd, c.rope_interleaved);
        trace_point(trace, l, "self_attn.rope_k", ws.k.data(), {B, T, kvh, hd});
        cache_store(ws.layer_k(l), ws.k.data(), dims);
        cache_store(ws.layer_v(l), ws.v.data(), dims);
        K.store_keys(ws.k.data(), l, dims, ws);
        if (trace) {  // unfused, so every step can be recorded (and replaced by a teacher)
            attention_scores(ws.scores.data(), ws.q.data(), ws.layer_k(l), mask, dims);
            trace_point(trace, l, "self_attn.scores", ws.scores.data(), {B, nh, T, dims.P});
            softmax(ws.scores.data(), B * nh * T, dims.P);
            trace_point(trace, l, "self_attn.probs", ws.scores.data(), {B, nh, T, dims.P});
            attention_context(ws.context.data(), ws.scores.data(), ws.layer_v(l), dims);
        } else {
            K.attention(ws.context.data(), ws.q.data(), l, mask, dims, ws);
        }
        trace_point(trace, l, "self_attn.context", ws.context.data(), {B, T, c.q_dim()});
        K.linear(ws.attn_out.data(), ws.context.data(), L.wo, N, c.q_dim(), H);
        trace_point(trace, l, "self_attn.o_proj", ws.attn_out.data(), {B, T, H});
#ifdef CELERINFER_FAULT_RESIDUAL_MISSING
        std::copy(ws.attn_out.begin(), ws.attn_out.begin() + size_t(N) * H, ws.h.begin());
#else
        add(h, h, ws.attn_out.data(), size_t(N) * H);
#endif
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
#ifndef CELERINFER_FAULT_OUTPUT_NEVER_WRITTEN
    K.linear(logits, x, m.head(), N, H, c.vocab);
#endif
    trace_point(trace, -1, "lm_head", logits, {B, T, c.vocab});
}

// The whole sequence at once with the readable kernels: input_ids / mask [B, ws.T].
inline void forward(const Model& m, const int64_t* input_ids, const int64_t* mask, Workspace& ws, float* logits,
                    TraceSink* trace = nullptr) {
    forward_tokens(m, ReadableKernels{}, input_ids, mask, ws.T, 0, ws, logits, trace);
}

// Entry points for Python (cppyy instantiates no templates from a call with a kernel choice).
inline void forward_readable(const Model& m, const int64_t* ids, const int64_t* mask, int T, int start,
                             Workspace& ws, float* logits, TraceSink* trace) {
    forward_tokens(m, ReadableKernels{}, ids, mask, T, start, ws, logits, trace);
}
inline void forward_fast(const Model& m, const FastWeights& fw, const int64_t* ids, const int64_t* mask, int T,
                         int start, Workspace& ws, float* logits, TraceSink* trace) {
    forward_tokens(m, FastKernels{fw}, ids, mask, T, start, ws, logits, trace);
}

}  // namespace CELERINFER_NS
