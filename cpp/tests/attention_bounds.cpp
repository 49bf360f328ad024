// attention_bounds: the fused attention (fast::attention, both paths) reads and writes only inside
// its buffers, and agrees with a float64 oracle, over a grid of shapes. Built with AddressSanitizer
// (tests/test_attention_bounds.py): every buffer is its own exact-size malloc, so ASan sees any
// access past it. The workspace's buffers cannot show this: they come from HugePageArena, whose
// blocks ASan does not see into, and the guard check only catches writes.
//
// One documented exception: a value row's partial last vector is read whole (the decode path's
// decode_value_load, the prefill path's tile_accumulate), up to 15 floats past the value cache's
// end, which the workspace's guard tail covers. The first argument is that slack in floats, filled
// with NaN (so a lane that leaked would show in the context): with 15 the run must be clean, with
// 14 ASan must stop it (the claim is tight).
//
// The grid: head_dim 1 to 130 (multiples of 16 and not), 1 to 40 new tokens (the decode path
// below 8, the blocked prefill path from 8: one query tile, two overlapping ones, several), 0 to 40
// cached ones (key blocks of 1 to 3 panels, query tiles that start past the first key block), GQA
// 1:1 to 4:1, with and without left padding; the cache exactly full, so its last row is the
// buffer's last floats, or 5 rows longer than the keys in use.
// Prints "<cases> cases, <failures> failures"; exit 0 when there is no failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "celerinfer/celerinfer.hpp"

namespace ci = celerinfer;

// n floats of their own allocation, every one set to fill.
static float* exact_buffer(size_t n, float fill) {
    float* p = static_cast<float*>(std::malloc(std::max<size_t>(n, 1) * sizeof(float)));
    std::fill(p, p + n, fill);
    return p;
}

// The largest |fast - oracle| over the context, after running fast::attention on random q, k, v.
static double attention_error(int S, int start, int heads, int kv_heads, int hd, bool padded, int spare_rows,
                              int slack) {
    const int B = 2, P = start + S, max_len = P + spare_rows, kt_stride = (max_len + 15) / 16 * 16;
    const ci::AttnDims d{B, S, P, max_len, heads, kv_heads, hd};
    std::mt19937 rng(unsigned(S * 7919 + start * 131 + heads * 17 + hd));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const size_t q_n = size_t(B) * S * heads * hd, kv_n = size_t(B) * max_len * kv_heads * hd;
    float* q = exact_buffer(q_n, 0.0f);
    float* k = exact_buffer(kv_n, 0.0f);
    float* v = exact_buffer(kv_n + slack, nan);
    float* kt = exact_buffer(size_t(B) * kv_heads * hd * kt_stride, 0.0f);
    float* context = exact_buffer(q_n, nan);
    float* scratch = exact_buffer(size_t(ci::num_threads()) * ci::fast::attention_scratch_floats(d, kt_stride), 0.0f);
    int* group_heads = static_cast<int*>(std::malloc(sizeof(int) * heads));
    for (size_t i = 0; i < q_n; ++i) q[i] = normal(rng);
    for (size_t i = 0; i < kv_n; ++i) k[i] = normal(rng), v[i] = normal(rng);
    for (int b = 0; b < B; ++b)
        for (int j = 0; j < P; ++j)
            for (int g = 0; g < kv_heads; ++g)
                for (int e = 0; e < hd; ++e)
                    kt[((size_t(b) * kv_heads + g) * hd + e) * kt_stride + j] = k[((size_t(b) * max_len + j) * kv_heads + g) * hd + e];
    std::vector<int64_t> mask(size_t(B) * P, 1);
    if (padded)  // batch row b: its first b + 1 keys are padding (one real key at least)
        for (int b = 0; b < B; ++b)
            for (int j = 0; j < std::min(P - 1, b + 1); ++j) mask[size_t(b) * P + j] = 0;

    ci::AttentionTaps taps;
    ci::fast::attention(context, q, kt, kt_stride, v, mask.data(), d, scratch, group_heads, taps);

    double worst = 0.0;
    const double scale = std::sqrt(double(hd));
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < S; ++i)
            for (int h = 0; h < heads; ++h) {
                const int g = h / (heads / kv_heads), n_keys = start + i + 1;
                std::vector<double> p(n_keys);
                double max = -1e300, sum = 0.0;
                for (int j = 0; j < n_keys; ++j) {
                    double dot = 0.0;
                    for (int e = 0; e < hd; ++e)
                        dot += double(q[((size_t(b) * S + i) * heads + h) * hd + e]) *
                               k[((size_t(b) * max_len + j) * kv_heads + g) * hd + e];
                    // A padded key's score gets -1e9 in float, as the kernel adds it: a row of only
                    // padded keys is then uniform (the float sum drops the scores' differences).
                    p[j] = mask[size_t(b) * P + j] == 0 ? double(float(dot / scale) + -1e9f) : dot / scale;
                    max = std::max(max, p[j]);
                }
                for (double& x : p) sum += (x = std::exp(x - max));
                for (int e = 0; e < hd; ++e) {
                    double want = 0.0;
                    for (int j = 0; j < n_keys; ++j) want += p[j] / sum * v[((size_t(b) * max_len + j) * kv_heads + g) * hd + e];
                    const double got = context[((size_t(b) * S + i) * heads + h) * hd + e];
                    worst = std::max(worst, std::isfinite(got) ? std::fabs(got - want) : 1e30);
                }
            }
    for (void* buffer : {(void*)q, (void*)k, (void*)v, (void*)kt, (void*)context, (void*)scratch, (void*)group_heads})
        std::free(buffer);
    return worst;
}

int main(int argc, char** argv) {
    const int slack = argc > 1 ? std::atoi(argv[1]) : 15;
    int cases = 0, failures = 0;
    for (int hd : {1, 7, 8, 10, 16, 17, 33, 64, 70, 97, 100, 130})
        for (int S : {1, 3, 5, 8, 9, 15, 17, 40})
            for (int start : {0, 4, 12, 16, 40})
                for (auto [heads, kv_heads] : {std::pair{1, 1}, {2, 1}, {8, 2}, {3, 3}}) {
                    const bool padded = (S + start) % 2 == 1;
                    const int spare_rows = (hd + heads) % 2 == 1 ? 5 : 0;
                    const double error = attention_error(S, start, heads, kv_heads, hd, padded, spare_rows, slack);
                    ++cases;
                    if (error > 1e-4) {
                        ++failures;
                        std::printf("FAIL head_dim %d, %d new tokens after %d, heads %d/%d, padded %d, %d spare cache "
                                    "rows: error %g\n", hd, S, start, heads, kv_heads, int(padded), spare_rows, error);
                    }
                }
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures == 0 ? 0 : 1;
}
