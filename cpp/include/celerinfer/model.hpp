// ModelWeights: the C++ view of a model, its config and its weights (in Python a Model is the whole model
// file, inputs included). Weights are not owned: they point into buffers the caller keeps alive (numpy
// arrays from Python, vectors in base_line_micro).
// Matrices are in nn.Linear [out_features, in_features] order, contiguous row-major.
// Which weights a config implies, their names, shapes and slots: weight_table.hpp, generated from
// celerinfer_lab/schema.py; bind, check_complete and for_each_linear walk it (no list of names here).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <unordered_map>
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

// How a model stores its reducible weights (weight_table.hpp's `reducible` rows; celerinfer_lab/quantize.py):
// F32 as today; BF16 the top 16 bits of each float32 (uint16 [out, in]); Q8 llama.cpp's Q8_0 (per row,
// ceil(in/32) blocks of {float16 scale d, 32 int8 q}, weight = q * d, the last block zero-padded).
enum class WeightFormat { F32 = 0, BF16 = 1, Q8 = 2 };
constexpr int kQ8Block = 32, kQ8BlockBytes = 2 + kQ8Block;

inline const char* weight_format_name(WeightFormat f) {
    switch (f) {
        case WeightFormat::F32: return "f32";
        case WeightFormat::BF16: return "bf16";
        case WeightFormat::Q8: return "q8";
    }
    return "?";
}

// Bytes of a matrix [out, in] in a stored format.
inline size_t stored_bytes(WeightFormat f, int out, int in) {
    switch (f) {
        case WeightFormat::F32: return size_t(out) * in * 4;
        case WeightFormat::BF16: return size_t(out) * in * 2;
        case WeightFormat::Q8: return size_t(out) * ((in + kQ8Block - 1) / kQ8Block) * kQ8BlockBytes;
    }
    return 0;
}

// A reduced weight as the model stores it (not owned: the caller keeps data alive, as for bind).
struct StoredMatrix {
    WeightFormat format = WeightFormat::F32;
    int out = 0, in = 0;
    const void* data = nullptr;  // BF16: uint16 [out, in]; Q8: uint8 [out, ceil(in/32) * 34]
    size_t bytes = 0;
    const uint16_t* bf16() const { return static_cast<const uint16_t*>(data); }
    const uint8_t* q8() const { return static_cast<const uint8_t*>(data); }
};

struct WeightRow;  // a row of the weight table (weight_table.hpp, generated from celerinfer_lab/schema.py)

struct ModelWeights {
    Config config;
    const float* embed = nullptr;       // [vocab, H]
    std::vector<LayerWeights> layers;
    const float* final_norm = nullptr;  // [H]
    const float* lm_head = nullptr;     // [vocab, H]; the embedding when tied
    const float* rope_cos = nullptr;    // [max_pos, hd], frequency i at columns i and i + hd/2
    const float* rope_sin = nullptr;

    explicit ModelWeights(const Config& c) : config(c) {
        config.validate();
        layers.resize(config.layers);
        for (auto& layer : layers) {
            layer.experts.resize(config.moe ? config.experts : 0);
            layer.shared_experts.resize(config.moe ? config.shared_experts : 0);
        }
    }

    // Point the tensor named by MiniMind's state-dict key (or "rope.cos" / "rope.sin") at data.
    // shape must be the one the config implies; unknown names and wrong shapes throw.
    void bind(const std::string& name, const float* data, const std::vector<int64_t>& shape);

    // The stored form of a reducible weight (bind its float32 decoding first: every kernel set can
    // read that). All stored weights of a model share one format; bytes must be the shape's.
    void bind_stored(const std::string& name, WeightFormat format, const void* data, size_t bytes);

    // Throw naming the first tensor (in file order) that was never bound, or, in a model with
    // stored weights, the first reducible weight without its stored form.
    void check_complete() const;

    // The stored form of the weight whose float32 decoding is W (nullptr: W is float32 only).
    const StoredMatrix* stored_of(const float* W) const {
        auto it = stored.find(W);
        return it == stored.end() ? nullptr : &it->second;
    }
    WeightFormat stored_format = WeightFormat::F32;  // F32: no weight has a stored form
    std::unordered_map<const float*, StoredMatrix> stored;  // side table: float32 decoding -> stored form

    const float* head() const { return config.tied ? embed : lm_head; }

    // f(W, out, in) for every nn.Linear weight of the model (kernel sets pack them once).
    template <class F>
    void for_each_linear(F&& f) const;

private:
    struct Found {  // a row of the weight table and which copy of it a name refers to
        const WeightRow* row = nullptr;
        int layer = -1, index = -1;
    };
    Found find_weight(const std::string& name) const;
    void bind_slot(const std::string& name, const float*& target, const float* data, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& expected);
    template <class M>
    static auto& slot_of(M& m, const WeightRow& row, int layer, int index);
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

#include "weight_table.hpp"

namespace CELERINFER_NS {

// visit(row, layer, index) for every weight a config implies, in file order (layer and index -1
// where the row's scope has none): model rows before and after one block of per-layer rows, and
// within a layer, an expert scope's consecutive rows once per expert.
template <class Visit>
void for_each_weight(const Config& c, Visit&& visit) {
    const int n = int(std::size(kWeightRows));
    int i = 0;
    for (; i < n && kWeightRows[i].scope == Scope::Model; ++i)
        if (has_feature(c, kWeightRows[i].feature)) visit(kWeightRows[i], -1, -1);
    const int block = i;
    while (i < n && kWeightRows[i].scope != Scope::Model) ++i;
    for (int l = 0; l < c.layers; ++l)
        for (int run = block; run < i;) {
            int end = run + 1;
            while (end < i && kWeightRows[end].scope == kWeightRows[run].scope) ++end;
            const bool indexed = kScopes[int(kWeightRows[run].scope)].indexed;
            for (int64_t e = 0; e < scope_copies(c, kWeightRows[run].scope); ++e)
                for (int r = run; r < end; ++r)
                    if (has_feature(c, kWeightRows[r].feature)) visit(kWeightRows[r], l, indexed ? int(e) : -1);
            run = end;
        }
    for (; i < n; ++i)
        if (has_feature(c, kWeightRows[i].feature)) visit(kWeightRows[i], -1, -1);
}

// The shape a row has under a config.
inline std::vector<int64_t> row_shape(const Config& c, const WeightRow& row) {
    std::vector<int64_t> shape;
    for (int d = 0; d < row.rank; ++d) shape.push_back(dim_size(c, row.shape[d]));
    return shape;
}

// The state-dict name of a row's copy (layer, index: as for_each_weight gives them).
inline std::string weight_name(const WeightRow& row, int layer, int index) {
    if (row.scope == Scope::Model) return row.suffix;
    std::string name = "model.layers." + std::to_string(layer) + "." + kScopes[int(row.scope)].in_layer;
    if (index >= 0) name += std::to_string(index) + ".";
    return name + row.suffix;
}

template <class M>
auto& ModelWeights::slot_of(M& m, const WeightRow& row, int layer, int index) {
    switch (row.scope) {
        case Scope::Model: return m.*row.model_slot;
        case Scope::Layer: return m.layers[layer].*row.layer_slot;
        case Scope::Mlp: return m.layers[layer].ffn.*row.ffn_slot;
        case Scope::Expert: return m.layers[layer].experts[index].*row.ffn_slot;
        case Scope::SharedExpert: return m.layers[layer].shared_experts[index].*row.ffn_slot;
    }
    fail("weight table: bad scope");
}

// The row a name refers to: "model.layers.{l}." + the scope's part (+ "{index}.") + the row's suffix,
// or a model row's suffix. Throws for unknown names and indices past the config's sizes.
inline ModelWeights::Found ModelWeights::find_weight(const std::string& name) const {
    static const std::string prefix = "model.layers.";
    if (name.compare(0, prefix.size(), prefix) != 0) {
        for (const WeightRow& row : kWeightRows)
            if (row.scope == Scope::Model && name == row.suffix) return {&row, -1, -1};
        fail("unknown tensor '", name, "'");
    }
    const size_t end = name.find('.', prefix.size());
    CI_CHECK(end != std::string::npos, "unknown tensor '", name, "'");
    const int l = parse_index(name, prefix.size(), end);
    CI_CHECK(l >= 0 && l < config.layers, "tensor '", name, "': layer ", l, " out of range (", config.layers, " layers)");
    const std::string rest = name.substr(end + 1);
    for (const WeightRow& row : kWeightRows) {
        if (row.scope == Scope::Model) continue;
        const std::string part = kScopes[int(row.scope)].in_layer;
        if (rest.compare(0, part.size(), part) != 0) continue;
        if (!kScopes[int(row.scope)].indexed) {
            if (rest.compare(part.size(), std::string::npos, row.suffix) == 0) return {&row, l, -1};
            continue;
        }
        const size_t dot = rest.find('.', part.size());  // an expert scope: "{index}." comes first
        if (dot == std::string::npos || rest.compare(dot + 1, std::string::npos, row.suffix) != 0) continue;
        return {&row, l, parse_index(rest, part.size(), dot)};
    }
    fail("unknown tensor '", name, "'");
}

inline void ModelWeights::bind_slot(const std::string& name, const float*& target, const float* data,
                             const std::vector<int64_t>& shape, const std::vector<int64_t>& expected) {
    if (shape != expected)
        fail("tensor '", name, "' has shape ", shape_str(shape), ", the config implies ", shape_str(expected));
    target = data;
}

inline void ModelWeights::bind(const std::string& name, const float* data, const std::vector<int64_t>& shape) {
    CI_CHECK(data != nullptr, "tensor '", name, "': null data");
    const Config& c = config;
    if (name == "rope.cos" || name == "rope.sin")  // the RoPE cache: not a weight of the file's table
        return bind_slot(name, name == "rope.cos" ? rope_cos : rope_sin, data, shape, {c.max_pos, c.head_dim});
    const Found w = find_weight(name);
    const WeightRow& row = *w.row;
    CI_CHECK(has_feature(c, row.feature), "unknown tensor '", name, "' (a weight only when ", feature_rule(row.feature),
             ")");
    if (w.index >= 0) {
        const int64_t n = scope_copies(c, row.scope);
        CI_CHECK(w.index < n, "tensor '", name, "': ", kScopes[int(row.scope)].label, " ", w.index, " out of range (", n,
                 " ", kScopes[int(row.scope)].label, "s)");
    }
    bind_slot(name, slot_of(*this, row, w.layer, w.index), data, shape, row_shape(c, row));
}

inline void ModelWeights::bind_stored(const std::string& name, WeightFormat format, const void* data, size_t bytes) {
    CI_CHECK(data != nullptr, "stored form of '", name, "': null data");
    CI_CHECK(format == WeightFormat::BF16 || format == WeightFormat::Q8, "stored form of '", name, "': format ",
             weight_format_name(format), " is not a reduced format (bf16 or q8)");
    const Found w = find_weight(name);
    const WeightRow& row = *w.row;
    CI_CHECK(has_feature(config, row.feature), "unknown tensor '", name, "' (a weight only when ",
             feature_rule(row.feature), ")");
    CI_CHECK(row.reducible, "tensor '", name, "' is float32 in every model (norms and the router are never reduced)");
    CI_CHECK(has_feature(config, row.reduced_when), "tensor '", name, "' is stored reduced only when ",
             feature_rule(row.reduced_when));
    CI_CHECK(stored.empty() || stored_format == format, "stored form of '", name, "' is ", weight_format_name(format),
             ", the model's other stored weights are ", weight_format_name(stored_format));
    if (w.index >= 0)
        CI_CHECK(w.index < scope_copies(config, row.scope), "tensor '", name, "': ", kScopes[int(row.scope)].label, " ",
                 w.index, " out of range");
    const float* W = slot_of(*this, row, w.layer, w.index);
    CI_CHECK(W != nullptr, "stored form of '", name, "': bind its float32 decoding first");
    const int out = int(dim_size(config, row.shape[0])), in = int(dim_size(config, row.shape[1]));
    const size_t expected = stored_bytes(format, out, in);
    CI_CHECK(bytes == expected, "stored form of '", name, "': ", bytes, " bytes, a ", weight_format_name(format), " [",
             out, ", ", in, "] matrix has ", expected);
    stored_format = format;
    stored[W] = StoredMatrix{format, out, in, data, bytes};
}

inline void ModelWeights::check_complete() const {
    for_each_weight(config, [&](const WeightRow& row, int layer, int index) {
        const float* W = slot_of(*this, row, layer, index);
        CI_CHECK(W != nullptr, "missing tensor '", weight_name(row, layer, index), "'");
        if (!stored.empty() && row.reducible && has_feature(config, row.reduced_when))
            CI_CHECK(stored.count(W), "missing the ", weight_format_name(stored_format), " stored form of tensor '",
                     weight_name(row, layer, index), "'");
    });
    CI_CHECK(rope_cos != nullptr, "missing tensor 'rope.cos'");
    CI_CHECK(rope_sin != nullptr, "missing tensor 'rope.sin'");
}

template <class F>
void ModelWeights::for_each_linear(F&& f) const {
    for_each_weight(config, [&](const WeightRow& row, int layer, int index) {
        if (row.linear) f(slot_of(*this, row, layer, index), int(dim_size(config, row.shape[0])), int(dim_size(config, row.shape[1])));
    });
    if (head() != lm_head) f(head(), config.vocab, config.hidden);  // the tied head is the embedding, read as a linear
}

}  // namespace CELERINFER_NS
