// Read a model file (this project's format 1 or the original CelerInfer layout) into owned
// buffers and a bound celerinfer::Model. File loading lives here, not in the forward.
#pragma once
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include <nlohmann/json.hpp>

#include "celerinfer/celerinfer.hpp"

namespace celerinfer {

using json = nlohmann::json;

struct Tensor {
    std::vector<int64_t> shape;
    std::string dtype;
    std::vector<uint8_t> bytes;
};

inline std::vector<uint8_t> base64_decode(const std::string& text, const std::string& where) {
    static const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    int table[256];
    for (int& t : table) t = -1;
    for (size_t i = 0; i < alphabet.size(); ++i) table[uint8_t(alphabet[i])] = int(i);
    CI_CHECK(text.size() % 4 == 0, where, ": base64 data length ", text.size(), " is not a multiple of 4");
    std::vector<uint8_t> out;
    out.reserve(text.size() / 4 * 3);
    for (size_t i = 0; i < text.size(); i += 4) {
        int v[4];
        int pad = 0;
        for (int j = 0; j < 4; ++j) {
            const char ch = text[i + j];
            if (ch == '=' && i + 4 == text.size() && j >= 2) { v[j] = 0; ++pad; continue; }
            CI_CHECK(pad == 0 && table[uint8_t(ch)] >= 0, where, ": data is not valid base64 at character ", i + j);
            v[j] = table[uint8_t(ch)];
        }
        const uint32_t n = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) | (uint32_t(v[2]) << 6) | uint32_t(v[3]);
        out.push_back(uint8_t(n >> 16));
        if (pad < 2) out.push_back(uint8_t(n >> 8));
        if (pad < 1) out.push_back(uint8_t(n));
    }
    return out;
}

inline size_t dtype_size(const std::string& dtype, const std::string& where) {
    if (dtype == "float32" || dtype == "int32") return 4;
    if (dtype == "float64" || dtype == "int64") return 8;
    if (dtype == "uint8") return 1;
    fail(where, ": unknown dtype '", dtype, "' (base_line_micro reads float32, float64, int32, int64, uint8)");
}

inline Tensor read_tensor(const json& obj, const std::string& where) {
    CI_CHECK(obj.is_object(), where, ": a tensor must be a JSON object");
    for (const char* key : {"shape", "dtype", "data"})
        CI_CHECK(obj.contains(key), where, ": tensor has no '", key, "' field");
    Tensor t;
    CI_CHECK(obj["shape"].is_array(), where, ": shape must be a list");
    size_t numel = 1;
    for (const auto& d : obj["shape"]) {
        CI_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, where, ": shape must hold non-negative integers");
        t.shape.push_back(d.get<int64_t>());
        numel *= size_t(d.get<int64_t>());
    }
    CI_CHECK(obj["dtype"].is_string() && obj["data"].is_string(), where, ": dtype and data must be strings");
    t.dtype = obj["dtype"].get<std::string>();
    const std::string encoding = obj.value("encoding", std::string("base64"));
    CI_CHECK(encoding == "base64", where, ": unknown encoding '", encoding, "'");
    const size_t expected = numel * dtype_size(t.dtype, where);
    t.bytes = base64_decode(obj["data"].get_ref<const std::string&>(), where);
    CI_CHECK(t.bytes.size() == expected, where, ": data holds ", t.bytes.size(), " bytes but shape and dtype need ", expected);
    return t;
}

template <typename T>
inline std::vector<T> convert(const Tensor& t) {
    size_t n = 1;
    for (int64_t d : t.shape) n *= size_t(d);
    std::vector<T> out(n);
    auto copy = [&](auto tag) {
        using Src = decltype(tag);
        for (size_t i = 0; i < n; ++i) {
            Src v;
            std::memcpy(&v, t.bytes.data() + i * sizeof(Src), sizeof(Src));
            out[i] = T(v);
        }
    };
    if (t.dtype == "float32") copy(float{});
    else if (t.dtype == "float64") copy(double{});
    else if (t.dtype == "int32") copy(int32_t{});
    else if (t.dtype == "int64") copy(int64_t{});
    else copy(uint8_t{});
    return out;
}

// A read-only memory map of a whole file (the safetensors sidecar), unmapped on destruction.
struct Mapping {
    const uint8_t* data = nullptr;
    size_t size = 0;
    explicit Mapping(const std::string& path) {
        const int fd = ::open(path.c_str(), O_RDONLY);
        CI_CHECK(fd >= 0, path, ": cannot open the sidecar file");
        struct stat st {};
        ::fstat(fd, &st);
        size = size_t(st.st_size);
        void* p = size ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
        ::close(fd);
        CI_CHECK(p != MAP_FAILED, path, ": cannot map the sidecar file");
        data = static_cast<const uint8_t*>(p);
    }
    ~Mapping() { if (data) ::munmap(const_cast<uint8_t*>(data), size); }
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
};

// The safetensors sidecar: tensor name -> (pointer into the map, shape).
struct Sidecar {
    std::unique_ptr<Mapping> map;
    std::map<std::string, std::pair<const float*, std::vector<int64_t>>> tensors;
};

inline Sidecar open_sidecar(const std::string& path) {
    Sidecar side;
    side.map = std::make_unique<Mapping>(path);
    const Mapping& m = *side.map;
    CI_CHECK(m.size >= 8, path, ": too short to be a safetensors file");
    uint64_t n = 0;
    std::memcpy(&n, m.data, 8);
    CI_CHECK(n <= m.size - 8, path, ": header length ", n, " runs past the end of the file");
    json header;
    try {
        header = json::parse(m.data + 8, m.data + 8 + n);
    } catch (const json::parse_error& e) {
        fail(path, ": the safetensors header is not valid JSON: ", e.what());
    }
    const size_t base = 8 + n;
    for (const auto& [name, info] : header.items()) {
        if (name == "__metadata__") continue;
        CI_CHECK(info.value("dtype", std::string()) == "F32", path, ": tensor '", name, "' is not F32");
        const size_t start = info["data_offsets"][0].get<size_t>(), end = info["data_offsets"][1].get<size_t>();
        std::vector<int64_t> shape = info["shape"].get<std::vector<int64_t>>();
        size_t numel = 1;
        for (int64_t d : shape) numel *= size_t(d);
        CI_CHECK(end - start == numel * 4 && base + end <= m.size, path, ": tensor '", name,
                 "' runs past the end of the file (truncated?)");
        CI_CHECK((base + start) % 4 == 0, path, ": tensor '", name, "' is not 4-byte aligned");
        side.tensors[name] = {reinterpret_cast<const float*>(m.data + base + start), shape};
    }
    return side;
}

// A loaded model: the buffers the Model's pointers refer to live as long as this object.
struct LoadedModel {
    Sidecar sidecar;
    std::unique_ptr<Model> model;
    std::map<std::string, std::vector<float>> weights;
    std::vector<int64_t> input_ids, attention_mask;
    int batch = 0, seq_len = 0;
};

inline Config read_config(const json& cfg, const json& meta, const std::string& where) {
    CI_CHECK(cfg.is_object(), where, ": missing field 'config'");
    auto get_int = [&](const char* key) -> int {
        CI_CHECK(cfg.contains(key) && cfg[key].is_number_integer(), where, ": config.", key, " is missing or not an integer");
        return cfg[key].get<int>();
    };
    Config c;
    c.hidden = get_int("hidden_size");
    c.layers = get_int("num_hidden_layers");
    c.heads = get_int("num_attention_heads");
    c.kv_heads = get_int("num_key_value_heads");
    c.vocab = get_int("vocab_size");
    c.max_pos = get_int("max_position_embeddings");
    c.intermediate = get_int("intermediate_size");
    if (cfg.contains("head_dim") && !cfg["head_dim"].is_null()) c.head_dim = get_int("head_dim");
    else if (meta.is_object() && meta.contains("head_dim")) c.head_dim = meta["head_dim"].get<int>();
    else c.head_dim = c.heads > 0 ? c.hidden / c.heads : 0;
    c.eps = cfg.value("rms_norm_eps", 1e-5f);
    c.qk_norm = cfg.value("qk_norm", false);
    c.rope_interleaved = cfg.value("rope_pairing", std::string("half")) == "interleaved";
    c.tied = cfg.value("tie_word_embeddings", true);
    c.moe = cfg.value("use_moe", false);
    if (c.moe) {
        c.experts = get_int("num_experts");
        c.topk = get_int("num_experts_per_tok");
        c.shared_experts = cfg.value("n_shared_experts", 0);
        c.moe_intermediate = cfg.contains("moe_intermediate_size") && !cfg["moe_intermediate_size"].is_null()
                                 ? get_int("moe_intermediate_size") : c.intermediate;
        const std::string rule = cfg.value("topk_renorm", std::string("always"));
        CI_CHECK(rule == "always" || rule == "k>1" || rule == "never", where, ": config.topk_renorm '", rule, "' is unknown");
        c.topk_renorm = rule == "always" ? TopkRenorm::Always : rule == "k>1" ? TopkRenorm::WhenKAbove1 : TopkRenorm::Never;
    }
    try {
        c.validate();
    } catch (const std::exception& e) {
        fail(where, ": ", e.what());
    }
    return c;
}

inline LoadedModel load_model_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    CI_CHECK(in.good(), path, ": cannot open file");
    json doc;
    try {
        doc = json::parse(in);
    } catch (const json::parse_error& e) {
        fail(path, ": not valid JSON (the file may be truncated): ", e.what());
    }
    CI_CHECK(doc.is_object(), path, ": top level must be a JSON object");
    for (const char* key : {"config", "inputs", "rope", "weights"})
        CI_CHECK(doc.contains(key) && doc[key].is_object(), path, ": missing field '", key, "'");
    const bool v0 = !doc.contains("format_version");
    if (!v0) CI_CHECK(doc["format_version"] == 1, path, ": format_version ", doc["format_version"].dump(), " is not supported");
    CI_CHECK(!v0 || doc["weights"].contains("layers"), path, ": not a model file (no format_version, no weights.layers)");

    json cfg = doc["config"];
    const json& w = doc["weights"];
    if (v0 && !cfg.contains("tie_word_embeddings"))  // the original generator wrote lm_head as a copy of the embedding
        cfg["tie_word_embeddings"] = !w.contains("lm_head") || w["lm_head"]["data"] == w["tok_embedding"]["data"];
    LoadedModel out;
    out.model = std::make_unique<Model>(read_config(cfg, doc.value("meta", json::object()), path));
    Model& m = *out.model;

    if (doc.contains("sidecar")) {
        const json& info = doc["sidecar"];
        CI_CHECK(info.is_object() && info.value("format", std::string()) == "safetensors" && info.contains("file"),
                 path, ": sidecar must name a safetensors file");
        const std::string dir = std::filesystem::path(path).parent_path().string();
        out.sidecar = open_sidecar((dir.empty() ? std::string(".") : dir) + "/" + info["file"].get<std::string>());
    }
    auto add = [&](const std::string& name, const json& obj) {
        if (obj.is_object() && obj.value("encoding", std::string()) == "sidecar") {
            auto it = out.sidecar.tensors.find(name);
            CI_CHECK(out.sidecar.map != nullptr, path, ": tensor '", name, "' is in a sidecar but the file names none");
            CI_CHECK(it != out.sidecar.tensors.end(), path, ": tensor '", name, "' is not in the sidecar");
            m.bind(name, it->second.first, it->second.second);  // no copy: straight into the map
            return;
        }
        const Tensor t = read_tensor(obj, path + ": tensor '" + name + "'");
        CI_CHECK(t.dtype.rfind("float", 0) == 0, path, ": tensor '", name, "' must be floating point");
        std::vector<float>& buf = out.weights[name] = convert<float>(t);
        m.bind(name, buf.data(), t.shape);
    };
    if (v0) {
        const std::map<std::string, std::string> top = {{"tok_embedding", "model.embed_tokens.weight"},
                                                         {"final_rms", "model.norm.weight"}};
        const std::map<std::string, std::string> layer_names = {
            {"rms_attn", "input_layernorm.weight"}, {"rms_ffn", "post_attention_layernorm.weight"},
            {"wq", "self_attn.q_proj.weight"}, {"wk", "self_attn.k_proj.weight"}, {"wv", "self_attn.v_proj.weight"},
            {"wo", "self_attn.o_proj.weight"}, {"w_gate", "mlp.gate_proj.weight"}, {"w_up", "mlp.up_proj.weight"},
            {"w_down", "mlp.down_proj.weight"}};
        for (const auto& [old_name, name] : top) {
            CI_CHECK(w.contains(old_name), path, ": missing tensor '", old_name, "'");
            add(name, w[old_name]);
        }
        if (!m.config.tied && w.contains("lm_head")) add("lm_head.weight", w["lm_head"]);
        CI_CHECK(w["layers"].is_array(), path, ": weights.layers must be a list");
        for (size_t l = 0; l < w["layers"].size(); ++l)
            for (const auto& [old_name, name] : layer_names) {
                CI_CHECK(w["layers"][l].contains(old_name), path, ": weights.layers[", l, "]: missing tensor '", old_name, "'");
                add("model.layers." + std::to_string(l) + "." + name, w["layers"][l][old_name]);
            }
    } else {
        for (const auto& [name, obj] : w.items()) add(name, obj);
    }
    for (const char* key : {"cos", "sin"}) {
        CI_CHECK(doc["rope"].contains(key), path, ": missing tensor 'rope.", key, "'");
        add(std::string("rope.") + key, doc["rope"][key]);
    }
    m.check_complete();

    const json& inputs = doc["inputs"];
    for (const char* key : {"input_ids", "attention_mask"}) CI_CHECK(inputs.contains(key), path, ": missing tensor '", key, "'");
    const Tensor ids = read_tensor(inputs["input_ids"], path + ": tensor 'input_ids'");
    const Tensor mask = read_tensor(inputs["attention_mask"], path + ": tensor 'attention_mask'");
    CI_CHECK(ids.shape.size() == 2 && ids.shape[0] > 0 && ids.shape[1] > 0, path, ": input_ids must be [batch, seq_len]");
    CI_CHECK(mask.shape == ids.shape, path, ": attention_mask shape differs from input_ids");
    out.batch = int(ids.shape[0]);
    out.seq_len = int(ids.shape[1]);
    out.input_ids = convert<int64_t>(ids);
    out.attention_mask = convert<int64_t>(mask);
    for (size_t i = 0; i < out.input_ids.size(); ++i) {
        CI_CHECK(out.input_ids[i] >= 0 && out.input_ids[i] < m.config.vocab, path, ": input_ids[", i, "] = ",
                 out.input_ids[i], " is outside the vocabulary [0, ", m.config.vocab, ")");
        CI_CHECK(out.attention_mask[i] == 0 || out.attention_mask[i] == 1, path, ": attention_mask must hold only 0 and 1");
    }
    CI_CHECK(out.seq_len <= m.config.max_pos, path, ": seq_len ", out.seq_len, " is longer than max_position_embeddings");
    return out;
}

// Write a float32 array as .npy (version 1.0).
inline void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
    std::string dims;
    size_t n = 1;
    for (int64_t d : shape) {
        dims += std::to_string(d) + ", ";
        n *= size_t(d);
    }
    if (shape.size() > 1) dims.resize(dims.size() - 1);  // "(2, 5, 128)" but "(7,)"
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
    const size_t total = 10 + header.size() + 1;
    header += std::string((64 - total % 64) % 64, ' ') + "\n";
    std::ofstream out(path, std::ios::binary);
    CI_CHECK(out.good(), path, ": cannot write");
    const uint16_t len = uint16_t(header.size());
    out.write("\x93NUMPY\x01\x00", 8);
    out.write(reinterpret_cast<const char*>(&len), 2);
    out << header;
    out.write(reinterpret_cast<const char*>(data), std::streamsize(n * sizeof(float)));
    CI_CHECK(out.good(), path, ": write failed");
}

}  // namespace celerinfer
