// The fast kernel set: the same ops as readable.hpp, built for speed on a CPU with wide SIMD.
// The functions mirror the readable names (ops.hpp) inside namespace fast.
//
// * ThreadPool (threadpool.hpp): persistent workers shared by every loaded version.
// * Packed weights (packing.hpp): each nn.Linear matrix [out, in] is repacked once into panels of
//   16 outputs, k-major ([panel][k][16]), so the GEMM micro-kernel streams three contiguous panels
//   and broadcasts activations: 8 token rows x 48 outputs = 24 vector accumulators, no reductions.
// * linears: the linears of one input (q, k, v; gate, up) as one thread-pool job at decode, where
//   separate calls woke the pool once per matrix, for little work each (k_proj, v_proj).
// * vexp: a vectorized exp (Cephes-style range reduction + degree-6 polynomial, ~1 ulp) for SiLU
//   and softmax, where std::exp per element would cost more than the matrix products.
// * Fused attention: scores, softmax and context over only the causal keys, in blocked passes over a
//   per-thread score tile: per (batch, head) for prefill, per (batch, kv head) with the query heads
//   that share it together for decode (see fast::attention); traced runs observe its rows through
//   the taps, so the trace sees the kernel that runs.
// Vector code uses GCC/Clang vector extensions: the same source compiles under cling (cppyy) and
// g++, at the width -march=native gives.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "check.hpp"
#include "model.hpp"
#include "ops.hpp"
#include "packing.hpp"
#include "threadpool.hpp"
#include "trace.hpp"
#include "workspace.hpp"

namespace CELERINFER_NS {

using ::celerinfer_runtime::ThreadPool;

inline void set_num_threads(int n) { ThreadPool::instance().set_threads(n); }
inline int num_threads() { return ThreadPool::instance().threads(); }

namespace fast {

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

// Vector helpers are forced inline: a 512-bit vector passed to an out-of-line call goes through
// the stack, which costs more than the work (seen under cling's -O2).
#define CI_VINLINE inline __attribute__((always_inline))
// Unroll the next (small, fixed) loop fully: g++ at -O2, the level cling forces, left such loops over
// accumulator arrays rolled, with the accumulators on the stack (measured 1.5-3x slower). Clang reads
// the same pragma.
#define CI_UNROLL _Pragma("GCC unroll 16")

CI_VINLINE vf16 vload(const float* p) { vf16 v; std::memcpy(&v, p, sizeof v); return v; }
CI_VINLINE void vstore(float* p, vf16 v) { std::memcpy(p, &v, sizeof v); }
CI_VINLINE vf16 vsplat(float x) { return vf16{} + x; }
CI_VINLINE float vsum(vf16 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}

// A value the optimizer may not fold into the code that uses it. Under cling (cppyy), folding a
// constant into a vector loop (a splat 1.0f, a negation) made that loop 3x slower — measured on
// the SiLU loop: 3.8 us against 1.3 us for 2,560 values; g++ is unaffected.
CI_VINLINE vf16 opaque(vf16 v) {
    __asm__("" : "+v"(v));
    return v;
}

// Lane-wise mask ? a : b (mask lanes are all ones or all zeros, as comparisons return).
CI_VINLINE vf16 vselect(vi16 mask, vf16 a, vf16 b) { return (vf16)(((vi16)a & mask) | ((vi16)b & ~mask)); }

// exp(x) for 16 lanes; inputs below -86 give 0 (so no step ever makes a denormal, which costs
// a microcode assist per lane), above 88.7 give +inf, NaN stays NaN.
CI_VINLINE vf16 vexp(vf16 x) {
    const vf16 hi = vsplat(88.7228391f), lo = vsplat(-86.0f);
    const vi16 too_big = x > hi, too_small = x < lo, nan = x != x;
    x = vselect(too_big, hi, vselect(too_small, lo, x));
    const vf16 t = x * 1.44269504088896341f + 0.5f;
    vf16 n = __builtin_convertvector(__builtin_convertvector(t, vi16), vf16);  // truncation ...
    n += __builtin_convertvector(n > t, vf16);                                // ... made floor
    vf16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf16 p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
    vf16 scale;
    std::memcpy(&scale, &e, sizeof scale);
    vf16 y = p * scale;
    y = vselect(too_big, vsplat(std::numeric_limits<float>::infinity()), y);
    y = vselect(too_small, vf16{}, y);
    return vselect(nan, vsplat(std::numeric_limits<float>::quiet_NaN()), y);
}


// ---- packed GEMM (the layout: packing.hpp) -------------------------------------------------------
// The register tile: kGemmRows token rows x 3 panels (48 outputs) = 24 vector accumulators, three
// FMAs per broadcast activation, 27 of the 32 AVX-512 registers. Eight rows, not six (the same sums
// per output, so the same bits): on an Intel Xeon, built by g++ -O3 (base_line_micro), prefill-shaped
// GEMMs went from 54% to 62% of the FMA peak on one thread (+5% on two); built by cling (cppyy) no
// change beyond the noise, 57-67% either way. Not kept: blocking k so a triple's slice stays in
// L1 (slower), software prefetch of the panels (no gain on top of eight rows).
constexpr int kGemmRows = 8;
constexpr int kGemmPanels = 3;  // panels of 16 outputs per register tile

// The panels of a tile when `left` are left: kGemmPanels, but the last four as 2 + 2 (a one-panel
// tile of 8 rows waits on its loads: 9 loads per 8 FMAs). The prefill attention's split; the GEMM
// keeps its fixed triples (panel_triples), which its task split and the fault catalogue count on.
inline int tile_panels(int left) { return left == 4 ? 2 : std::min(kGemmPanels, left); }

// The register tile of the GEMM and of the prefill attention's two products: acc[r][p] += the sum
// over k < k_len of x[r * x_row + k] * (the 16 floats at w + p * w_panel + k * w_step), k in order:
// each output is the same sum as a plain loop over k (the same bits).
template <int R, int NP>
CI_VINLINE void tile_accumulate(vf16 (&acc)[R][NP], const float* x, size_t x_row, const float* w, size_t w_panel,
                                size_t w_step, int k_len) {
    // Four k steps per loop trip: rolled, the loop's own add/compare/branch took FMA port slots
    // (an Intel Xeon, minimind2-small's 512-token prefill: its GEMMs 64-72% -> 74-80% of the FMA peak).
    _Pragma("GCC unroll 4")
    for (int k = 0; k < k_len; ++k) {
        vf16 wk[NP];
        CI_UNROLL
        for (int p = 0; p < NP; ++p) wk[p] = vload(w + p * w_panel + k * w_step);
        CI_UNROLL
        for (int r = 0; r < R; ++r) {
            const float xs = x[r * x_row + k];
            CI_UNROLL
            for (int p = 0; p < NP; ++p) acc[r][p] += wk[p] * xs;
        }
    }
}

// y[R rows, NP panels' outputs] = x[R rows, in] . w^T over NP (1 to 3) panels of w ([NP][in][16],
// k-major: a PackedMatrix's from `panel` on, or reduced.hpp's decoded copy of them).
template <int R, int NP>
inline void gemm_tile(float* y, const float* x, const float* w, int in, int out, int panel) {
    vf16 acc[R][NP];
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < NP; ++p) acc[r][p] = vf16{};
    tile_accumulate<R, NP>(acc, x, size_t(in), w, size_t(in) * 16, 16, in);
    for (int p = 0; p < NP; ++p) {
        const int o = (panel + p) * 16, valid = std::min(16, out - o);
        for (int r = 0; r < R; ++r) {
            if (valid == 16) {
                vstore(y + size_t(r) * out + o, acc[r][p]);
            } else {
                float tmp[16];
                vstore(tmp, acc[r][p]);
                std::memcpy(y + size_t(r) * out + o, tmp, sizeof(float) * valid);
            }
        }
    }
}

// The last n (< kGemmRows) rows: the tile of exactly n rows.
template <int NP, int R = kGemmRows - 1>
CI_VINLINE void gemm_row_tail(int n, float* y, const float* x, const float* w, int in, int out, int panel) {
    if constexpr (R > 0) {
        if (n == R) gemm_tile<R, NP>(y, x, w, in, out, panel);
        else gemm_row_tail<NP, R - 1>(n, y, x, w, in, out, panel);
    }
}

// y[rows, the NP panels' outputs] = x[rows, in] . w^T, kGemmRows rows at a time.
// A short tail (1 to 3 rows) after a whole tile is evened out with it instead (10 rows: 5 + 5, not
// 8 + 2): a tile of 3 rows or fewer has at most 9 FMA chains, too few to hide the FMA latency, and
// the tiny model's 10-row GEMMs spent a quarter of their time in the 2-row tail. Each output is the
// same sum over k either way: the same bits.
template <int NP>
inline void gemm_rows(float* y, const float* x, const float* w, int in, int out, int rows, int panel) {
    const int tail = rows % kGemmRows;
    const int whole_end = rows >= kGemmRows && tail > 0 && tail < 4 ? rows - kGemmRows - tail : rows - tail;
    int r = 0;
    for (; r < whole_end; r += kGemmRows)
        gemm_tile<kGemmRows, NP>(y + size_t(r) * out, x + size_t(r) * in, w, in, out, panel);
    const int rest = rows - r;  // 0 to 7 rows, or 9 to 11 (a tile and a short tail): two tiles
    const int first = rest < kGemmRows ? rest : rest - rest / 2;
    gemm_row_tail<NP>(first, y + size_t(r) * out, x + size_t(r) * in, w, in, out, panel);
    r += first;
    gemm_row_tail<NP>(rows - r, y + size_t(r) * out, x + size_t(r) * in, w, in, out, panel);
}

// y for `rows` rows over the np (1 to 3) panels of w from `panel` on (w: see gemm_tile).
inline void gemm_panels(float* y, const float* x, const float* w, int in, int out, int np, int rows, int panel) {
    if (np >= 3) gemm_rows<3>(y, x, w, in, out, rows, panel);
    else if (np == 2) gemm_rows<2>(y, x, w, in, out, rows, panel);
    else gemm_rows<1>(y, x, w, in, out, rows, panel);
}

// The panel triple of W from `panel` on (the last one maybe short), for `rows` rows.
inline void gemm_panels(float* y, const float* x, const PackedMatrix& W, int rows, int panel) {
    const float* w = W.data.data() + size_t(panel) * W.in * 16;
    gemm_panels(y, x, w, W.in, W.out, std::min(3, W.panels - panel), rows, panel);
}

// Is a linear job of `rows` rows over `weights` float32 weights worth the thread pool? Below these
// sizes a dispatch costs more than it saves; decode (few rows) is bound by streaming the weights,
// which two cores do faster than one from 128 KB on. Sharing the tiny default model's jobs too (its
// gate/up, down and attention: a few us each) made its forward 38 -> 31 us at some moments and
// 38 -> 61 us at others on this shared machine (half the processes one afternoon, the second vCPU
// held up by the host), so a job that small stays on the calling thread.
inline bool linear_worth_parallel(int rows, double weights) { return rows * weights > 2.0e5 || weights * 4 > 131072; }

// Task t of a job over several matrices taken in turn, matrix i cut into tasks(i) tasks: the matrix it
// falls in and the task within it (part and first carry the previous answer: tasks come in order).
template <class Tasks>
CI_VINLINE int task_in_part(int t, int& part, int& first, Tasks tasks) {
    while (t - first >= tasks(part)) first += tasks(part), ++part;
    return t - first;
}

// From this many rows on, a linear with few panel triples is also cut into row chunks.
constexpr int kRowChunkRows = 48;

// The tasks of a packed matrix's GEMM: its panels three at a time, the last triple maybe short.
inline int panel_triples(const PackedMatrix& W) { return (W.panels + 2) / 3; }

// y[rows, out] = x[rows, in] . W^T, three panels at a time (gemm_tile). Work is split over the
// thread pool by panel triples and, when there are few triples (k_proj, o_proj ...), by row chunks
// too, so both cores get equal shares.
inline void linear(float* y, const float* x, const PackedMatrix& W, int rows) {
    const int triples = panel_triples(W);
    const int row_chunks = (triples < 16 && rows >= kRowChunkRows) ? 4 : 1;
    const bool parallel = linear_worth_parallel(rows, double(W.in) * W.out);
    ThreadPool::instance().parallel_for(triples * row_chunks, [&](int begin, int end, int) {
        for (int task = begin; task < end; ++task) {
            const int t = task / row_chunks, chunk = task % row_chunks;
            const int r0 = int(int64_t(rows) * chunk / row_chunks) / kGemmRows * kGemmRows;
            const int r1 = chunk + 1 == row_chunks ? rows : int(int64_t(rows) * (chunk + 1) / row_chunks) / kGemmRows * kGemmRows;
            if (r1 <= r0) continue;
            float* yc = y + size_t(r0) * W.out;
            const float* xc = x + size_t(r0) * W.in;
            gemm_panels(yc, xc, W, r1 - r0, 3 * t);
        }
    }, parallel);
}

// Linears of one input x with few rows (decode), as one job: the panel triples of every matrix in
// one parallel_for, each computed as fast::linear computes it (so the outputs are bitwise the same),
// where separate calls woke the pool once per matrix (q, k, v: three times per layer).
constexpr int kFusedRows = 4;  // up to here a step's linears are a few dispatches of little work each

inline void linears(const float* x, int rows, const LinearOut* outs, const PackedMatrix* const* Ws, int n) {
    const auto triples = [&](int i) { return panel_triples(*Ws[i]); };
    int tasks = 0;
    double weights = 0.0;
    for (int i = 0; i < n; ++i) tasks += triples(i), weights += double(Ws[i]->in) * Ws[i]->out;
    ThreadPool::instance().parallel_for(tasks, [&](int begin, int end, int) {
        int i = 0, first = 0;
        for (int task = begin; task < end; ++task) {
            const int panel = 3 * task_in_part(task, i, first, triples);  // moves i on: before reading outs[i]
            gemm_panels(outs[i].y, x, *Ws[i], rows, panel);
        }
    }, linear_worth_parallel(rows, weights));  // fast::linear's rule, on the sum
}

// ---- vectorized elementwise ops -----------------------------------------------------------------
inline void swiglu(float* act, const float* gate, const float* up, size_t n) {
    const size_t blocks = n / 16;
    ThreadPool::instance().parallel_for(int(blocks), [&](int begin, int end, int) {
        const vf16 one = opaque(vsplat(1.0f)), zero = opaque(vf16{});  // see opaque()
        for (size_t i = size_t(begin) * 16; i < size_t(end) * 16; i += 16) {
            const vf16 g = vload(gate + i);
            vstore(act + i, g / (one + vexp(zero - g)) * vload(up + i));
        }
    }, n > 65536);
    for (size_t i = blocks * 16; i < n; ++i) act[i] = CELERINFER_NS::silu(gate[i]) * up[i];
}

inline float dot(const float* a, const float* b, int n) {
    vf16 acc{};
    int i = 0;
    for (; i + 16 <= n; i += 16) acc += vload(a + i) * vload(b + i);
    float s = vsum(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline void rmsnorm(float* y, const float* x, const float* weight, int rows, int n, float eps) {
    for (int r = 0; r < rows; ++r) {
        const float* xr = x + size_t(r) * n;
        float* yr = y + size_t(r) * n;
        const float inv_rms = 1.0f / std::sqrt(dot(xr, xr, n) / float(n) + eps);
        for (int i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
    }
}

// The scores' divisor sqrt(head_dim), as a vector (both attention paths).
CI_VINLINE vf16 attention_scale(const AttnDims& d) {
    const float scale = float(std::sqrt(double(d.hd)));
    const vf16 vscale = opaque(vsplat(scale));
    return vscale;
}

// Is an attention call worth the thread pool? Its work grows as B * heads * S * P * head_dim; below
// 1e5 (the tiny default model's prefill: 3,200, ~2.5 us a layer) it stays on the calling thread, for
// the reason linear_worth_parallel gives.
inline bool attention_worth_parallel(const AttnDims& d) {
    return double(d.B) * d.heads * d.S * d.P * d.hd > 1.0e5;
}

// Does batch row b's key mask hold any padding (0)?
inline bool any_padding(const int64_t* key_mask, const AttnDims& d) {
    return std::find(key_mask, key_mask + d.P, int64_t(0)) != key_mask + d.P;
}

// Attention per (batch, head), causal keys only (the keys after a query have probability exactly
// 0), in three blocked passes over a per-thread [S][kt_stride] score tile, both products in the
// GEMM's register tile (tile_accumulate: 8 queries x up to 3 panels of 16, where one panel of 8
// queries waited on its loads: 9 loads per 8 FMAs):
// 1. scores up to 48 keys at a time: the keys' block [kGemmPanels][hd][16] is copied out of the
//    transposed cache kt [B][kv_heads][hd][kt_stride] once and reused by every query (the cache's
//    rows are 4 KB apart and would thrash L1 if read per query);
// 2. per row: padding mask, softmax (softmax_row), each observed through the taps;
// 3. context: eight queries x up to 48 dimensions, over the keys every one of them sees, then the
//    last seven keys row by row.
// Query tiles run from the last query down, so the scores pass stops at the first query that sees
// the key block; the lowest tile, when fewer than 8 queries are left, starts at query 0 instead and
// computes some rows twice (the same bits). There are at least kGemmRows queries (decode takes
// fewer: attention_is_decode), and scores past a query's causal keys are never used.
template <int NP>
inline void attention_scores_block(float* S, int kt_stride, const float* kblock, const float* q, int b, int h, int j0,
                                   const AttnDims& d) {
    constexpr int R = kGemmRows;
    const vf16 vscale = attention_scale(d);
    const size_t q_row = size_t(d.heads) * d.hd;
    const float* q_head = q + (size_t(b) * d.S * d.heads + h) * d.hd;  // query 0 of head h
    const int first = std::max(0, j0 - d.start());  // queries before the block's first key see none of it
    for (int last = d.S; last > first; last -= R) {  // queries last - R ... last - 1
        const int i = std::max(0, last - R);
        vf16 acc[R][NP] = {};
        tile_accumulate<R, NP>(acc, q_head + i * q_row, q_row, kblock, size_t(d.hd) * 16, 16, d.hd);
        for (int r = 0; r < R; ++r)
            for (int p = 0; p < NP; ++p) vstore(S + size_t(i + r) * kt_stride + j0 + 16 * p, acc[r][p] / vscale);
    }
}

// Every lane of the result holds the max (sum) of v's 16 lanes: xor butterflies, 4 steps where a
// scalar loop over the lanes is a chain of 15.
template <class Op>
CI_VINLINE vf16 vreduce_all(vf16 v, Op op) {
    v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    return op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
}

// In-place softmax over the first n of s. From 16 values on the row needs room for n rounded up to
// 16 (a score tile's row has kt_stride): its last partial vector is computed whole, lanes past n set
// to -inf (exp gives 0, stored as 0; NaN when the whole row is -inf; never used), where a scalar
// std::exp per value of the tail cost a sixth of the prefill's softmax (minimind2-small, 512 tokens).
inline void softmax_row(float* s, int n) {
    if (n < 16) {
        float max = s[0];
        for (int j = 1; j < n; ++j) max = s[j] > max ? s[j] : max;
        float sum = 0.0f;
        for (int j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - max));
        const float inv = 1.0f / sum;
        for (int j = 0; j < n; ++j) s[j] *= inv;
        return;
    }
    const auto max = [](vf16 a, vf16 b) { return vselect(a > b, a, b); };
    const int whole = n / 16 * 16, rest = n - whole;
    const vi16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vf16 minus_inf = opaque(vsplat(-std::numeric_limits<float>::infinity()));
    const vf16 tail = rest > 0 ? vselect(lanes < rest, vload(s + whole), minus_inf) : minus_inf;
    vf16 vmax_acc = tail;
    for (int j = 0; j < whole; j += 16) vmax_acc = max(vload(s + j), vmax_acc);
    const vf16 vmax = vreduce_all(vmax_acc, max);
    vf16 vsum_acc = vexp(tail - vmax);
    const vf16 tail_exp = vsum_acc;
    for (int j = 0; j < whole; j += 16) {
        const vf16 e = vexp(vload(s + j) - vmax);
        vstore(s + j, e);
        vsum_acc += e;
    }
    const float inv = 1.0f / vsum(vsum_acc);
    for (int j = 0; j < whole; j += 16) vstore(s + j, vload(s + j) * inv);
    if (rest > 0) vstore(s + whole, tail_exp * inv);
}

// The keys query i (of the S new ones) attends to: the cached ones and the new ones up to itself.
inline int causal_keys(int i, const AttnDims& d) { return d.start() + i + 1; }

// Row index of (batch row b, head h, query i) in the taps' [B, heads, S, P] records.
inline size_t attention_row(int b, int h, int i, const AttnDims& d) { return (size_t(b) * d.heads + h) * d.S + i; }

// One score row s (query i of batch row b, head h) before its softmax: the padding mask, the scores tap.
inline void attention_mask_row(float* s, int b, int h, int i, const int64_t* key_mask, bool padded, const AttnDims& d,
                               const AttentionTaps& taps) {
    const int n_keys = causal_keys(i, d);
    if (padded)
        for (int j = 0; j < n_keys; ++j)
            if (key_mask[j] == 0) s[j] += -1e9f;
    taps.scores_row(attention_row(b, h, i, d), s, n_keys, d.P);
}

// One score row made probabilities, in place (both paths): the mask and scores tap, softmax over
// the causal keys, the probs tap.
inline void attention_softmax_row(float* s, int b, int h, int i, const int64_t* key_mask, bool padded, const AttnDims& d,
                                  const AttentionTaps& taps) {
    attention_mask_row(s, b, h, i, key_mask, padded, d, taps);
    const int n_keys = causal_keys(i, d);
    softmax_row(s, n_keys);
    taps.probs_row(attention_row(b, h, i, d), s, n_keys, d.P);
}

// Context dimensions e0 ... e0 + 16 NP of queries i ... i + 7 from their probability rows in S.
template <int NP>
inline void attention_context_tile(float* context, const float* S, int kt_stride, const float* v_head, size_t v_stride,
                                   int b, int h, int i, int e0, const AttnDims& d) {
    constexpr int R = kGemmRows;
    const float* s_rows = S + size_t(i) * kt_stride;
    const int n_keys = causal_keys(i, d);  // row r sees n_keys + r
    vf16 acc[R][NP] = {};
    // values read whole, a partial last vector too: see decode_value_load
    tile_accumulate<R, NP>(acc, s_rows, size_t(kt_stride), v_head + e0, 16, v_stride, n_keys);
    for (int j = n_keys; j < n_keys + R - 1; ++j) {  // the keys only the later rows see
        vf16 v[NP];
        for (int p = 0; p < NP; ++p) v[p] = vload(v_head + j * v_stride + e0 + 16 * p);
        for (int r = j - n_keys + 1; r < R; ++r)
            for (int p = 0; p < NP; ++p) acc[r][p] += v[p] * s_rows[size_t(r) * kt_stride + j];
    }
    for (int r = 0; r < R; ++r) {
        float* out = context + ((size_t(b) * d.S + i + r) * d.heads + h) * d.hd;
        for (int p = 0; p < NP; ++p) {
            const int e = e0 + 16 * p, width = std::min(16, d.hd - e);
            if (width == 16) {
                vstore(out + e, acc[r][p]);
            } else {
                float tmp[16];
                vstore(tmp, acc[r][p]);
                std::memcpy(out + e, tmp, sizeof(float) * width);
            }
        }
    }
}

inline void attention_prefill(float* context, const float* q, const float* kt_cache, int kt_stride, const float* v_cache,
                      const int64_t* mask, const AttnDims& d, float* scratch, const AttentionTaps& taps) {
    CI_CHECK(d.S >= kGemmRows, "attention_prefill: ", d.S, " new tokens, fewer than a query tile (", kGemmRows, ")");
    const size_t tile = size_t(d.S) * kt_stride;
    ThreadPool::instance().parallel_for(d.B * d.heads, [&](int begin, int end, int thread) {
        float* S = scratch + size_t(thread) * (tile + size_t(d.hd) * 16 * kGemmPanels);  // attention_scratch_floats
        float* kblock = S + tile;  // [kGemmPanels][hd][16]
        for (int task = begin; task < end; ++task) {
            const int b = task / d.heads, h = task % d.heads, g = kv_head(h, d);
            const float* kt = kt_cache + (size_t(b) * d.kv_heads + g) * d.hd * kt_stride;
            const int key_panels = (d.P + 15) / 16;
            for (int p0 = 0; p0 < key_panels;) {  // 1. scores
                const int np = tile_panels(key_panels - p0), j0 = 16 * p0;
                for (int p = 0; p < np; ++p) {
                    float* kblock_p = kblock + size_t(p) * d.hd * 16;
                    for (int e = 0; e < d.hd; ++e)
                        std::memcpy(kblock_p + e * 16, kt + size_t(e) * kt_stride + j0 + 16 * p, 64);
                }
                if (np == 3) attention_scores_block<3>(S, kt_stride, kblock, q, b, h, j0, d);
                else if (np == 2) attention_scores_block<2>(S, kt_stride, kblock, q, b, h, j0, d);
                else attention_scores_block<1>(S, kt_stride, kblock, q, b, h, j0, d);
                p0 += np;
            }
            const int64_t* key_mask = mask + size_t(b) * d.P;
            const bool padded = any_padding(key_mask, d);
            for (int i = 0; i < d.S; ++i)  // 2. mask and softmax over the causal keys
                attention_softmax_row(S + size_t(i) * kt_stride, b, h, i, key_mask, padded, d, taps);
            const float* v_head = v_cache + size_t(b) * d.max_len * d.kv_heads * d.hd + size_t(g) * d.hd;
            const size_t v_stride = size_t(d.kv_heads) * d.hd;
            const int e_panels = (d.hd + 15) / 16;
            for (int last = d.S; last > 0; last -= kGemmRows) {  // 3. context, queries last - 8 ... last - 1
                const int i = std::max(0, last - kGemmRows);
                for (int p0 = 0; p0 < e_panels;) {
                    const int np = tile_panels(e_panels - p0);
                    if (np == 3) attention_context_tile<3>(context, S, kt_stride, v_head, v_stride, b, h, i, 16 * p0, d);
                    else if (np == 2) attention_context_tile<2>(context, S, kt_stride, v_head, v_stride, b, h, i, 16 * p0, d);
                    else attention_context_tile<1>(context, S, kt_stride, v_head, v_stride, b, h, i, 16 * p0, d);
                    p0 += np;
                }
            }
        }
    }, attention_worth_parallel(d));
}

// ---- decode attention: a few new tokens against a long cache --------------------------------------
// The blocked passes above need at least a tile of kGemmRows queries (attention_prefill checks);
// fewer new tokens (decode steps, short prompts) come here. The rows that share a kv head (its n_rep
// query heads x the S tokens, row r = i * n_rep + head within the group) are processed together, so
// each key and value row is read once per kv head, 4 rows at a time:
// 1. scores: 4 rows x 64 keys = 16 accumulators, read straight from the transposed cache (the
//    4 KB row stride no longer hurts: each 64-key row segment is used by all 4 rows);
// 2. per tile: padding mask and scores tap per row (as the prefill path), softmax of the 4 rows
//    side by side while every row has at most 16 keys (softmax_short_rows), else row by row
//    (softmax_row), then the probs tap: the same rows as the prefill path, the low bits may differ;
// 3. context: 4 rows x up to 96 dimensions (24 accumulators), one pass over the value rows.
// Tasks are (batch, kv head, row tile): both threads get equal shares when B * kv_heads is even.
constexpr int kDecodeRows = 4;  // rows per tile (missing rows repeat the last, not stored)

inline bool attention_is_decode(const AttnDims& d) { return d.S < kGemmRows; }

// One thread's scratch, in floats (fast::attention's layout): the decode path's tile of score rows,
// or the prefill path's [S][kt_stride] score tile and then its key block.
inline size_t attention_scratch_floats(const AttnDims& d, int kt_stride) {
    if (attention_is_decode(d)) return size_t(kDecodeRows) * kt_stride;
    return size_t(d.S) * kt_stride + size_t(d.hd) * 16 * kGemmPanels;
}

// S[r][j0 ... j0 + 16 * NK) for the kDecodeRows query rows qs, keys from the transposed cache kt.
template <int NK>
CI_VINLINE void decode_scores_tile(float* const* s_rows, const float* const* qs, const float* kt, int kt_stride,
                                   int j0, int hd, vf16 vscale) {
    constexpr int R = kDecodeRows;
    vf16 acc[R][NK];
    CI_UNROLL
    for (int r = 0; r < R; ++r)
        CI_UNROLL
        for (int n = 0; n < NK; ++n) acc[r][n] = vf16{};
    for (int e = 0; e < hd; ++e) {
        vf16 k[NK];
        CI_UNROLL
        for (int n = 0; n < NK; ++n) k[n] = vload(kt + size_t(e) * kt_stride + j0 + 16 * n);
        // The next tile's keys of this row: hd rows read side by side are too many streams for
        // the hardware prefetcher (measured: 65 us per layer at 600 keys with a cold cache, 25 hot).
        CI_UNROLL
        for (int n = 0; n < NK; ++n) __builtin_prefetch(kt + size_t(e) * kt_stride + j0 + 16 * (NK + n));
        CI_UNROLL
        for (int r = 0; r < R; ++r) {
            const float qe = qs[r][e];
            CI_UNROLL
            for (int n = 0; n < NK; ++n) acc[r][n] += k[n] * qe;
        }
    }
    CI_UNROLL
    for (int r = 0; r < R; ++r)
        CI_UNROLL
        for (int n = 0; n < NK; ++n) vstore(s_rows[r] + j0 + 16 * n, acc[r][n] / vscale);
}

// Scores of the kDecodeRows rows qs against keys [0, P) of the transposed cache kt, in whole 16-key
// blocks (columns up to P rounded up to 16, <= kt_stride, are written; those past P are unused).
inline void attention_decode_scores(float* const* s_rows, const float* const* qs, const float* kt, int kt_stride,
                                    const AttnDims& d) {
    const vf16 vscale = attention_scale(d);
    const int P16 = (d.P + 15) / 16 * 16;
    int j0 = 0;
    for (; j0 + 64 <= P16; j0 += 64) decode_scores_tile<4>(s_rows, qs, kt, kt_stride, j0, d.hd, vscale);
    for (; j0 < P16; j0 += 16) decode_scores_tile<1>(s_rows, qs, kt, kt_stride, j0, d.hd, vscale);
}

// Value row j's EV vectors from e0, loaded whole even when head_dim is not a multiple of 16 (the
// tiny model's 8): the lanes past the head hold the next head's values, or past the last row the
// cache buffer's guard tail (GuardedBuffer::kGuard = 16 floats, so the read stays in the buffer);
// they only reach accumulator lanes that are never stored. Copying the partial vector through a
// stack buffer instead stalled each load after it (store forwarding fails): ~1 us of the tiny
// model's 30 us forward.
template <int EV>
CI_VINLINE void decode_value_load(vf16* v, const float* vj) {
    static_assert(GuardedBuffer::kGuard >= 16, "a whole-vector read of the cache's last row needs a 16-float tail");
    CI_UNROLL
    for (int n = 0; n < EV; ++n) v[n] = vload(vj + 16 * n);
}

// out[r][e0 ... e0 + width) = sum over keys j < n_keys[r] of p[r][j] * v[j][e0 ...], EV vectors wide.
template <int EV>
CI_VINLINE void decode_context_tile(float* const* outs, const float* const* p_rows, const int* n_keys, int nq,
                                    const float* v_head, size_t v_stride, int e0, int hd) {
    constexpr int R = kDecodeRows;
    const int width = std::min(16 * EV, hd - e0);
    vf16 acc[R][EV];
    CI_UNROLL
    for (int r = 0; r < R; ++r)
        CI_UNROLL
        for (int n = 0; n < EV; ++n) acc[r][n] = vf16{};
    int n_min = n_keys[0], n_max = n_keys[0];
    for (int r = 1; r < R; ++r) n_min = std::min(n_min, n_keys[r]), n_max = std::max(n_max, n_keys[r]);
    int j = 0;
    for (; j < n_min; ++j) {  // every row sees key j
        vf16 v[EV];
        decode_value_load<EV>(v, v_head + size_t(j) * v_stride + e0);
        CI_UNROLL
        for (int r = 0; r < R; ++r) {
            const float pj = p_rows[r][j];
            CI_UNROLL
            for (int n = 0; n < EV; ++n) acc[r][n] += v[n] * pj;
        }
    }
    for (; j < n_max; ++j) {  // keys some rows see (several new tokens: the causal edge)
        vf16 v[EV];
        decode_value_load<EV>(v, v_head + size_t(j) * v_stride + e0);
        for (int r = 0; r < R; ++r)
            if (j < n_keys[r]) {
                const float pj = p_rows[r][j];
                for (int n = 0; n < EV; ++n) acc[r][n] += v[n] * pj;
            }
    }
    for (int r = 0; r < nq; ++r) {
        float tmp[16 * EV];
        for (int n = 0; n < EV; ++n) vstore(tmp + 16 * n, acc[r][n]);
        std::memcpy(outs[r] + e0, tmp, sizeof(float) * width);
    }
}

// Softmax of a tile's rows (rows[t], t < nq) of n[t] <= 16 values each, side by side: one vector a
// row, lanes past n[t] set to -inf (exp gives 0; they are stored as 0, so a row needs room for 16).
// The tiny model's prefill has rows of 1 to 5 keys: a scalar std::exp per key, one row after the
// other, was half its attention's time; a vector row alone is a chain of max, exp and sum that
// leaves the core waiting, four of them interleave.
inline void softmax_short_rows(float* const* rows, const int* n, int nq) {
    constexpr int R = kDecodeRows;
    const vi16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vf16 minus_inf = opaque(vsplat(-std::numeric_limits<float>::infinity()));
    const auto max = [](vf16 a, vf16 b) { return vselect(a > b, a, b); };
    const auto add = [](vf16 a, vf16 b) { return a + b; };
    vf16 e[R];
    CI_UNROLL
    for (int t = 0; t < R; ++t) {
        const int r = std::min(t, nq - 1);  // missing rows repeat the last (not stored)
        const vf16 v = vselect(lanes < n[r], vload(rows[r]), minus_inf);
        e[t] = vexp(v - vreduce_all(v, max));
    }
    CI_UNROLL
    for (int t = 0; t < R; ++t) e[t] /= vreduce_all(e[t], add);
    for (int t = 0; t < nq; ++t) vstore(rows[t], e[t]);
}

// A decode tile's rows (t < nq: batch row b, query head heads[t], new token tokens[t], n_keys[t]
// causal keys) made probabilities: attention_softmax_row's steps, with the softmax of the four rows
// side by side when every row has at most 16 keys (n_keys grows with t: the last is the largest).
inline void attention_softmax_tile(float* const* s_rows, int b, const int* heads, const int* tokens, const int* n_keys,
                                   int nq, const int64_t* key_mask, bool padded, const AttnDims& d,
                                   const AttentionTaps& taps) {
    if (n_keys[kDecodeRows - 1] > 16) {
        for (int t = 0; t < nq; ++t)
            attention_softmax_row(s_rows[t], b, heads[t], tokens[t], key_mask, padded, d, taps);
        return;
    }
    for (int t = 0; t < nq; ++t) attention_mask_row(s_rows[t], b, heads[t], tokens[t], key_mask, padded, d, taps);
    softmax_short_rows(s_rows, n_keys, nq);
    for (int t = 0; t < nq; ++t) taps.probs_row(attention_row(b, heads[t], tokens[t], d), s_rows[t], n_keys[t], d.P);
}

// group_heads[g * n_rep + m] = the m-th query head that reads kv head g, as kv_head says (so a GQA
// fault in kv_head reaches this path too). Once per call: searched per row, its divisions were a
// fifth of the tiny model's attention.
inline void group_query_heads(int* group_heads, const AttnDims& d) {
    const int n_rep = d.n_rep();
    std::fill(group_heads, group_heads + d.heads, -1);
    for (int h = 0; h < d.heads; ++h) {
        const int g = kv_head(h, d);
        CI_CHECK(g >= 0 && g < d.kv_heads, "attention: query head ", h, " maps to kv head ", g);
        int* slot = std::find(group_heads + g * n_rep, group_heads + (g + 1) * n_rep, -1);  // g's next free one
        CI_CHECK(slot != group_heads + (g + 1) * n_rep, "attention: more than ", n_rep, " query heads read kv head ",
                 g);
        *slot = h;
    }
}

inline void attention_decode(float* context, const float* q, const float* kt_cache, int kt_stride,
                             const float* v_cache, const int64_t* mask, const AttnDims& d, float* scratch,
                             int* group_heads, const AttentionTaps& taps) {
    const int n_rep = d.n_rep(), rows = n_rep * d.S, tiles = (rows + kDecodeRows - 1) / kDecodeRows;
    const size_t tile_floats = attention_scratch_floats(d, kt_stride);
    group_query_heads(group_heads, d);
    ThreadPool::instance().parallel_for(d.B * d.kv_heads * tiles, [&](int begin, int end, int thread) {
        float* S = scratch + size_t(thread) * tile_floats;  // [kDecodeRows][kt_stride]
        for (int task = begin; task < end; ++task) {
            const int b = task / (d.kv_heads * tiles), g = task / tiles % d.kv_heads, tile = task % tiles;
            const int r0 = tile * kDecodeRows, nq = std::min(kDecodeRows, rows - r0);
            const float* kt = kt_cache + (size_t(b) * d.kv_heads + g) * d.hd * kt_stride;
            // Row r of the group: token i = r / n_rep, and the (r % n_rep)-th query head that reads kv head g.
            const float* qs[kDecodeRows];
            float* s_rows[kDecodeRows];
            float* outs[kDecodeRows];
            int n_keys[kDecodeRows], heads[kDecodeRows], tokens[kDecodeRows];
            for (int t = 0; t < kDecodeRows; ++t) {
                const int r = r0 + std::min(t, nq - 1), i = r / n_rep, h = group_heads[g * n_rep + r % n_rep];
                qs[t] = q + ((size_t(b) * d.S + i) * d.heads + h) * d.hd;
                s_rows[t] = S + size_t(std::min(t, nq - 1)) * kt_stride;
                outs[t] = context + ((size_t(b) * d.S + i) * d.heads + h) * d.hd;
                n_keys[t] = causal_keys(i, d);
                heads[t] = h;
                tokens[t] = i;
            }
            attention_decode_scores(s_rows, qs, kt, kt_stride, d);  // 1. scores
            const int64_t* key_mask = mask + size_t(b) * d.P;
            const bool padded = any_padding(key_mask, d);
            attention_softmax_tile(s_rows, b, heads, tokens, n_keys, nq, key_mask, padded, d, taps);  // 2.
            const float* v_head = v_cache + size_t(b) * d.max_len * d.kv_heads * d.hd + size_t(g) * d.hd;
            const size_t v_stride = size_t(d.kv_heads) * d.hd;
            // 3. context, up to 96 dimensions per pass: one pass over the value rows for head_dim <= 96
            // (minimind2's 96 took two, 64 + 32: each value row's cache lines fetched in two visits)
            for (int e0 = 0, ev; e0 < d.hd; e0 += 16 * ev) {
                const float* p_rows[kDecodeRows] = {s_rows[0], s_rows[1], s_rows[2], s_rows[3]};
                ev = (d.hd - e0 + 15) / 16 <= 6 ? (d.hd - e0 + 15) / 16 : 4;
                switch (ev) {
                    case 6: decode_context_tile<6>(outs, p_rows, n_keys, nq, v_head, v_stride, e0, d.hd); break;
                    case 5: decode_context_tile<5>(outs, p_rows, n_keys, nq, v_head, v_stride, e0, d.hd); break;
                    case 4: decode_context_tile<4>(outs, p_rows, n_keys, nq, v_head, v_stride, e0, d.hd); break;
                    case 3: decode_context_tile<3>(outs, p_rows, n_keys, nq, v_head, v_stride, e0, d.hd); break;
                    case 2: decode_context_tile<2>(outs, p_rows, n_keys, nq, v_head, v_stride, e0, d.hd); break;
                    default: decode_context_tile<1>(outs, p_rows, n_keys, nq, v_head, v_stride, e0, d.hd); break;
                }
            }
        }
    }, attention_worth_parallel(d));
}

// The fused attention: the blocked prefill passes, or the decode path for fewer than kGemmRows new
// tokens. scratch holds attention_scratch_floats(d, kt_stride) floats per thread; group_heads,
// d.heads ints. v_cache must stay readable 15 floats past its end: a value row's partial last
// vector is read whole (decode_value_load; the prefill's tile_accumulate and its last keys).
// Workspace's v_cache is a GuardedBuffer, whose guard tail is that room.
inline void attention(float* context, const float* q, const float* kt_cache, int kt_stride, const float* v_cache,
                      const int64_t* mask, const AttnDims& d, float* scratch, int* group_heads,
                      const AttentionTaps& taps) {
    if (attention_is_decode(d))
        return attention_decode(context, q, kt_cache, kt_stride, v_cache, mask, d, scratch, group_heads, taps);
    attention_prefill(context, q, kt_cache, kt_stride, v_cache, mask, d, scratch, taps);
}

// Keys of the new tokens [B, S, kv_heads, hd] into the transposed cache [B][kv_heads][hd][stride],
// 16 tokens at a time: each cache row gets a whole line of 16 keys while the 16 tokens' keys stay in
// L1 (token by token, every key went to its own line of a row 4 KB from the last).
inline void store_keys_transposed(float* kt_cache, int kt_stride, const float* k, const AttnDims& d) {
    const size_t src_row = size_t(d.kv_heads) * d.hd;  // one token's keys
    for (int b = 0; b < d.B; ++b)
        for (int g = 0; g < d.kv_heads; ++g) {
            const float* src = k + size_t(b) * d.S * src_row + size_t(g) * d.hd;
            float* dst = kt_cache + (size_t(b) * d.kv_heads + g) * d.hd * kt_stride + d.start();
            for (int i0 = 0; i0 < d.S; i0 += 16) {
                const int i1 = std::min(d.S, i0 + 16);
                for (int e = 0; e < d.hd; ++e)
                    for (int i = i0; i < i1; ++i) dst[size_t(e) * kt_stride + i] = src[i * src_row + e];
            }
        }
}

}  // namespace fast

// The fast kernel set: packed, vectorized, threaded; attention fused.
struct FastKernels {
    static constexpr WeightFormat weight_format = WeightFormat::F32;  // see ReadableKernels
    PackedWeights weights;

    void prepare_linear(const float* W, int out, int in) { weights.add(W, out, in); }
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        fast::linear(y, x, weights.at(W, out, in), rows);
    }
    // Several linears of x (forward.hpp's linears): at decode one job (fast::linears), else one call each.
    // (One job up to 47 rows shared the tiny model's gate and up between the cores: see linear_worth_parallel.)
    void linears(const float* x, int rows, int in, const LinearOut* outs, int n) const {
        const fast::PackedMatrix* Ws[4];
        if (rows > fast::kFusedRows || n > 4) {
            for (int i = 0; i < n; ++i) linear(outs[i].y, x, outs[i].W, rows, in, outs[i].out);
            return;
        }
        for (int i = 0; i < n; ++i) Ws[i] = &weights.at(outs[i].W, outs[i].out, in);
        fast::linears(x, rows, outs, Ws, n);
    }
    void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const {
        fast::rmsnorm(y, x, w, rows, n, eps);
    }
    void swiglu(float* act, const float* gate, const float* up, size_t n) const { fast::swiglu(act, gate, up, n); }
    // The fused attention reads keys transposed ([B][kv_heads][hd][kt_stride]) and values row-major.
    void store_kv(int layer, const float* k, const float* v, const AttnDims& d, Workspace& ws) const {
        fast::store_keys_transposed(ws.layer_kt(layer), ws.kt_stride, k, d);
        cache_store(ws.layer_v(layer), v, d);
    }
    void attention(float* context, const float* q, int layer, const int64_t* mask, const AttnDims& d, Workspace& ws,
                   const AttentionTaps& taps) const {
        // One score tile per thread: set_num_threads() may have raised the count since the
        // workspace was made (then, and only then, the scratch grows).
        float* scratch = ws.scratch(size_t(num_threads()) * fast::attention_scratch_floats(d, ws.kt_stride));
        CI_CHECK(ws.group_heads.size() == size_t(d.heads), "attention: a workspace made for ", ws.group_heads.size(),
                 " query heads, the model has ", d.heads);
        // ws.layer_v is a GuardedBuffer: the read past its end that fast::attention needs stays in its guard.
        fast::attention(context, q, ws.layer_kt(layer), ws.kt_stride, ws.layer_v(layer), mask, d, scratch,
                        ws.group_heads.data(), taps);
    }
};

}  // namespace CELERINFER_NS
