// The readable kernel set: the plain loops of ops.hpp, the baseline anyone can check by eye.
//
// A kernel set is a struct with the members below; forward_tokens (forward.hpp) is written once
// over any of them, and kernel_set.hpp registers each by name. To write your own, derive from
// ReadableKernels, redefine the ops you change, and register it (README: "Your own kernel set").
#pragma once
#include <cstddef>
#include <cstdint>

#include "model.hpp"
#include "ops.hpp"
#include "trace.hpp"
#include "workspace.hpp"

namespace CELERINFER_NS {

struct ReadableKernels {
    // The weights it reads: F32, the float32 (decoding of) every weight. A set for stored weights
    // (reduced.hpp) says BF16 or Q8 and takes each one's stored form in prepare_linear(W, out, in, stored).
    static constexpr WeightFormat weight_format = WeightFormat::F32;

    // Called once per nn.Linear weight before any forward (a set may pack it); nothing to do here.
    void prepare_linear(const float* /*W*/, int /*out*/, int /*in*/) {}

    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        CELERINFER_NS::linear(y, x, W, rows, in, out);
    }
    void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const {
        CELERINFER_NS::rmsnorm(y, x, w, rows, n, eps);
    }
    void swiglu(float* act, const float* gate, const float* up, size_t n) const { CELERINFER_NS::swiglu(act, gate, up, n); }

    // The new tokens' keys and values [B, S, kv_dim] into layer's KV cache, at positions start ... P-1.
    void store_kv(int layer, const float* k, const float* v, const AttnDims& d, Workspace& ws) const {
        cache_store(ws.layer_k(layer), k, d);
        cache_store(ws.layer_v(layer), v, d);
    }
    // context [B, S, heads*hd] for queries q [B, S, heads, hd] over the layer's cached keys: scores,
    // softmax and context in three passes, each observed through the taps.
    void attention(float* context, const float* q, int layer, const int64_t* mask, const AttnDims& d, Workspace& ws,
                   const AttentionTaps& taps) const {
        float* scores = ws.scores.data();
        const size_t rows = size_t(d.B) * d.heads * d.S;
        attention_scores(scores, q, ws.layer_k(layer), mask, d);
        for (size_t r = 0; r < rows; ++r) taps.scores_row(r, scores + r * d.P, d.P, d.P);
        softmax(scores, int(rows), d.P);
        for (size_t r = 0; r < rows; ++r) taps.probs_row(r, scores + r * d.P, d.P, d.P);
        attention_context(context, scores, ws.layer_v(layer), d);
    }
};

}  // namespace CELERINFER_NS
