// The forward pass, top to bottom, one op per line, in trace order, written once over any kernel
// set (readable.hpp, fast.hpp, or your own: see kernel_set.hpp). Each op is followed by its
// trace_point: the Point names the output, and its shape comes from trace_points.hpp.
#pragma once
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"
#include "workspace.hpp"

namespace CELERINFER_NS {

// Does kernel set K run several linears of one input as one job (a linears(x, rows, in, outs, n))?
template <class K, class = void>
struct fuses_linears : std::false_type {};
template <class K>
struct fuses_linears<K, std::void_t<decltype(std::declval<const K&>().linears(
                            static_cast<const float*>(nullptr), 0, 0, static_cast<const LinearOut*>(nullptr), 0))>>
    : std::true_type {};

// y = x . W^T for each of outs (they share x): one K.linear each, or the kernel set's linears when it
// has one (the fast sets: one thread-pool job for q, k and v at decode, not three; the same sums).
template <class Kernels>
inline void linears(const Kernels& K, const float* x, int rows, int in, const LinearOut* outs, int n) {
    if constexpr (fuses_linears<Kernels>::value) {
        K.linears(x, rows, in, outs, n);
    } else {
        for (int i = 0; i < n; ++i) K.linear(outs[i].y, x, outs[i].W, rows, in, outs[i].out);
    }
}
template <class Kernels>
inline void linears(const Kernels& K, const float* x, int rows, int in, std::initializer_list<LinearOut> outs) {
    linears(K, x, rows, in, outs.begin(), int(outs.size()));
}

// The whole feed-forward, y = down(swiglu(gate(x), up(x))), for `rows` rows; traces gate/up/act
// under `layer` when given a sink (experts are not traced one by one).
template <class Kernels>
inline void mlp(const Kernels& K, float* y, const float* x, const FFNWeights& w, int rows, int H, int I, Workspace& ws,
                TraceSink* trace, int layer, const TraceDims& dims) {
    linears(K, x, rows, H, {{ws.gate.data(), w.gate, I},
                            {ws.up.data(), w.up, I}});
    trace_point(trace, layer, Point::gate_proj, ws.gate.data(), dims);
    trace_point(trace, layer, Point::up_proj, ws.up.data(), dims);
    K.swiglu(ws.act.data(), ws.gate.data(), ws.up.data(), size_t(rows) * I);
    trace_point(trace, layer, Point::act, ws.act.data(), dims);
    K.linear(y, ws.act.data(), w.down, rows, I, H);
}

// Mixture of experts: softmax router, top-k, experts summed in expert order, shared experts added.
template <class Kernels>
inline void moe(const Kernels& K, float* y, const float* x, const LayerWeights& L, const Config& c, Workspace& ws,
                TraceSink* trace, int layer, const TraceDims& dims) {
    const int N = int(dims.B * dims.S), H = c.hidden, E = c.experts, topk = c.topk, I = c.moe_intermediate;
    K.linear(ws.router_probs.data(), x, L.router, N, H, E);
    softmax(ws.router_probs.data(), N, E);
    trace_point(trace, layer, Point::router_probs, ws.router_probs.data(), dims);
    CELERINFER_NS::topk(ws.topk_idx.data(), ws.topk_weight.data(), ws.router_probs.data(), N, E, topk, c.renormalises_topk());
    if (trace && !trace->timing) {  // the trace holds floats: record the indices as floats, read back a teacher's
        for (int i = 0; i < N * topk; ++i) ws.topk_idx_f[i] = float(ws.topk_idx[i]);
        trace_point(trace, layer, Point::topk_idx, ws.topk_idx_f.data(), dims);
        for (int i = 0; i < N * topk; ++i) ws.topk_idx[i] = int64_t(ws.topk_idx_f[i]);
    } else {
        trace_point(trace, layer, Point::topk_idx, ws.topk_idx_f.data(), dims);  // a timing sink's stamp
    }
    trace_point(trace, layer, Point::topk_weight, ws.topk_weight.data(), dims);
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
        mlp(K, ws.expert_out.data(), ws.expert_in.data(), L.experts[e], n, H, I, ws, nullptr, layer, dims);
        for (int r = 0; r < n; ++r) {
            const int t = ws.expert_rows[r] / topk;
            const float w = ws.topk_weight[ws.expert_rows[r]];
            for (int i = 0; i < H; ++i) y[size_t(t) * H + i] += ws.expert_out[size_t(r) * H + i] * w;
        }
    }
    trace_point(trace, layer, Point::routed_experts, y, dims);
    for (size_t s = 0; s < L.shared_experts.size(); ++s) {  // MiniMind adds each in turn, weight 1
        mlp(K, ws.expert_out.data(), x, L.shared_experts[s], N, H, I, ws, nullptr, layer, dims);
        trace_point(trace, layer, Point::shared_expert, ws.expert_out.data(), dims, int(s));
        add(y, y, ws.expert_out.data(), size_t(N) * H);
    }
}

// The kernel set's attention, observed when tracing: its scores and probs rows are recorded (and
// replaced by a teacher's) through the taps; points the kernel does not observe stay out of the trace.
template <class Kernels>
inline void attention_traced(const Kernels& K, float* context, const float* q, int l, const int64_t* mask,
                             const AttnDims& d, Workspace& ws, TraceSink* trace, const TraceDims& dims) {
    AttentionTaps taps;
    if (!trace || trace->timing) return K.attention(context, q, l, mask, d, ws, taps);
    const size_t n = size_t(d.B) * d.heads * d.S * d.P;
    if (ws.trace_scores.size() < n) ws.trace_scores.resize(n);
    if (ws.trace_probs.size() < n) ws.trace_probs.resize(n);
    taps.scores = ws.trace_scores.data();
    taps.probs = ws.trace_probs.data();
    const std::string scores = point_name(Point::scores, l), probs = point_name(Point::probs, l);
    taps.scores_teacher = trace->teacher(scores, n);
    taps.probs_teacher = trace->teacher(probs, n);
    K.attention(context, q, l, mask, d, ws, taps);
    if (taps.wrote_scores) trace->record(scores, taps.scores, point_shape(Point::scores, dims));
    if (taps.wrote_probs) trace->record(probs, taps.probs, point_shape(Point::probs, dims));
}

// The logits rows a forward of S new tokens writes per sequence: logits_to_keep as MiniMind's
// forward takes it (0, or more than S: all S positions; L: the last L).
inline int kept_positions(int S, int logits_to_keep) {
    return logits_to_keep <= 0 || logits_to_keep > S ? S : logits_to_keep;
}

// lm_head over the last L of each sequence's S normed rows x [B * S, H] (L = S: all of them), into
// logits [B, L, vocab]. Fewer rows: generation asks only the last position's logits, and lm_head
// over every prompt position was ~12% of a minimind2-small prefill. The float32 sets compute each
// logit the same way whatever the row count, so theirs equal the full forward's bit for bit; the
// bf16/q8 sets take their GEMV for a few rows, which sums in another order (float32 rounding).
template <class Kernels>
inline void lm_head_kept(const Kernels& K, float* logits, float* x, const float* head, int B, int S, int L, int H,
                         int vocab) {
    if (L < S) {  // the kept rows moved together in place: each moves to a lower or the same row
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < L; ++i)
                std::memmove(x + (size_t(b) * L + i) * H, x + (size_t(b) * S + S - L + i) * H, sizeof(float) * H);
    }
    K.linear(logits, x, head, B * L, H, vocab);
}

// logits [B, L, vocab] for S new tokens input_ids [B, S] at positions start ... start + S - 1: every
// position's (L = S), or the last L = logits_to_keep's (kept_positions); mask [B, start + S] covers
// the cached keys and the new ones (1 = token, 0 = padding). The new keys and values join the
// workspace's KV cache.
template <class Kernels>
inline void forward_tokens(const ModelWeights& m, const Kernels& K, const int64_t* input_ids, const int64_t* mask, int S,
                           int start, Workspace& ws, float* logits, TraceSink* trace = nullptr, int logits_to_keep = 0) {
    const Config& c = m.config;
    const int B = ws.B, N = B * S, H = c.hidden, hd = c.head_dim;
    const int nh = c.heads, kvh = c.kv_heads, I = c.intermediate;
    CI_CHECK(S >= 1 && S <= ws.S, "forward: ", S, " new tokens, the workspace holds up to ", ws.S);
    CI_CHECK(start >= 0 && start + S <= ws.max_len, "forward: positions up to ", start + S,
             " exceed the workspace's KV cache of ", ws.max_len);
    const int L = kept_positions(S, logits_to_keep);
    const AttnDims attn_dims{B, S, start + S, ws.max_len, nh, kvh, hd};
    const TraceDims dims{B, S, start + S, c, L};
    float* h = ws.h.data();
    float* x = ws.x.data();

    embed(h, input_ids, m.embed, N, c.vocab, H);
    trace_point(trace, -1, Point::embed_tokens, h, dims);
    for (int l = 0; l < c.layers; ++l) {
        const LayerWeights& L = m.layers[l];
        // --- attention ---
        K.rmsnorm(x, h, L.input_norm, N, H, c.eps);
        trace_point(trace, l, Point::input_layernorm, x, dims);
        linears(K, x, N, H, {{ws.q.data(), L.wq, c.q_dim()},  // q, k and v read the same x
                             {ws.k.data(), L.wk, c.kv_dim()},
                             {ws.v.data(), L.wv, c.kv_dim()}});
        trace_point(trace, l, Point::q_proj, ws.q.data(), dims);
        trace_point(trace, l, Point::k_proj, ws.k.data(), dims);
        trace_point(trace, l, Point::v_proj, ws.v.data(), dims);
        if (c.qk_norm) {
            K.rmsnorm(ws.q.data(), ws.q.data(), L.q_norm, N * nh, hd, c.eps);
            trace_point(trace, l, Point::q_norm, ws.q.data(), dims);
            K.rmsnorm(ws.k.data(), ws.k.data(), L.k_norm, N * kvh, hd, c.eps);
            trace_point(trace, l, Point::k_norm, ws.k.data(), dims);
        }
        rope(ws.q.data(), m.rope_cos, m.rope_sin, B, S, start, nh, hd, c.rope_interleaved);
        trace_point(trace, l, Point::rope_q, ws.q.data(), dims);
        rope(ws.k.data(), m.rope_cos, m.rope_sin, B, S, start, kvh, hd, c.rope_interleaved);
        trace_point(trace, l, Point::rope_k, ws.k.data(), dims);
        if (ws.kv_format == KVFormat::BF16) {  // a bf16 cache: the new keys and values rounded as they join it
            round_to_bf16(ws.k.data(), size_t(N) * c.kv_dim());
            trace_point(trace, l, Point::k_cached, ws.k.data(), dims);
            round_to_bf16(ws.v.data(), size_t(N) * c.kv_dim());
            trace_point(trace, l, Point::v_cached, ws.v.data(), dims);
        }
        K.store_kv(l, ws.k.data(), ws.v.data(), attn_dims, ws);
        attention_traced(K, ws.context.data(), ws.q.data(), l, mask, attn_dims, ws, trace, dims);
        trace_point(trace, l, Point::context, ws.context.data(), dims);
        K.linear(ws.attn_out.data(), ws.context.data(), L.wo, N, c.q_dim(), H);
        trace_point(trace, l, Point::o_proj, ws.attn_out.data(), dims);
        add(h, h, ws.attn_out.data(), size_t(N) * H);
        trace_point(trace, l, Point::attn_residual, h, dims);
        // --- feed-forward ---
        K.rmsnorm(x, h, L.post_norm, N, H, c.eps);
        trace_point(trace, l, Point::post_attention_layernorm, x, dims);
        if (c.moe) {
            moe(K, ws.mlp_out.data(), x, L, c, ws, trace, l, dims);
        } else {
            mlp(K, ws.mlp_out.data(), x, L.ffn, N, H, I, ws, trace, l, dims);
            trace_point(trace, l, Point::down_proj, ws.mlp_out.data(), dims);
        }
        add(h, h, ws.mlp_out.data(), size_t(N) * H);
        trace_point(trace, l, Point::block, h, dims);
    }
    K.rmsnorm(x, h, m.final_norm, N, H, c.eps);
    trace_point(trace, -1, Point::norm, x, dims);
    lm_head_kept(K, logits, x, m.head(), B, S, L, H, c.vocab);
    trace_point(trace, -1, Point::lm_head, logits, dims);
}

}  // namespace CELERINFER_NS
