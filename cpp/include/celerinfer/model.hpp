// The model: its config and a view of its weights. Weights are not owned: they point into
// buffers the caller keeps alive (numpy arrays from Python, vectors in base_line_micro).
// Matrices are in nn.Linear [out_features, in_features] order, contiguous row-major.
#pragma once
#include <algorithm>
#include <cstddef>
#include <initializer_list>
#include <cstdint>
#include <string>
#include <vector>

#include "check.hpp"

namespace CELERINFER_NS {

enum class TopkRenorm { Never = 0, Always = 1, WhenKAbove1 = 2 };

struct Config {
    int hidden = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
    int intermediate = 0, max_pos = 0;
    float eps = 1e-5f;
    bool qk_norm = false;
    bool rope_interleaved = false;  // pairs (2i, 2i+1) instead of (i, i + head_dim/2)
    bool tied = true;               // lm_head is the embedding
    bool moe = false;
    int experts = 0, topk = 0, shared_experts = 0, moe_intermediate = 0;
    TopkRenorm topk_renorm = TopkRenorm::Always;

    int q_dim() const { return heads * head_dim; }
    int kv_dim() const { return kv_heads * head_dim; }
    bool renormalises_topk() const {
        return topk_renorm == TopkRenorm::Always || (topk_renorm == TopkRenorm::WhenKAbove1 && topk > 1);
    }
    void validate() const {
        CI_CHECK(hidden > 0 && layers > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && vocab > 0 &&
                 intermediate > 0 && max_pos > 0, "config: every size must be >= 1");
        CI_CHECK(heads % kv_heads == 0, "config: heads=", heads, " is not a multiple of kv_heads=", kv_heads);
        CI_CHECK(head_dim % 2 == 0, "config: head_dim=", head_dim, " must be even for RoPE");
        if (moe) {
            CI_CHECK(experts > 0 && topk > 0 && topk <= experts, "config: need 1 <= topk=", topk,
                     " <= experts=", experts);
            CI_CHECK(moe_intermediate > 0 && shared_experts >= 0, "config: bad MoE sizes");
        }
    }
};

struct FFNWeights {  // SwiGLU: down(silu(gate(x)) * up(x))
    const float* gate = nullptr;  // [I, H]
    const float* up = nullptr;    // [I, H]
    const float* down = nullptr;  // [H, I]
};

struct LayerWeights {
    const float* input_norm = nullptr;  // [H]
    const float* wq = nullptr;          // [heads*hd, H]
    const float* wk = nullptr;          // [kv_heads*hd, H]
    const float* wv = nullptr;          // [kv_heads*hd, H]
    const float* wo = nullptr;          // [H, heads*hd]
    const float* q_norm = nullptr;      // [hd], qk_norm only
    const float* k_norm = nullptr;      // [hd], qk_norm only
    const float* post_norm = nullptr;   // [H]
    FFNWeights ffn;                     // dense layers
    const float* router = nullptr;      // [experts, H], MoE layers
    std::vector<FFNWeights> experts, shared_experts;
};

struct Model {
    Config config;
    const float* embed = nullptr;       // [vocab, H]
    std::vector<LayerWeights> layers;
    const float* final_norm = nullptr;  // [H]
    const float* lm_head = nullptr;     // [vocab, H]; the embedding when tied
    const float* rope_cos = nullptr;    // [max_pos, hd], frequency i at columns i and i + hd/2
    const float* rope_sin = nullptr;

    explicit Model(const Config& c) : config(c) {
        config.validate();
        layers.resize(config.layers);
        for (auto& layer : layers) {
            layer.experts.resize(config.moe ? config.experts : 0);
            layer.shared_experts.resize(config.moe ? config.shared_experts : 0);
        }
    }

    // Point the tensor named by MiniMind's state-dict key (or "rope.cos" / "rope.sin") at data.
    // shape must be the one the config implies; unknown names and wrong shapes throw.
    void bind(const std::string& name, const float* data, const std::vector<int64_t>& shape) {
        CI_CHECK(data != nullptr, "tensor '", name, "': null data");
        const Config& c = config;
        const int64_t H = c.hidden;
        auto slot = [&](const float*& target, std::initializer_list<int64_t> expected) {
            if (!std::equal(shape.begin(), shape.end(), expected.begin(), expected.end()))
                fail("tensor '", name, "' has shape ", shape_str(shape), ", the config implies ",
                     shape_str(std::vector<int64_t>(expected)));
            target = data;
        };
        if (name == "model.embed_tokens.weight") return slot(embed, {c.vocab, H});
        if (name == "model.norm.weight") return slot(final_norm, {H});
        if (name == "lm_head.weight") return slot(lm_head, {c.vocab, H});
        if (name == "rope.cos") return slot(rope_cos, {c.max_pos, c.head_dim});
        if (name == "rope.sin") return slot(rope_sin, {c.max_pos, c.head_dim});
        const std::string prefix = "model.layers.";
        CI_CHECK(name.compare(0, prefix.size(), prefix) == 0, "unknown tensor '", name, "'");
        size_t pos = prefix.size(), end = name.find('.', pos);
        CI_CHECK(end != std::string::npos, "unknown tensor '", name, "'");
        int l = parse_index(name, pos, end);
        CI_CHECK(l >= 0 && l < c.layers, "tensor '", name, "': layer ", l, " out of range (", c.layers, " layers)");
        LayerWeights& L = layers[l];
        const std::string rest = name.substr(end + 1);
        const int64_t q = c.q_dim(), kv = c.kv_dim(), I = c.intermediate, hd = c.head_dim;
        if (rest == "input_layernorm.weight") return slot(L.input_norm, {H});
        if (rest == "post_attention_layernorm.weight") return slot(L.post_norm, {H});
        if (rest == "self_attn.q_proj.weight") return slot(L.wq, {q, H});
        if (rest == "self_attn.k_proj.weight") return slot(L.wk, {kv, H});
        if (rest == "self_attn.v_proj.weight") return slot(L.wv, {kv, H});
        if (rest == "self_attn.o_proj.weight") return slot(L.wo, {H, q});
        if (c.qk_norm && rest == "self_attn.q_norm.weight") return slot(L.q_norm, {hd});
        if (c.qk_norm && rest == "self_attn.k_norm.weight") return slot(L.k_norm, {hd});
        if (!c.moe) {
            if (rest == "mlp.gate_proj.weight") return slot(L.ffn.gate, {I, H});
            if (rest == "mlp.up_proj.weight") return slot(L.ffn.up, {I, H});
            if (rest == "mlp.down_proj.weight") return slot(L.ffn.down, {H, I});
            fail("unknown tensor '", name, "'");
        }
        if (rest == "mlp.gate.weight") return slot(L.router, {c.experts, H});
        for (const char* group : {"mlp.experts.", "mlp.shared_experts."}) {
            const std::string g = group;
            if (rest.compare(0, g.size(), g) != 0) continue;
            size_t e_end = rest.find('.', g.size());
            CI_CHECK(e_end != std::string::npos, "unknown tensor '", name, "'");
            int e = parse_index(rest, g.size(), e_end);
            auto& list = g == "mlp.experts." ? L.experts : L.shared_experts;
            CI_CHECK(e >= 0 && e < int(list.size()), "tensor '", name, "': expert ", e, " out of range");
            const std::string proj = rest.substr(e_end + 1);
            const int64_t Im = c.moe_intermediate;
            if (proj == "gate_proj.weight") return slot(list[e].gate, {Im, H});
            if (proj == "up_proj.weight") return slot(list[e].up, {Im, H});
            if (proj == "down_proj.weight") return slot(list[e].down, {H, Im});
        }
        fail("unknown tensor '", name, "'");
    }

    // Throw naming the first tensor that was never bound.
    void check_complete() const {
        auto need = [](const float* p, const std::string& what) {
            CI_CHECK(p != nullptr, "missing tensor '", what, "'");
        };
        need(embed, "model.embed_tokens.weight");
        need(final_norm, "model.norm.weight");
        need(rope_cos, "rope.cos");
        need(rope_sin, "rope.sin");
        if (!config.tied) need(lm_head, "lm_head.weight");
        for (int l = 0; l < config.layers; ++l) {
            const LayerWeights& L = layers[l];
            const std::string p = "model.layers." + std::to_string(l) + ".";
            need(L.input_norm, p + "input_layernorm.weight");
            need(L.wq, p + "self_attn.q_proj.weight");
            need(L.wk, p + "self_attn.k_proj.weight");
            need(L.wv, p + "self_attn.v_proj.weight");
            need(L.wo, p + "self_attn.o_proj.weight");
            if (config.qk_norm) {
                need(L.q_norm, p + "self_attn.q_norm.weight");
                need(L.k_norm, p + "self_attn.k_norm.weight");
            }
            need(L.post_norm, p + "post_attention_layernorm.weight");
            auto need_ffn = [&](const FFNWeights& f, const std::string& q) {
                need(f.gate, q + "gate_proj.weight");
                need(f.up, q + "up_proj.weight");
                need(f.down, q + "down_proj.weight");
            };
            if (!config.moe) {
                need_ffn(L.ffn, p + "mlp.");
                continue;
            }
            need(L.router, p + "mlp.gate.weight");
            for (size_t e = 0; e < L.experts.size(); ++e) need_ffn(L.experts[e], p + "mlp.experts." + std::to_string(e) + ".");
            for (size_t s = 0; s < L.shared_experts.size(); ++s)
                need_ffn(L.shared_experts[s], p + "mlp.shared_experts." + std::to_string(s) + ".");
        }
    }

    const float* head() const { return config.tied ? embed : lm_head; }

    // f(W, out, in) for every nn.Linear weight of the model (kernel sets pack them once).
    template <class F>
    void for_each_linear(F&& f) const {
        const Config& c = config;
        auto ffn = [&](const FFNWeights& w, int inter) {
            f(w.gate, inter, c.hidden); f(w.up, inter, c.hidden); f(w.down, c.hidden, inter);
        };
        for (const LayerWeights& L : layers) {
            f(L.wq, c.q_dim(), c.hidden); f(L.wk, c.kv_dim(), c.hidden); f(L.wv, c.kv_dim(), c.hidden);
            f(L.wo, c.hidden, c.q_dim());
            if (!c.moe) {
                ffn(L.ffn, c.intermediate);
                continue;
            }
            f(L.router, c.experts, c.hidden);
            for (const FFNWeights& e : L.experts) ffn(e, c.moe_intermediate);
            for (const FFNWeights& e : L.shared_experts) ffn(e, c.moe_intermediate);
        }
        f(head(), c.vocab, c.hidden);
    }

private:
    static std::string shape_str(const std::vector<int64_t>& shape) {
        std::string out = "[";
        for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
        return out + "]";
    }
    static int parse_index(const std::string& s, size_t begin, size_t end) {
        CI_CHECK(end > begin && end - begin < 9, "bad index in tensor name '", s, "'");
        int v = 0;
        for (size_t i = begin; i < end; ++i) {
            CI_CHECK(s[i] >= '0' && s[i] <= '9', "bad index in tensor name '", s, "'");
            v = v * 10 + (s[i] - '0');
        }
        return v;
    }
};

}  // namespace CELERINFER_NS
