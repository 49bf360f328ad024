// alloc_count: proves the README's "zero cost when not tracing": an untraced forward allocates
// nothing. Every global operator new / delete (plain, array, sized, aligned, nothrow) is replaced
// by a counting version; the counter is armed only around the calls under test, and counts calls
// made on any thread (the fast set's pool workers included).
//
// For each registered kernel set and each model case (dense, q/k norm + interleaved RoPE + untied
// head, MoE with a shared expert, all with a left-padded batch row) it runs, after a warm-up:
//   prefill  one untraced forward of T tokens (its own workspace, max_len == T)
//   decode   untraced forwards over one workspace with max_len > T: T tokens at start 0, then one
//            token at a time at start T, T + 1, ... up to max_len - 1
// and prints "<set> <case> <what> allocations=<n>". Then a traced forward (a TraceRecorder) is
// counted the same way and printed as "<set> <case> traced allocations=<n>": it must be > 0, or the
// counter is not counting. Exit status: 0 when every untraced count is 0 and every traced one > 0.
//
// Built by cpp/CMakeLists.txt (target alloc_count, not part of `all`); run by tests/test_alloc.py.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "celerinfer/celerinfer.hpp"

// ---- the counter --------------------------------------------------------------------------------
namespace {
std::atomic<bool> g_armed{false};
std::atomic<long> g_news{0};

void* counted_alloc(std::size_t n) {
    if (g_armed.load(std::memory_order_relaxed)) g_news.fetch_add(1, std::memory_order_relaxed);
    return std::malloc(n ? n : 1);
}
void* counted_alloc_aligned(std::size_t n, std::align_val_t al) {
    if (g_armed.load(std::memory_order_relaxed)) g_news.fetch_add(1, std::memory_order_relaxed);
    std::size_t a = static_cast<std::size_t>(al);
    if (a < sizeof(void*)) a = sizeof(void*);
    void* p = nullptr;
    return posix_memalign(&p, a, n ? n : 1) == 0 ? p : nullptr;
}
void* must(void* p) {
    if (!p) throw std::bad_alloc();
    return p;
}
}  // namespace

void* operator new(std::size_t n) { return must(counted_alloc(n)); }
void* operator new[](std::size_t n) { return must(counted_alloc(n)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return must(counted_alloc_aligned(n, a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return must(counted_alloc_aligned(n, a)); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return counted_alloc_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept { return counted_alloc_aligned(n, a); }

void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

// The number of operator new calls (any thread) while f runs.
template <class F>
static long count_news(F&& f) {
    g_news.store(0);
    g_armed.store(true, std::memory_order_seq_cst);
    f();
    g_armed.store(false, std::memory_order_seq_cst);
    return g_news.load();
}

// ---- a small random model, built in memory --------------------------------------------------------
namespace ci = celerinfer;

struct OwnedModel {
    std::map<std::string, std::vector<float>> tensors;  // owns what the ModelWeights views point at
    std::map<std::string, std::vector<uint8_t>> stored;  // and the stored forms (bf16 / q8 models)
    std::unique_ptr<ci::ModelWeights> model;
};

// A reducible weight's stored form, and its float32 decoding written over v (the model's float32
// view must be the decoding). bf16: the top half of each float; q8: one power-of-two scale per block.
static std::vector<uint8_t> store(ci::WeightFormat f, std::vector<float>& v, int out, int in) {
    std::vector<uint8_t> bytes(ci::stored_bytes(f, out, in), 0);
    for (int o = 0; o < out; ++o)
        for (int k = 0; k < in; ++k) {
            float& w = v[size_t(o) * in + k];
            if (f == ci::WeightFormat::BF16) {
                uint32_t bits;
                std::memcpy(&bits, &w, 4);
                const uint16_t half = uint16_t(bits >> 16);
                std::memcpy(&bytes[(size_t(o) * in + k) * 2], &half, 2);
                bits = uint32_t(half) << 16;
                std::memcpy(&w, &bits, 4);
            } else {
                uint8_t* block = &bytes[size_t(o) * ci::stored_bytes(f, 1, in) + size_t(k / 32) * 34];
                block[0] = 0x00, block[1] = 0x1C;  // float16 2^-8
                const int q = std::max(-127, std::min(127, int(std::lround(w * 256.0f))));
                block[2 + k % 32] = uint8_t(int8_t(q));
                w = float(q) / 256.0f;
            }
        }
    return bytes;
}

static OwnedModel make_model(const ci::Config& c, unsigned seed, ci::WeightFormat format = ci::WeightFormat::F32) {
    OwnedModel out;
    out.model = std::make_unique<ci::ModelWeights>(c);
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    auto add = [&](const std::string& name, std::vector<int64_t> shape, bool ones = false) {
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        std::vector<float>& v = out.tensors[name];
        v.resize(n);
        for (float& x : v) x = ones ? 1.0f + normal(rng) : normal(rng);
        out.model->bind(name, v.data(), shape);
    };
    const int64_t hd = c.head_dim;
    ci::for_each_weight(c, [&](const ci::WeightRow& row, int layer, int index) {
        const std::string name = ci::weight_name(row, layer, index);
        add(name, ci::row_shape(c, row), row.rank == 1);  // norm weights around 1
        if (format != ci::WeightFormat::F32 && row.reducible && ci::has_feature(c, row.reduced_when)) {
            const std::vector<int64_t> shape = ci::row_shape(c, row);
            std::vector<uint8_t>& bytes = out.stored[name] = store(format, out.tensors[name], int(shape[0]), int(shape[1]));
            out.model->bind_stored(name, format, bytes.data(), bytes.size());
        }
    });
    // RoPE cache as MiniMind computes it (theta 1e6), frequency i at columns i and i + hd/2.
    std::vector<float>& cos = out.tensors["rope.cos"];
    std::vector<float>& sin = out.tensors["rope.sin"];
    cos.resize(size_t(c.max_pos) * hd);
    sin.resize(cos.size());
    for (int pos = 0; pos < c.max_pos; ++pos)
        for (int i = 0; i < hd / 2; ++i) {
            const double angle = pos / std::pow(1.0e6, 2.0 * i / double(hd));
            for (int col : {i, i + int(hd) / 2}) {
                cos[size_t(pos) * hd + col] = float(std::cos(angle));
                sin[size_t(pos) * hd + col] = float(std::sin(angle));
            }
        }
    out.model->bind("rope.cos", cos.data(), {c.max_pos, hd});
    out.model->bind("rope.sin", sin.data(), {c.max_pos, hd});
    out.model->check_complete();
    return out;
}

// ---- inputs: every array of every call made before the counter is armed ------------------------
struct Inputs {
    int B, T, max_len;
    std::vector<int64_t> prompt_ids, prompt_mask;  // [B, T]
    std::vector<std::vector<int64_t>> step_ids;    // per decode step: [B, 1]
    std::vector<std::vector<int64_t>> step_masks;  // per decode step: [B, start + 1]
    std::vector<float> logits;                     // [B, T, vocab], big enough for every call
};

static Inputs make_inputs(const ci::Config& c, int B, int T, int max_len, unsigned seed) {
    Inputs in{B, T, max_len, {}, {}, {}, {}, {}};
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int64_t> token(0, c.vocab - 1);
    const int pad = 2;  // batch row 1 is left-padded: the masked paths run too
    auto mask_value = [&](int b, int pos) { return int64_t(b == 1 && pos < pad ? 0 : 1); };
    for (int b = 0; b < B; ++b)
        for (int i = 0; i < T; ++i) {
            in.prompt_ids.push_back(token(rng));
            in.prompt_mask.push_back(mask_value(b, i));
        }
    for (int start = T; start < max_len; ++start) {
        std::vector<int64_t> ids, mask;
        for (int b = 0; b < B; ++b) ids.push_back(token(rng));
        for (int b = 0; b < B; ++b)
            for (int pos = 0; pos <= start; ++pos) mask.push_back(mask_value(b, pos));
        in.step_ids.push_back(std::move(ids));
        in.step_masks.push_back(std::move(mask));
    }
    in.logits.assign(size_t(B) * T * c.vocab, 0.0f);
    return in;
}

// ---- the runs -------------------------------------------------------------------------------------
struct Case {
    const char* name;
    ci::Config config;
};

static ci::Config base_config() {
    ci::Config c;
    // Big enough that the fast set's GEMMs (in * out * 4 > 128 KB) and prefill attention
    // (B * heads * T * P * hd > 1e5) are dispatched to the thread pool.
    c.hidden = 128; c.layers = 2; c.heads = 8; c.kv_heads = 2; c.head_dim = 16;
    c.vocab = 256; c.intermediate = 384; c.max_pos = 64;
    c.eps = 1e-6f;
    return c;
}

int main() {
    try {
        if (ci::num_threads() < 2) ci::set_num_threads(2);  // the pool must take part even on one core
        std::vector<Case> cases;
        cases.push_back({"dense", base_config()});
        ci::Config qk = base_config();
        qk.qk_norm = true; qk.rope_interleaved = true; qk.tied = false;
        cases.push_back({"qk_norm", qk});
        ci::Config moe = base_config();
        moe.moe = true; moe.experts = 4; moe.topk = 2; moe.shared_experts = 1; moe.moe_intermediate = 256;
        cases.push_back({"moe", moe});

        const int B = 2, T = 24, max_len = 32;
        int failures = 0;
        std::printf("threads %d\n", ci::num_threads());
        for (const std::string& set_name : ci::kernel_set_names()) {
            for (const Case& cs : cases) {
                OwnedModel owned = make_model(cs.config, 1234, ci::make_kernels(set_name, nullptr)->weight_format());
                const ci::ModelWeights& m = *owned.model;
                const std::unique_ptr<ci::KernelSet> set = ci::make_kernels(set_name, &m);
                Inputs in = make_inputs(cs.config, B, T, max_len, 99);
                ci::Workspace prefill_ws(cs.config, B, T);
                ci::Workspace decode_ws(cs.config, B, T, max_len);

                auto prefill = [&] {
                    ci::run_forward(*set, m, in.prompt_ids.data(), in.prompt_mask.data(), T, 0, prefill_ws,
                                    in.logits.data(), nullptr);
                };
                auto decode = [&] {
                    ci::run_forward(*set, m, in.prompt_ids.data(), in.prompt_mask.data(), T, 0, decode_ws,
                                    in.logits.data(), nullptr);
                    for (size_t s = 0; s < in.step_ids.size(); ++s)
                        ci::run_forward(*set, m, in.step_ids[s].data(), in.step_masks[s].data(), 1, T + int(s),
                                        decode_ws, in.logits.data(), nullptr);
                };
                // Warm-up (not counted, reported): the first call on a fresh workspace may size
                // a kernel's scratch (the fast attention's per-thread score tiles).
                const long first_prefill = count_news(prefill), first_decode = count_news(decode);
                std::printf("%s %s warmup allocations=%ld (prefill %ld, decode %ld)\n", set_name.c_str(), cs.name,
                            first_prefill + first_decode, first_prefill, first_decode);
                const long n_prefill = count_news(prefill);
                const long n_decode = count_news(decode);
                std::printf("%s %s prefill allocations=%ld\n", set_name.c_str(), cs.name, n_prefill);
                std::printf("%s %s decode allocations=%ld (%zu steps after a %d-token prefill)\n", set_name.c_str(),
                            cs.name, n_decode, in.step_ids.size(), T);
                failures += n_prefill > 0;
                failures += n_decode > 0;

                // The counter counts: a traced forward allocates (names, shapes, copies of values).
                ci::TraceRecorder recorder;
                const long n_traced = count_news([&] {
                    ci::run_forward(*set, m, in.prompt_ids.data(), in.prompt_mask.data(), T, 0, prefill_ws,
                                    in.logits.data(), &recorder);
                });
                std::printf("%s %s traced allocations=%ld (%zu trace points)\n", set_name.c_str(), cs.name, n_traced,
                            recorder.size());
                failures += n_traced <= 0;
            }
        }
        std::printf(failures ? "FAIL: %d counts wrong\n" : "OK\n", failures);
        return failures ? 1 : 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
}
