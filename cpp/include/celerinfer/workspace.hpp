// Every buffer a forward needs, allocated once up front (a forward allocates nothing), each with a
// guard tail: a kernel that writes past the end of a buffer overwrites its guard, and
// check_guards() names the buffer (llama.cpp's test-backend-ops sentinels, checked every call).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.hpp"
#include "model.hpp"
#include "packing.hpp"

namespace CELERINFER_NS {

class GuardedBuffer {
public:
    static constexpr size_t kGuard = 16;

    GuardedBuffer() : sentinel_(next_sentinel()) { resize(0); }
    void resize(size_t n) {
        n_ = n;
        v_.assign(n + kGuard, 0.0f);
        for (size_t i = 0; i < kGuard; ++i) std::memcpy(&v_[n + i], &sentinel_, sizeof sentinel_);
    }
    float* data() { return v_.data(); }
    const float* data() const { return v_.data(); }
    size_t size() const { return n_; }
    float& operator[](size_t i) { return v_[i]; }
    const float& operator[](size_t i) const { return v_[i]; }
    bool intact() const {
        for (size_t i = 0; i < kGuard; ++i)
            if (std::memcmp(&v_[n_ + i], &sentinel_, sizeof sentinel_) != 0) return false;
        return true;
    }

private:
    // A quiet NaN with a payload of its own per buffer: a loop that runs past the end of its inputs
    // and its output copies the inputs' guards (a NaN keeps its payload through arithmetic), and
    // only distinct payloads tell them apart from the output's own.
    static uint32_t next_sentinel() {
        static std::atomic<uint32_t> count{0};
        return 0x7fc10000u | (count.fetch_add(1, std::memory_order_relaxed) & 0xffffu);
    }
    uint32_t sentinel_;
    size_t n_ = 0;
    std::vector<float, fast::HugePageAllocator<float>> v_;  // the KV cache streams at decode, as weights do
};

// Up to S new tokens per call for a batch of B, and a KV cache of max_len positions (prefill
// alone: max_len == S).
// The KV cache's number format, an engine choice (not a model-file field): F32 keeps each key and
// value as computed; BF16 rounds each new key and value to bfloat16 as it joins the cache (stored
// in the float32 cache for now: the memory is not halved yet).
enum class KVFormat { F32, BF16 };

struct Workspace {
    int B, S, max_len;
    int layers = 0;
    KVFormat kv_format = KVFormat::F32;
    size_t kv_dim = 0;
    GuardedBuffer h, x, q, k, v, scores, context, attn_out, gate, up, act, mlp_out;
    GuardedBuffer k_cache, v_cache;  // [layers][B][max_len][kv_dim]
    int kt_stride = 0;               // max_len rounded up to 16
    GuardedBuffer kt_cache;          // fast kernels: keys transposed, [layers][B][kv_heads][hd][kt_stride]
    GuardedBuffer attn_scratch;      // fast attention: a score tile per thread
    std::vector<int> group_heads;    // fast attention: query heads grouped by the kv head they read
    GuardedBuffer router_probs, topk_weight, topk_idx_f;  // MoE only
    std::vector<int64_t> topk_idx;
    GuardedBuffer expert_in, expert_out;  // MoE: the rows routed to one expert
    std::vector<int> expert_rows;
    GuardedBuffer trace_scores, trace_probs;  // attention's records, sized on the first traced call

    Workspace(const Config& c, int B_, int S_, int max_len_ = 0) : B(B_), S(S_), max_len(max_len_ ? max_len_ : S_) {
        CI_CHECK(B > 0 && S > 0, "workspace: batch and sequence length must be >= 1");
        CI_CHECK(max_len >= S, "workspace: max_len ", max_len, " is shorter than S ", S);
        CI_CHECK(max_len <= c.max_pos, "sequence length ", max_len, " is longer than max_position_embeddings ", c.max_pos);
        const size_t N = size_t(B) * S, H = c.hidden;
        layers = c.layers;
        kv_dim = c.kv_dim();
        for (GuardedBuffer* b : {&h, &x, &attn_out, &mlp_out}) b->resize(N * H);
        q.resize(N * c.q_dim()); k.resize(N * kv_dim); v.resize(N * kv_dim);
        context.resize(N * c.q_dim());
        scores.resize(size_t(B) * c.heads * S * max_len);
        k_cache.resize(size_t(layers) * B * max_len * kv_dim);
        v_cache.resize(k_cache.size());
        kt_stride = (max_len + 15) / 16 * 16;
        kt_cache.resize(size_t(layers) * B * kv_dim * kt_stride);
        group_heads.resize(c.heads);
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
    // A buffer of at least n floats for a kernel's own scratch (grown, never shrunk).
    float* scratch(size_t n) {
        if (attn_scratch.size() < n) attn_scratch.resize(n);
        return attn_scratch.data();
    }

    // Throw naming the first buffer whose guard was overwritten.
    void check_guards() const {
        const std::pair<const char*, const GuardedBuffer*> all[] = {
            {"h", &h}, {"x", &x}, {"q", &q}, {"k", &k}, {"v", &v}, {"scores", &scores}, {"context", &context},
            {"attn_out", &attn_out}, {"gate", &gate}, {"up", &up}, {"act", &act}, {"mlp_out", &mlp_out},
            {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"kt_cache", &kt_cache}, {"attn_scratch", &attn_scratch},
            {"router_probs", &router_probs}, {"topk_weight", &topk_weight}, {"topk_idx_f", &topk_idx_f},
            {"expert_in", &expert_in}, {"expert_out", &expert_out}, {"trace_scores", &trace_scores},
            {"trace_probs", &trace_probs}};
        for (const auto& [name, buffer] : all)
            CI_CHECK(buffer->intact(), "out-of-bounds write: a kernel wrote past the end of workspace buffer '", name,
                     "' (", buffer->size(), " floats)");
    }
};

}  // namespace CELERINFER_NS
