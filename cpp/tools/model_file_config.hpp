// The config section of a model file, read as celerinfer_lab.config.ModelConfig reads it
// (from_dict, __post_init__, validate, intermediate_size_for), with the limits of
// model_file_limits.hpp. Every integer is read as int64 with range checks; nothing is sized here.
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "celerinfer/celerinfer.hpp"
#include "model_file_limits.hpp"
#include "strict_json.hpp"

namespace celerinfer {

// Every refusal of a model file: "PATH: field-or-tensor: what is wrong".
class ModelFileError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace model_file_detail {

template <typename... Parts>
std::string cat(const Parts&... parts) {
    std::ostringstream s;
    (s << ... << parts);
    return s.str();
}

template <typename... Parts>
[[noreturn]] void refuse(const std::string& where, const Parts&... parts) {
    throw ModelFileError(cat(where, ": ", parts...));
}

// A short, printable rendering of an untrusted value (never dump(): no recursion, no size).
inline std::string short_repr(const json& v) {
    switch (v.type()) {
        case json::value_t::null: return "null";
        case json::value_t::boolean: return v.get<bool>() ? "true" : "false";
        case json::value_t::number_integer: return std::to_string(v.get<int64_t>());
        case json::value_t::number_unsigned: return std::to_string(v.get<uint64_t>());
        case json::value_t::number_float: {  // the shortest text that reads back, as Python's repr
            const double x = v.get<double>();
            std::string text;
            for (int precision = 15; precision <= 17; ++precision) {
                std::ostringstream s;
                s.precision(precision);
                s << x;
                text = s.str();
                if (std::strtod(text.c_str(), nullptr) == x) break;
            }
            if (text.find_first_of(".eni") == std::string::npos) text += ".0";
            return text;
        }
        case json::value_t::string: return "'" + strict_json_detail::printable(v.get_ref<const std::string&>(), 60) + "'";
        case json::value_t::array: return "a list";
        case json::value_t::object: return "an object";
        default: return "a value";
    }
}

inline const char* type_name(const json& v) {
    switch (v.type()) {
        case json::value_t::null: return "null";
        case json::value_t::boolean: return "a boolean";
        case json::value_t::number_integer:
        case json::value_t::number_unsigned: return "an integer";
        case json::value_t::number_float: return "a number";
        case json::value_t::string: return "a string";
        case json::value_t::array: return "a list";
        case json::value_t::object: return "an object";
        default: return "a value";
    }
}

inline std::string with_commas(int64_t n) {
    std::string digits = std::to_string(n), out;
    for (size_t i = 0; i < digits.size(); ++i) {
        if (i && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
    }
    return out;
}

enum class IntKind { NotInt, TooLarge, Ok };

// A JSON integer (not a float, not a boolean) that fits int64.
inline IntKind as_int(const json& v, int64_t& out) {
    if (v.is_number_unsigned()) {
        const uint64_t u = v.get<uint64_t>();
        if (u > uint64_t(std::numeric_limits<int64_t>::max())) return IntKind::TooLarge;
        out = int64_t(u);
        return IntKind::Ok;
    }
    if (v.is_number_integer()) {
        out = v.get<int64_t>();
        return IntKind::Ok;
    }
    return IntKind::NotInt;
}

inline const json* find(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
}

// Reads one config object; every message is "PATH: config: field=value: rule".
class ConfigReader {
public:
    ConfigReader(const json& cfg, std::string where) : cfg_(cfg), where_(std::move(where)) {}

    template <typename... Parts>
    [[noreturn]] void bad(const Parts&... parts) const {
        refuse(where_, "config: ", parts...);
    }

    // An integer in [minimum, limit]; absent: fallback.
    int64_t size(const char* name, const json* v, int64_t fallback, int64_t minimum, int64_t limit) const {
        if (!v) return fallback;
        int64_t x = 0;
        const IntKind kind = as_int(*v, x);
        if (kind == IntKind::NotInt || (kind == IntKind::Ok && x < minimum))
            bad(name, "=", short_repr(*v), ": must be an integer >= ", minimum);
        if (kind == IntKind::TooLarge || x > limit)
            bad(name, "=", short_repr(*v), ": above ", with_commas(limit),
                ", the limit for this field (no real model needs more; cpp/tools/model_file_limits.hpp)");
        return x;
    }
    int64_t size(const char* name, int64_t fallback, int64_t minimum, int64_t limit) const {
        return size(name, find(cfg_, name), fallback, minimum, limit);
    }
    void check_limit(const char* name, int64_t value, int64_t limit) const {  // a derived size
        if (value > limit)
            bad(name, "=", value, ": above ", with_commas(limit), ", the limit for this field (no real model needs more)");
    }
    bool flag(const char* name, bool fallback) const {
        const json* v = find(cfg_, name);
        if (!v) return fallback;
        if (!v->is_boolean()) bad(name, "=", short_repr(*v), ": must be true or false");
        return v->get<bool>();
    }
    // A number (integer or float, not a boolean; JSON numbers are finite).
    double number(const char* name, double fallback) const {
        const json* v = find(cfg_, name);
        if (!v) return fallback;
        if (!v->is_number()) bad(name, "=", short_repr(*v), ": must be a number");
        return v->get<double>();
    }
    // A string among `choices`; absent: fallback. Returns the index of the choice.
    template <size_t N>
    size_t choice(const char* name, const char* const (&choices)[N], size_t fallback) const {
        const json* v = find(cfg_, name);
        if (!v) return fallback;
        if (v->is_string())
            for (size_t i = 0; i < N; ++i)
                if (v->get_ref<const std::string&>() == choices[i]) return i;
        std::string list;
        for (size_t i = 0; i < N; ++i) list += cat(i ? ", " : "", "'", choices[i], "'");
        bad(name, "=", short_repr(*v), ": must be one of (", list, ")");
    }
    const json& raw() const { return cfg_; }

private:
    const json& cfg_;
    std::string where_;
};

}  // namespace model_file_detail

// MiniMind's default FFN width (celerinfer_lab.config.intermediate_size_for); sizing_rule 0 is
// "minimind2" (64*ceil(int(8h/3)/64)), 1 "minimind3" (64*ceil(h*pi/64)).
inline int64_t intermediate_size_for(int64_t hidden, size_t sizing_rule) {
    if (sizing_rule == 0) return 64 * ((hidden * 8 / 3 + 63) / 64);
    return 64 * int64_t(std::ceil(double(hidden) * 3.14159265358979323846 / 64.0));
}

namespace model_file_detail {

// from_dict: MiniMind2's names for the MoE fields (n_routed_experts for num_experts, norm_topk_prob).
struct MoeNames {
    const json* experts = nullptr;   // num_experts, else n_routed_experts
    const json* n_routed = nullptr;  // n_routed_experts
    const json* norm_topk = nullptr;  // norm_topk_prob, a boolean
};

inline MoeNames read_moe_names(const ConfigReader& r) {
    MoeNames m;
    m.n_routed = find(r.raw(), "n_routed_experts");
    m.experts = find(r.raw(), "num_experts");
    if (!m.experts) m.experts = m.n_routed;
    m.norm_topk = find(r.raw(), "norm_topk_prob");
    if (m.norm_topk && !m.norm_topk->is_boolean()) r.bad("norm_topk_prob=", short_repr(*m.norm_topk), ": must be true or false");
    return m;
}

// __post_init__: what the derived sizes are derived from (a null value counts as absent).
struct DimSources {
    int64_t hidden = 0, heads = 0;
    const json* head_dim = nullptr;          // else hidden_size / num_attention_heads
    const json* intermediate = nullptr;      // else intermediate_size_for(hidden, sizing)
    size_t sizing = 0;                       // sizing_rule
    const json* moe_intermediate = nullptr;  // else intermediate_size
};

inline const json* unless_null(const json* v) { return v && v->is_null() ? nullptr : v; }

inline DimSources read_dim_sources(const ConfigReader& r, const json* head_dim_fallback) {
    static const char* const kSizing[] = {"minimind2", "minimind3"};
    DimSources d;
    d.hidden = r.size("hidden_size", 64, 1, MAX_HIDDEN_SIZE);
    d.heads = r.size("num_attention_heads", 8, 1, MAX_HEADS);
    const json* head_dim = find(r.raw(), "head_dim");
    d.head_dim = unless_null(head_dim ? head_dim : head_dim_fallback);
    if (!d.head_dim && d.hidden % d.heads)
        r.bad("hidden_size=", d.hidden, " is not divisible by num_attention_heads=", d.heads,
              ": head_dim cannot be derived (set head_dim explicitly)");
    d.intermediate = unless_null(find(r.raw(), "intermediate_size"));
    d.sizing = r.choice("sizing_rule", kSizing, 1);
    d.moe_intermediate = unless_null(find(r.raw(), "moe_intermediate_size"));
    return d;
}

// validate: the sizes, given or derived, each within its limit.
inline void read_sizes(const ConfigReader& r, const DimSources& d, Config& c) {
    c.hidden = int(d.hidden);
    c.layers = int(r.size("num_hidden_layers", 2, 1, MAX_LAYERS));
    c.heads = int(d.heads);
    c.kv_heads = int(r.size("num_key_value_heads", 2, 1, MAX_HEADS));
    c.vocab = int(r.size("vocab_size", 128, 1, MAX_VOCAB));
    c.max_pos = int(r.size("max_position_embeddings", 128, 1, MAX_POSITIONS));
    const int64_t head_dim = d.head_dim ? r.size("head_dim", d.head_dim, 0, 1, MAX_HEAD_DIM) : d.hidden / d.heads;
    r.check_limit("head_dim", head_dim, MAX_HEAD_DIM);
    c.head_dim = int(head_dim);
    const int64_t inter = d.intermediate ? r.size("intermediate_size", d.intermediate, 0, 1, MAX_INTERMEDIATE)
                                         : intermediate_size_for(d.hidden, d.sizing);
    r.check_limit("intermediate_size", inter, MAX_INTERMEDIATE);
    c.intermediate = int(inter);
}

// The flags; returns inference_rope_scaling (it decides whether rope_scaling is read).
inline bool read_flags(const ConfigReader& r, std::optional<bool> tie_override, Config& c) {
    c.tied = tie_override && !find(r.raw(), "tie_word_embeddings") ? *tie_override : r.flag("tie_word_embeddings", true);
    c.qk_norm = r.flag("qk_norm", false);
    c.moe = r.flag("use_moe", false);
    return r.flag("inference_rope_scaling", false);
}

inline void check_head_layout(const ConfigReader& r, const Config& c) {
    if (c.heads % c.kv_heads)
        r.bad("num_attention_heads=", c.heads, " is not a multiple of num_key_value_heads=", c.kv_heads,
              " (grouped-query attention needs an equal number of query heads per kv head)");
    if (c.head_dim % 2) r.bad("head_dim=", c.head_dim, ": RoPE rotates pairs of dimensions, head_dim must be even");
}

// rms_norm_eps > 0, rope_theta > 1, the RoPE pairing, and the one activation the forwards compute.
inline void read_norm_rope_act(const ConfigReader& r, Config& c) {
    static const char* const kPairing[] = {"half", "interleaved"};
    static const char* const kAct[] = {"silu"};
    const double eps = r.number("rms_norm_eps", 1e-5);
    if (!(eps > 0)) r.bad("rms_norm_eps=", short_repr(r.raw()["rms_norm_eps"]), ": must be a number > 0");
    c.eps = float(eps);
    const double theta = r.number("rope_theta", 1e6);
    if (!(theta > 1)) r.bad("rope_theta=", short_repr(r.raw()["rope_theta"]), ": must be a number > 1");
    c.rope_interleaved = r.choice("rope_pairing", kPairing, 0) == 1;
    r.choice("hidden_act", kAct, 0);
}

// _validate_yarn: rope_scaling absent, null, or a dict of YaRN keys known to its rule ("minimind", the
// default, or "transformers": config.YARN_KEYS), the rule's required keys present, numbers > 0,
// truncate a boolean. Only the RoPE cache in the file is read; this keeps the two readers agreeing.
inline void check_rope_scaling(const ConfigReader& r) {
    const json* s = find(r.raw(), "rope_scaling");
    if (!s || s->is_null()) return;
    if (!s->is_object()) r.bad("rope_scaling=", short_repr(*s), ": must be a dict of YaRN parameters");
    static const char* const kKnown[] = {"beta_fast", "beta_slow", "factor", "original_max_position_embeddings",
                                         "attention_factor", "type", "rule", "truncate"};
    for (auto it = s->begin(); it != s->end(); ++it) {
        bool known = false;
        for (const char* k : kKnown) known = known || it.key() == k;
        if (!known) r.bad("rope_scaling has unknown key '", strict_json_detail::printable(it.key()), "'");
    }
    const json* rule = find(*s, "rule");
    const bool transformers = rule && rule->is_string() && rule->get_ref<const std::string&>() == "transformers";
    if (rule && !transformers && !(rule->is_string() && rule->get_ref<const std::string&>() == "minimind"))
        r.bad("rope_scaling.rule=", short_repr(*rule), ": must be one of ('minimind', 'transformers')");
    if (!transformers && find(*s, "truncate"))
        r.bad("rope_scaling.truncate means nothing under rule 'minimind' (MiniMind's YaRN always truncates)");
    const json* type = find(*s, "type");
    if (type && !(type->is_string() && type->get_ref<const std::string&>() == "yarn"))
        r.bad("rope_scaling.type=", short_repr(*type), ": only 'yarn' is supported");
    if (transformers)
        for (const char* key : {"factor", "original_max_position_embeddings", "attention_factor"})
            if (!find(*s, key)) r.bad("rope_scaling.", key, " is required under rule 'transformers'");
    for (const char* key : {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"}) {
        const json* v = find(*s, key);
        if (v && !(v->is_number() && v->get<double>() > 0))
            r.bad("rope_scaling.", key, "=", short_repr(*v), ": must be a number > 0");
    }
    const json* truncate = find(*s, "truncate");
    if (truncate && !truncate->is_boolean()) r.bad("rope_scaling.truncate=", short_repr(*truncate), ": must be true or false");
}

// num_experts_per_tok: an integer in [1, num_experts]; absent: 1.
inline int64_t read_topk(const ConfigReader& r, int64_t experts) {
    int64_t topk = 1;
    const json* v = find(r.raw(), "num_experts_per_tok");
    if (!v) return topk;
    const IntKind kind = as_int(*v, topk);
    if (kind == IntKind::NotInt || (kind == IntKind::Ok && topk < 1))
        r.bad("num_experts_per_tok=", short_repr(*v), ": must be an integer >= 1");
    if (kind == IntKind::TooLarge || topk > experts)
        r.bad("num_experts_per_tok=", short_repr(*v), " is above num_experts=", experts,
              " (top-k cannot pick more experts than exist)");
    return topk;
}

// topk_renorm when given; else MiniMind2's norm_topk_prob (false: never; true: k>1 with
// n_routed_experts, always without); else always.
inline TopkRenorm read_topk_renorm(const ConfigReader& r, const MoeNames& m) {
    static const char* const kRenorm[] = {"always", "k>1", "never"};
    size_t renorm = 0;  // always
    if (find(r.raw(), "topk_renorm")) renorm = r.choice("topk_renorm", kRenorm, 0);
    else if (m.norm_topk) renorm = !m.norm_topk->get<bool>() ? 2 : m.n_routed ? 1 : 0;
    return renorm == 0 ? TopkRenorm::Always : renorm == 1 ? TopkRenorm::WhenKAbove1 : TopkRenorm::Never;
}

// _validate_moe (only read when use_moe is true).
inline void read_moe(const ConfigReader& r, const MoeNames& m, const DimSources& d, Config& c) {
    const int64_t experts = r.size("num_experts", m.experts, 4, 1, MAX_EXPERTS);
    c.topk = int(read_topk(r, experts));
    c.experts = int(experts);
    c.shared_experts = int(r.size("n_shared_experts", 0, 0, MAX_SHARED_EXPERTS));
    c.moe_intermediate = d.moe_intermediate ? int(r.size("moe_intermediate_size", d.moe_intermediate, 0, 1, MAX_INTERMEDIATE))
                                            : c.intermediate;
    c.topk_renorm = read_topk_renorm(r, m);
}

}  // namespace model_file_detail

// Read and validate a config object, in ModelConfig's order: from_dict, __post_init__, validate.
// head_dim_fallback: the original layout's meta.head_dim, used when the config has no head_dim key.
// tie_override: the original layout's inferred tie, used when the config has no
// tie_word_embeddings key.
inline Config read_model_config(const json& cfg, const std::string& where, const json* head_dim_fallback,
                                std::optional<bool> tie_override) {
    using namespace model_file_detail;
    if (!cfg.is_object()) refuse(where, "config: must be a JSON object, got ", type_name(cfg));
    const ConfigReader r(cfg, where);
    const MoeNames moe_names = read_moe_names(r);
    const DimSources dims = read_dim_sources(r, head_dim_fallback);
    Config c;
    read_sizes(r, dims, c);
    const bool scaling = read_flags(r, tie_override, c);
    check_head_layout(r, c);
    read_norm_rope_act(r, c);
    if (scaling) check_rope_scaling(r);
    if (c.moe) read_moe(r, moe_names, dims, c);
    return c;
}

}  // namespace celerinfer
