// decode_profile: where a decode step's time goes, op by op, for a kernel set (fast, bf16 or q8) on a
// random model of a preset's shape (batch 1; bf16 / q8: its reducible weights stored in that format,
// bound with bind_stored, and their float32 decoding bound as the model's weights, as the Python side
// does). It prefills CTX tokens, then times STEPS single-token steps,
// accumulating per op kind (every kernel-set call is wrapped and timed; "other" is the rest of the
// step: embedding, RoPE, residual adds, the guard check) and counting the calls that the fast
// kernels hand to the thread pool (same size rules as fast.hpp).
//
//   g++ -O2 -march=native -std=c++17 -Icpp/include cpp/tools/decode_profile.cpp -o decode_profile -pthread
//   ./decode_profile [fast|bf16|q8] [minimind2-small|minimind2] CTX STEPS [THREADS]
// Or through cmake: the target decode_profile (not part of `all`). -O2, as cling compiles the kernels
// for cppyy. Times are wall clock per step: on a shared machine, take the best of a few runs.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "celerinfer/celerinfer.hpp"

namespace ci = celerinfer;
using Clock = std::chrono::steady_clock;

struct Totals {
    std::map<std::string, double> ms;
    std::map<std::string, long> calls;
    long dispatches = 0;
    bool on = false;
};
static Totals g_totals;

struct Timer {
    const char* what;
    Clock::time_point t0 = Clock::now();
    explicit Timer(const char* w) : what(w) {}
    ~Timer() {
        if (!g_totals.on) return;
        g_totals.ms[what] += std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        g_totals.calls[what] += 1;
    }
};

// CPU time of the whole process (every thread; the pool's workers spin between jobs, so with more than
// one thread this counts their spinning too): with one thread, the work, whatever the machine's load.
static double cpu_ms() {
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

// Every call of kernel set K, timed.
template <class K>
struct Timed {
    static constexpr ci::WeightFormat weight_format = K::weight_format;
    K k;
    void prepare(const ci::ModelWeights& m) {
        m.for_each_linear([&](const float* W, int out, int in) {
            if constexpr (ci::takes_stored<K>::value) k.prepare_linear(W, out, in, m.stored_of(W));
            else k.prepare_linear(W, out, in);
        });
    }
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const {
        Timer t(rows == 1 && out > 4096 ? "linear lm_head" : "linear");
        if (g_totals.on && (double(in) * out * 4 > 131072 || double(rows) * in * out > 2.0e5)) ++g_totals.dispatches;
        k.linear(y, x, W, rows, in, out);
    }
    // The set's own linears when it has one (one dispatch for q, k, v; one for gate, up).
    void linears(const float* x, int rows, int in, const ci::LinearOut* outs, int n) const {
        Timer t("linear");
        if constexpr (ci::fuses_linears<K>::value) {
            if (g_totals.on) ++g_totals.dispatches;
            k.linears(x, rows, in, outs, n);
        } else {
            for (int i = 0; i < n; ++i) {
                if (g_totals.on && double(in) * outs[i].out * 4 > 131072) ++g_totals.dispatches;
                k.linear(outs[i].y, x, outs[i].W, rows, in, outs[i].out);
            }
        }
    }
    void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const {
        Timer t("rmsnorm");
        k.rmsnorm(y, x, w, rows, n, eps);
    }
    void swiglu(float* act, const float* gate, const float* up, size_t n) const {
        Timer t("swiglu");
        k.swiglu(act, gate, up, n);
    }
    void store_kv(int layer, const float* kk, const float* v, const ci::AttnDims& d, ci::Workspace& ws) const {
        Timer t("store_kv");
        k.store_kv(layer, kk, v, d, ws);
    }
    void attention(float* context, const float* q, int layer, const int64_t* mask, const ci::AttnDims& d,
                   ci::Workspace& ws, const ci::AttentionTaps& taps) const {
        Timer t("attention");
        if (g_totals.on) ++g_totals.dispatches;  // an upper bound: small attentions stay on one thread
        k.attention(context, q, layer, mask, d, ws, taps);
    }
};

// The float16 nearest to x >= 0 (ties to even), x below float16's largest: a binary search over the
// positive codes, which decode in increasing order (no F16C instruction needed).
static uint16_t to_fp16(float x) {
    uint16_t lo = 0, hi = 0x7BFF;
    while (lo < hi) {  // the smallest code whose value is >= x
        const uint16_t mid = uint16_t((lo + hi) / 2);
        if (ci::fp16_to_float(mid) < x) lo = uint16_t(mid + 1);
        else hi = mid;
    }
    if (lo == 0) return 0;
    const float below = x - ci::fp16_to_float(uint16_t(lo - 1)), above = ci::fp16_to_float(lo) - x;
    return below < above || (below == above && (lo - 1) % 2 == 0) ? uint16_t(lo - 1) : lo;
}

// w [out, in] stored as bf16 (round to nearest even) or Q8_0 (per 32 weights: float16 scale max|w| / 127,
// then round(w / scale)); w becomes its decoding.
static void store(std::vector<uint8_t>& bytes, std::vector<float>& w, int out, int in, ci::WeightFormat format) {
    bytes.assign(ci::stored_bytes(format, out, in), 0);
    if (format == ci::WeightFormat::BF16) {
        for (size_t i = 0; i < w.size(); ++i) {
            uint32_t bits;
            std::memcpy(&bits, &w[i], 4);
            const uint16_t h = uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
            std::memcpy(bytes.data() + 2 * i, &h, 2);
            w[i] = ci::bf16_to_float(h);
        }
        return;
    }
    const size_t row_bytes = ci::stored_bytes(format, 1, in);
    for (int o = 0; o < out; ++o)
        for (int k0 = 0; k0 < in; k0 += ci::kQ8Block) {
            const int k1 = std::min(in, k0 + ci::kQ8Block);
            float amax = 0.0f;
            for (int k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(w[size_t(o) * in + k]));
            const uint16_t h = to_fp16(amax / 127.0f);
            const float d = ci::fp16_to_float(h);
            uint8_t* block = bytes.data() + size_t(o) * row_bytes + size_t(k0 / ci::kQ8Block) * ci::kQ8BlockBytes;
            block[0] = uint8_t(h & 0xFF);
            block[1] = uint8_t(h >> 8);
            for (int k = k0; k < k1; ++k) {
                float& x = w[size_t(o) * in + k];
                const int q = d > 0.0f ? std::clamp(int(std::lround(x / d)), -127, 127) : 0;
                block[2 + k - k0] = uint8_t(int8_t(q));
                x = float(q) * d;
            }
        }
}

int main(int argc, char** argv) {
    const std::string set = argc > 1 ? argv[1] : "fast", preset = argc > 2 ? argv[2] : "minimind2-small";
    const int ctx = argc > 3 ? std::atoi(argv[3]) : 512, steps = argc > 4 ? std::atoi(argv[4]) : 64;
    const int threads = argc > 5 ? std::atoi(argv[5]) : ci::num_threads();
    if ((set != "fast" && set != "bf16" && set != "q8") || (preset != "minimind2-small" && preset != "minimind2") || ctx < 1 || ctx > 30000 || steps < 1 ||
        steps > 30000 || threads < 1 || threads > 256 || argc > 6) {
        std::fprintf(stderr,
                     "usage: decode_profile [fast|bf16|q8] [minimind2-small|minimind2] CONTEXT STEPS [THREADS]\n"
                     "  (a random model; bf16 / q8 store its reducible weights in that format; CONTEXT and STEPS\n"
                     "  1..30000, THREADS 1..256)\n");
        return 2;
    }
    ci::set_num_threads(threads);
    ci::Config c;
    c.hidden = preset == "minimind2" ? 768 : 512;
    c.layers = preset == "minimind2" ? 16 : 8;
    c.heads = 8; c.kv_heads = 2; c.head_dim = c.hidden / c.heads; c.vocab = 6400;
    c.intermediate = (c.hidden * 8 / 3 + 63) / 64 * 64; c.max_pos = ctx + steps + 1;
    ci::ModelWeights m(c);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::map<std::string, std::vector<float>> tensors;
    std::map<std::string, std::vector<uint8_t>> stored;
    ci::for_each_weight(c, [&](const ci::WeightRow& row, int layer, int index) {
        const std::string name = ci::weight_name(row, layer, index);
        const std::vector<int64_t> shape = ci::row_shape(c, row);
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        std::vector<float>& v = tensors[name];
        v.resize(n);
        for (float& x : v) x = (row.rank == 1 ? 1.0f : 0.0f) + normal(rng);
        m.bind(name, v.data(), shape);
    });
    std::vector<float>& cs = tensors["rope.cos"];
    std::vector<float>& sn = tensors["rope.sin"];
    cs.assign(size_t(c.max_pos) * c.head_dim, 1.0f);
    sn.assign(cs.size(), 0.0f);
    m.bind("rope.cos", cs.data(), {c.max_pos, c.head_dim});
    if (set != "fast") {  // the reducible weights stored, their float32 decoding made the model's weights
        const ci::WeightFormat format = set == "bf16" ? ci::WeightFormat::BF16 : ci::WeightFormat::Q8;
        ci::for_each_weight(c, [&](const ci::WeightRow& row, int layer, int index) {
            if (!row.reducible || !ci::has_feature(c, row.reduced_when)) return;
            const std::string name = ci::weight_name(row, layer, index);
            const std::vector<int64_t> shape = ci::row_shape(c, row);
            std::vector<uint8_t>& bytes = stored[name];
            store(bytes, tensors[name], int(shape[0]), int(shape[1]), format);
            m.bind_stored(name, format, bytes.data(), bytes.size());
        });
    }
    m.bind("rope.sin", sn.data(), {c.max_pos, c.head_dim});
    m.check_complete();

    auto run = [&](auto kernels) {
        kernels.prepare(m);
        ci::Workspace ws(c, 1, ctx, ctx + steps + 1);
        std::vector<int64_t> ids(ctx), mask(ctx + steps + 1, 1);
        for (int i = 0; i < ctx; ++i) ids[i] = i % c.vocab;
        std::vector<float> logits(size_t(ctx) * c.vocab);
        ci::forward_tokens(m, kernels, ids.data(), mask.data(), ctx, 0, ws, logits.data());
        const auto t0 = Clock::now();
        const double cpu0 = cpu_ms();
        g_totals.on = true;
        for (int s = 0; s < steps; ++s) {
            const int64_t id = s % c.vocab;
            ci::forward_tokens(m, kernels, &id, mask.data(), 1, ctx + s, ws, logits.data());
            ws.check_guards();
        }
        g_totals.on = false;
        const double total = std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / steps;
        const double cpu = (cpu_ms() - cpu0) / steps;
        double timed = 0.0;
        std::printf("%s %s, context %d, %d steps, threads %d: %.3f ms/step (process CPU time %.3f ms/step)\n",
                    set.c_str(), preset.c_str(), ctx, steps, ci::num_threads(), total, cpu);
        for (const auto& [what, ms] : g_totals.ms) {
            std::printf("  %-16s %8.4f ms/step  (%ld calls/step)\n", what.c_str(), ms / steps, g_totals.calls[what] / steps);
            timed += ms / steps;
        }
        std::printf("  %-16s %8.4f ms/step\n", "other", total - timed);
        std::printf("  thread-pool dispatches (linear + attention): %ld per step\n", g_totals.dispatches / steps);
    };
    if (set == "fast") run(Timed<ci::FastKernels>{});
    else if (set == "bf16") run(Timed<ci::Bf16Kernels>{});
    else run(Timed<ci::Q8Kernels>{});
    return 0;
}
