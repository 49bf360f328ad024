// One function per op, float32, plain loops: the readable kernels (ReadableKernels in
// readable.hpp) and the ops every kernel set shares (embedding, RoPE, router softmax, top-k).
// Each writes a caller-owned output buffer and allocates nothing. Rows are tokens: a [rows, n]
// buffer is `rows` contiguous vectors of n.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "check.hpp"

namespace CELERINFER_NS {

// Sum of a[i] * b[i]. Sixteen independent partial sums in a fixed order: every compiler
// vectorizes it without reassociation flags, and gives the same bits (cppyy and g++ alike).
inline float dot(const float* a, const float* b, int n) {
    constexpr int W = 16;
    float acc[W] = {0};
    int i = 0;
    for (; i + W <= n; i += W)
        for (int j = 0; j < W; ++j) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
    float sum = 0.0f;
    for (int j = 0; j < W; ++j) sum += acc[j];
    return sum;
}

// y[r, o] = sum_i x[r, i] * W[o, i]   (nn.Linear without bias; W is [out, in])
inline void linear(float* y, const float* x, const float* W, int rows, int in, int out) {
    for (int r = 0; r < rows; ++r)
        for (int o = 0; o < out; ++o)
            y[size_t(r) * out + o] = dot(x + size_t(r) * in, W + size_t(o) * in, in);
}

// y = weight * x / sqrt(mean(x^2) + eps), over each row of n
inline void rmsnorm(float* y, const float* x, const float* weight, int rows, int n, float eps) {
    for (int r = 0; r < rows; ++r) {
        const float* xr = x + size_t(r) * n;
        float* yr = y + size_t(r) * n;
        const float inv_rms = 1.0f / std::sqrt(dot(xr, xr, n) / float(n) + eps);
        for (int i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
    }
}

inline void embed(float* h, const int64_t* ids, const float* table, int tokens, int vocab, int hidden) {
    for (int t = 0; t < tokens; ++t) {
        CI_CHECK(ids[t] >= 0 && ids[t] < vocab, "token id ", ids[t], " at position ", t, " is outside the vocabulary [0, ", vocab, ")");
        const float* row = table + size_t(ids[t]) * hidden;
        for (int i = 0; i < hidden; ++i) h[size_t(t) * hidden + i] = row[i];
    }
}

// Rotate x [B, S, n_heads, hd] in place: new token s sits at position start + s. cos/sin rows
// [max_pos, hd] hold frequency i at columns i and i + hd/2. Half-split pairs (i, i + hd/2);
// interleaved pairs (2i, 2i+1).
inline void rope(float* x, const float* cos, const float* sin, int B, int S, int start, int n_heads, int hd,
                 bool interleaved) {
    const int half = hd / 2;
    for (int b = 0; b < B; ++b)
        for (int s = 0; s < S; ++s) {
            const float* c = cos + size_t(start + s) * hd;
            const float* sn = sin + size_t(start + s) * hd;
            for (int h = 0; h < n_heads; ++h) {
                float* v = x + ((size_t(b) * S + s) * n_heads + h) * hd;
                for (int i = 0; i < half; ++i) {
                    const int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
                    const float x0 = v[i0], x1 = v[i1];
                    v[i0] = x0 * c[i] - x1 * sn[i];
                    v[i1] = x1 * c[i] + x0 * sn[i];
                }
            }
        }
}

// The shape of one attention call: S new queries at positions P - S ... P - 1 attend to P keys,
// read from a KV cache laid out [B, max_len, kv_heads, hd] (prefill: P == S == max_len).
struct AttnDims {
    int B, S, P, max_len, heads, kv_heads, hd;
    int n_rep() const { return heads / kv_heads; }
    int start() const { return P - S; }
};

// One of several linears that read the same input (forward.hpp's linears): y[rows, out] = x . W^T.
struct LinearOut {
    float* y;
    const float* W;
    int out;
};

// The kv head that query head h reads: h / (heads / kv_heads), MiniMind's repeat_kv layout.
inline int kv_head(int h, const AttnDims& d) { return h / d.n_rep(); }

// scores[b, h, i, j] = q_i . k_j / sqrt(hd), -inf for keys after the query (causal), then -1e9
// added where key j is padding (MiniMind's additive mask: a row whose every key is masked stays
// finite). Query head h reads kv head h / (heads / kv_heads). mask is [B, P].
inline void attention_scores(float* scores, const float* q, const float* k_cache, const int64_t* mask, const AttnDims& d) {
    const float scale = float(std::sqrt(double(d.hd)));
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int b = 0; b < d.B; ++b)
        for (int h = 0; h < d.heads; ++h)
            for (int i = 0; i < d.S; ++i) {
                float* row = scores + ((size_t(b) * d.heads + h) * d.S + i) * d.P;
                const float* qi = q + ((size_t(b) * d.S + i) * d.heads + h) * d.hd;
                for (int j = 0; j < d.P; ++j) {
                    const float* kj = k_cache + ((size_t(b) * d.max_len + j) * d.kv_heads + kv_head(h, d)) * d.hd;
                    float s = dot(qi, kj, d.hd) / scale;
                    if (j > d.start() + i) s += neg_inf;
                    if (mask[size_t(b) * d.P + j] == 0) s += -1e9f;
                    row[j] = s;
                }
            }
}

// In-place softmax over each row of n.
inline void softmax(float* x, int rows, int n) {
    for (int r = 0; r < rows; ++r) {
        float* v = x + size_t(r) * n;
        float max = v[0];
        for (int j = 1; j < n; ++j) max = v[j] > max ? v[j] : max;
        float sum = 0.0f;
        for (int j = 0; j < n; ++j) {
            v[j] = std::exp(v[j] - max);
            sum += v[j];
        }
        for (int j = 0; j < n; ++j) v[j] /= sum;
    }
}

// context[b, i, h, :] = sum_j probs[b, h, i, j] * v[b, j, h / n_rep, :]
inline void attention_context(float* context, const float* probs, const float* v_cache, const AttnDims& d) {
    for (int b = 0; b < d.B; ++b)
        for (int i = 0; i < d.S; ++i)
            for (int h = 0; h < d.heads; ++h) {
                float* out = context + ((size_t(b) * d.S + i) * d.heads + h) * d.hd;
                const float* p = probs + ((size_t(b) * d.heads + h) * d.S + i) * d.P;
                for (int e = 0; e < d.hd; ++e) out[e] = 0.0f;
                for (int j = 0; j < d.P; ++j) {
                    const float* vj = v_cache + ((size_t(b) * d.max_len + j) * d.kv_heads + kv_head(h, d)) * d.hd;
                    for (int e = 0; e < d.hd; ++e) out[e] += p[j] * vj[e];
                }
            }
}

// Write the new tokens' keys or values [B, S, kv_dim] into the cache [B, max_len, kv_dim] at their positions.
inline void cache_store(float* cache, const float* fresh, const AttnDims& d) {
    const size_t row = size_t(d.kv_heads) * d.hd;
    for (int b = 0; b < d.B; ++b)
        for (int i = 0; i < d.S; ++i) {
            const float* src = fresh + (size_t(b) * d.S + i) * row;
            float* dst = cache + (size_t(b) * d.max_len + d.start() + i) * row;
            for (size_t e = 0; e < row; ++e) dst[e] = src[e];
        }
}

// x rounded to bfloat16 (round to nearest, ties to even) and widened back, in place: what a bf16
// KV cache holds. NaN stays NaN (quiet), infinity stays infinity; a finite value past bf16's
// largest rounds to infinity, as RNE does.
inline void round_to_bf16(float* x, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, &x[i], sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u) u = (u | 0x00400000u) & 0xffff0000u;  // NaN: keep it a NaN
        else u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        std::memcpy(&x[i], &u, sizeof u);
    }
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// act = silu(gate) * up, elementwise: SwiGLU's activation (mlp() in forward.hpp is the whole feed-forward)
inline void swiglu(float* act, const float* gate, const float* up, size_t n) {
    for (size_t i = 0; i < n; ++i) act[i] = silu(gate[i]) * up[i];
}

// y = x + delta, elementwise (the residual connection)
inline void add(float* y, const float* x, const float* delta, size_t n) {
    for (size_t i = 0; i < n; ++i) y[i] = x[i] + delta[i];
}

// The k largest of each row of probs [rows, n], by descending value (ties: lower index first);
// weights renormalised to sum 1 when asked (MiniMind adds 1e-20 to the sum).
inline void topk(int64_t* idx, float* weight, const float* probs, int rows, int n, int k, bool renormalise) {
    for (int r = 0; r < rows; ++r) {
        const float* p = probs + size_t(r) * n;
        int64_t* ri = idx + size_t(r) * k;
        float* rw = weight + size_t(r) * k;
        for (int slot = 0; slot < k; ++slot) {
            int best = -1;
            for (int e = 0; e < n; ++e) {
                bool taken = false;
                for (int s = 0; s < slot; ++s) taken = taken || ri[s] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ri[slot] = best;
            rw[slot] = p[best];
        }
        if (renormalise) {
            float sum = 0.0f;
            for (int s = 0; s < k; ++s) sum += rw[s];
            for (int s = 0; s < k; ++s) rw[s] /= (sum + 1e-20f);
        }
    }
}

}  // namespace CELERINFER_NS
