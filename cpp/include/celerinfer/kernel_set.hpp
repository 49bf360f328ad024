// Kernel sets by name: the one place a set is registered, for Python (cppyy), base_line_micro and
// the op-by-op kernel tests alike.
//
// A kernel set is a struct with the members of ReadableKernels (readable.hpp): prepare_linear,
// linear, rmsnorm, swiglu, store_kv and attention (which calls the AttentionTaps on every scores
// and probs row it computes). Register it once, after its definition:
//
//     struct MyKernels : ReadableKernels { void linear(...) const { ... } };
//     CELERINFER_REGISTER_KERNELS(MyKernels, "mine");
//
// A set for bf16 / q8 weights (reduced.hpp) also declares `static constexpr WeightFormat weight_format`
// and a prepare_linear(W, out, in, const StoredMatrix*) that receives each weight's stored form
// (nullptr for a weight every model keeps float32); it refuses a model without stored weights of
// its format. Sets without that member read float32 (WeightFormat::F32) and run any model.
//
// and every tool can run it by name: load_native(...).prepare(model, "mine"), `--kernels mine`,
// tests/test_kernels.py, the debugger's trace.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "check.hpp"
#include "fast.hpp"
#include "forward.hpp"
#include "model.hpp"
#include "readable.hpp"
#include "reduced.hpp"
#include "trace.hpp"
#include "workspace.hpp"

namespace CELERINFER_NS {

// A kernel set behind one interface: the whole forward, and each op on its own (for tests).
struct KernelSet {
    virtual ~KernelSet() = default;
    virtual void prepare(const ModelWeights& m) = 0;  // every linear weight of m, before its first forward
    virtual void prepare_linear(const float* W, int out, int in) = 0;
    // One weight with its stored form (the op tests): bytes checked as bind_stored checks them.
    virtual void prepare_linear_stored(const float* W, int out, int in, WeightFormat format, const void* data,
                                       size_t bytes) = 0;
    virtual WeightFormat weight_format() const = 0;  // what the set reads: F32, or a model's stored BF16/Q8
    // logits_to_keep: as forward_tokens (forward.hpp): 0 = every position's logits, L = the last L.
    virtual void forward(const ModelWeights& m, const int64_t* ids, const int64_t* mask, int S, int start, Workspace& ws,
                         float* logits, TraceSink* trace, int logits_to_keep) const = 0;
    virtual void linear(float* y, const float* x, const float* W, int rows, int in, int out) const = 0;
    // Several linears of one x as the forward runs them (forward.hpp's linears: fused or one by one).
    virtual void linears(const float* x, int rows, int in, const LinearOut* outs, int n) const = 0;
    virtual void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const = 0;
    virtual void swiglu(float* act, const float* gate, const float* up, size_t n) const = 0;
    virtual void store_kv(int layer, const float* k, const float* v, const AttnDims& d, Workspace& ws) const = 0;
    virtual void attention(float* context, const float* q, int layer, const int64_t* mask, const AttnDims& d,
                           Workspace& ws, const AttentionTaps& taps) const = 0;
};

// Does kernel set K take stored weights (a prepare_linear(W, out, in, const StoredMatrix*))?
template <class K, class = void>
struct takes_stored : std::false_type {};
template <class K>
struct takes_stored<K, std::void_t<decltype(std::declval<K&>().prepare_linear(
                           static_cast<const float*>(nullptr), 0, 0, static_cast<const StoredMatrix*>(nullptr)))>>
    : std::true_type {};

template <class K>
struct KernelSetOf final : KernelSet {
    K k;
    void prepare(const ModelWeights& m) override {
        if constexpr (K::weight_format != WeightFormat::F32)
            CI_CHECK(m.stored_format == K::weight_format, "a ", weight_format_name(K::weight_format),
                     " kernel set needs a model whose weights are stored in ", weight_format_name(K::weight_format),
                     "; this model's are ", weight_format_name(m.stored_format), " (convert it: model.as_format('",
                     weight_format_name(K::weight_format), "'))");
        m.for_each_linear([&](const float* W, int out, int in) { prepare_one(W, out, in, m.stored_of(W)); });
    }
    void prepare_one(const float* W, int out, int in, const StoredMatrix* s) {
        if constexpr (takes_stored<K>::value) k.prepare_linear(W, out, in, s);
        else k.prepare_linear(W, out, in);  // a float32 set reads the float32 decoding
    }
    void prepare_linear(const float* W, int out, int in) override { k.prepare_linear(W, out, in); }
    void prepare_linear_stored(const float* W, int out, int in, WeightFormat format, const void* data,
                               size_t bytes) override {
        CI_CHECK(data != nullptr && bytes == stored_bytes(format, out, in), "stored ", weight_format_name(format), " [",
                 out, ", ", in, "]: ", bytes, " bytes, expected ", stored_bytes(format, out, in));
        const StoredMatrix s{format, out, in, data, bytes};
        prepare_one(W, out, in, &s);
    }
    WeightFormat weight_format() const override { return K::weight_format; }
    void forward(const ModelWeights& m, const int64_t* ids, const int64_t* mask, int S, int start, Workspace& ws,
                 float* logits, TraceSink* trace, int logits_to_keep) const override {
        forward_tokens(m, k, ids, mask, S, start, ws, logits, trace, logits_to_keep);
    }
    void linear(float* y, const float* x, const float* W, int rows, int in, int out) const override {
        k.linear(y, x, W, rows, in, out);
    }
    void linears(const float* x, int rows, int in, const LinearOut* outs, int n) const override {
        CELERINFER_NS::linears(k, x, rows, in, outs, n);
    }
    void rmsnorm(float* y, const float* x, const float* w, int rows, int n, float eps) const override {
        k.rmsnorm(y, x, w, rows, n, eps);
    }
    void swiglu(float* act, const float* gate, const float* up, size_t n) const override { k.swiglu(act, gate, up, n); }
    void store_kv(int layer, const float* kk, const float* v, const AttnDims& d, Workspace& ws) const override {
        k.store_kv(layer, kk, v, d, ws);
    }
    void attention(float* context, const float* q, int layer, const int64_t* mask, const AttnDims& d, Workspace& ws,
                   const AttentionTaps& taps) const override {
        k.attention(context, q, layer, mask, d, ws, taps);
    }
};

using KernelFactory = std::unique_ptr<KernelSet> (*)();

// One registered set. `factory` is null while a built-in set declared for cling (below) waits for
// its first use; `type` names its struct then, for the Python engine to compile it.
struct KernelEntry {
    std::string name;
    KernelFactory factory;
    WeightFormat format;
    std::string type;
};

inline std::vector<KernelEntry>& kernel_registry() {
    static std::vector<KernelEntry> registry;
    return registry;
}

inline KernelEntry* find_kernels(const std::string& name) {
    for (KernelEntry& entry : kernel_registry())
        if (entry.name == name) return &entry;
    return nullptr;
}

template <class K>
inline KernelFactory factory_of() {
    return [] { return std::unique_ptr<KernelSet>(new KernelSetOf<K>()); };
}

template <class K>
inline bool register_kernels(const char* name) {
    CI_CHECK(find_kernels(name) == nullptr, "kernel set '", name, "' is registered twice");
    kernel_registry().push_back({name, factory_of<K>(), K::weight_format, ""});
    return true;
}

#define CELERINFER_REGISTER_KERNELS(Struct, name) \
    inline const bool celerinfer_registered_##Struct = ::CELERINFER_NS::register_kernels<Struct>(name)

// Under cling (cppyy), instantiating KernelSetOf<K> compiles the whole forward for K: the four
// bf16/q8 sets doubled every load_native (7.5 -> 16 s, measured), and the readable set is 0.45 s of
// a 3.3 s load that most commands (cpp-forward, bench, the explorer's fast path) never use. So
// there every built-in set but fast is declared by name and format only, and NativeEngine compiles
// one (define_kernels) the first time it is asked for; everywhere else (g++: base_line_micro, the
// C++ tests) they register as usual.
template <class K>
inline bool declare_kernels(const char* name, const char* type) {
    CI_CHECK(find_kernels(name) == nullptr, "kernel set '", name, "' is registered twice");
    kernel_registry().push_back({name, nullptr, K::weight_format, type});
    return true;
}

template <class K>
inline bool define_kernels(const char* name) {
    KernelEntry* entry = find_kernels(name);
    CI_CHECK(entry != nullptr && entry->type.size(), "kernel set '", name, "' is not a declared, uncompiled set");
    entry->factory = factory_of<K>();
    entry->type.clear();
    return true;
}

// The struct a declared set still needs compiled ("" when it is ready, or unknown).
inline std::string kernel_set_pending_type(const std::string& name) {
    const KernelEntry* entry = find_kernels(name);
    return entry ? entry->type : std::string();
}

#if defined(__CLING__)
#define CELERINFER_BUILTIN_KERNELS(Struct, name) \
    inline const bool celerinfer_registered_##Struct = ::CELERINFER_NS::declare_kernels<Struct>(name, #Struct)
#else
#define CELERINFER_BUILTIN_KERNELS(Struct, name) CELERINFER_REGISTER_KERNELS(Struct, name)
#endif

inline std::vector<std::string> kernel_set_names() {
    std::vector<std::string> names;
    for (const auto& entry : kernel_registry()) names.push_back(entry.name);
    return names;
}

// The kernel set `name`, prepared for model m (or for nothing yet: m == nullptr, as the op tests use).
inline std::unique_ptr<KernelSet> make_kernels(const std::string& name, const ModelWeights* m) {
    const KernelEntry* entry = find_kernels(name);
    if (!entry) {
        std::string known;
        for (const auto& e : kernel_registry()) known += (known.empty() ? "" : ", ") + e.name;
        fail("unknown kernel set '", name, "'; registered: ", known);
    }
    CI_CHECK(entry->factory != nullptr, "kernel set '", name, "' is declared but not compiled yet (",
             entry->type, "): NativeEngine compiles it on first use");
    const WeightFormat f = entry->format;
    if (m && f != WeightFormat::F32 && m->stored_format != f)
        fail("kernel set '", name, "' reads ", weight_format_name(f), " weights; this model stores ",
             weight_format_name(m->stored_format), " (convert it first: model.as_format('", weight_format_name(f),
             "') in Python, `celerinfer-lab quantize --to ", weight_format_name(f), "` for a file)");
    std::unique_ptr<KernelSet> set = entry->factory();
    if (m) set->prepare(*m);
    return set;
}

// The entry point every caller uses: one forward, then the workspace guards are checked, so an
// out-of-bounds write is an error naming the buffer instead of silent corruption. logits holds
// [B, L, vocab]: L = S, or logits_to_keep when that is between 1 and S (forward_tokens).
inline void run_forward(const KernelSet& K, const ModelWeights& m, const int64_t* ids, const int64_t* mask, int S, int start,
                        Workspace& ws, float* logits, TraceSink* trace, int logits_to_keep = 0) {
    if (trace) trace->begin();  // a timing sink starts its clock here
    K.forward(m, ids, mask, S, start, ws, logits, trace, logits_to_keep);
    ws.check_guards();
}

// run_forward with its arguments bound once, for a caller that repeats the same call (Python's
// NativeModel.run in a timing loop): ten arguments converted by cppyy on every call cost ~2 us,
// a fifteenth of the tiny default model's forward. No trace (a traced call is not a timing loop).
struct BoundForward {
    const KernelSet* kernels;
    const ModelWeights* model;
    const int64_t* ids;
    const int64_t* mask;
    int S, start;
    Workspace* ws;
    float* logits;
    int logits_to_keep;
    BoundForward(const KernelSet& K, const ModelWeights& m, const int64_t* ids_, const int64_t* mask_, int S_,
                 int start_, Workspace& ws_, float* logits_, int keep)
        : kernels(&K), model(&m), ids(ids_), mask(mask_), S(S_), start(start_), ws(&ws_), logits(logits_),
          logits_to_keep(keep) {}
    void run() const { run_forward(*kernels, *model, ids, mask, S, start, *ws, logits, nullptr, logits_to_keep); }
};

// numpy's argmax of one row: the first maximum, or the first NaN (numpy takes NaN as the largest).
inline int64_t argmax_first(const float* row, int n) {
    int64_t best = 0;
    for (int i = 0; i < n; ++i) {
        if (std::isnan(row[i])) return i;
        if (row[i] > row[best]) best = i;
    }
    return best;
}

// Greedy decoding in one call: the prompt ids/mask [B, S] (mask: 1 = token, 0 = padding), then
// new_tokens - 1 forwards of one token each over ws's KV cache (ws.max_len >= S + new_tokens - 1);
// every choice is argmax_first of the last position's logits, as NativeModel.generate's Python
// loop chooses. tokens: [B, new_tokens]. step_end (nullptr, or new_tokens values): seconds from
// the call's start to the end of each forward and its choice (the prefill first).
// Why in C++: around each step the Python loop spent ~0.17 ms (fresh logits, guard check, argmax,
// the grown mask, the call's ten arguments), 17% of a minimind2-small q8 decode step.
inline void generate_greedy(const KernelSet& K, const ModelWeights& m, const int64_t* ids, const int64_t* mask, int S,
                            int new_tokens, Workspace& ws, int64_t* tokens, double* step_end) {
    const int B = ws.B, V = m.config.vocab;
    CI_CHECK(new_tokens >= 1, "generate: new_tokens must be >= 1, got ", new_tokens);
    CI_CHECK(S >= 1 && S <= ws.S, "generate: a prompt of ", S, " tokens, the workspace holds up to ", ws.S);
    CI_CHECK(int64_t(S) + new_tokens - 1 <= ws.max_len, "generate: ", S, " + ", new_tokens - 1,
             " positions exceed the workspace's KV cache of ", ws.max_len);
    const auto begin = std::chrono::steady_clock::now();
    GuardedBuffer logits;  // [B, 1, V]: the last position's only
    logits.resize(size_t(B) * V);
    const size_t P_max = size_t(S) + new_tokens - 1;
    std::vector<int64_t> masks[2] = {std::vector<int64_t>(B * P_max), std::vector<int64_t>(B * P_max)};  // two: grown alternately
    std::copy(mask, mask + size_t(B) * S, masks[0].begin());
    std::vector<int64_t> step_ids(B);
    const int64_t* new_ids = ids;
    for (int step = 0, start = 0, n = S; step < new_tokens; ++step) {
        const int64_t* step_mask = masks[step % 2].data();  // [B, start + n]
        std::fill(logits.data(), logits.data() + logits.size(), std::numeric_limits<float>::quiet_NaN());
        run_forward(K, m, new_ids, step_mask, n, start, ws, logits.data(), nullptr, 1);
        CI_CHECK(logits.intact(), "out-of-bounds write: the forward wrote past the end of the logits (",
                 logits.size(), " floats)");
        for (int b = 0; b < B; ++b)
            step_ids[b] = tokens[size_t(b) * new_tokens + step] = argmax_first(logits.data() + size_t(b) * V, V);
        if (step_end) step_end[step] = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
        if (step + 1 == new_tokens) break;
        const int P = start + n;  // the mask grows by one column of 1s: [B, P] -> [B, P + 1]
        int64_t* grown = masks[(step + 1) % 2].data();
        for (int b = 0; b < B; ++b) {
            std::copy(step_mask + size_t(b) * P, step_mask + size_t(b + 1) * P, grown + size_t(b) * (P + 1));
            grown[size_t(b) * (P + 1) + P] = 1;
        }
        start = P, n = 1, new_ids = step_ids.data();
    }
}

CELERINFER_BUILTIN_KERNELS(ReadableKernels, "readable");
CELERINFER_REGISTER_KERNELS(FastKernels, "fast");
CELERINFER_BUILTIN_KERNELS(ReadableBf16Kernels, "readable-bf16");
CELERINFER_BUILTIN_KERNELS(ReadableQ8Kernels, "readable-q8");
CELERINFER_BUILTIN_KERNELS(Bf16Kernels, "bf16");
CELERINFER_BUILTIN_KERNELS(Q8Kernels, "q8");

// The weight format kernel set `name` reads ("f32", "bf16", "q8").
inline std::string kernel_set_format(const std::string& name) {
    const KernelEntry* entry = find_kernels(name);
    CI_CHECK(entry != nullptr, "unknown kernel set '", name, "'");
    return weight_format_name(entry->format);
}

}  // namespace CELERINFER_NS
