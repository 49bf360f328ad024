// Read a model file (this project's format 1 or the original CelerInfer layout) into owned
// buffers and a bound celerinfer::ModelWeights, checking everything docs/model-file.md ("What a reader
// checks, in order") lists, in that order, and nothing else: the same files as
// celerinfer_lab.modelfile.load_model. Every refusal is a celerinfer::ModelFileError
// "PATH: field-or-tensor: what is wrong"; nothing is sized from the config before the file is
// known to hold what the config implies.
//
// The core, parse_model_file(), reads bytes (the JSON text and a sidecar provider) so a fuzz
// target drives it without files; load_model_file(path, options) is the file wrapper (the sidecar
// memory-mapped, no copy).
#pragma once
#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "celerinfer/celerinfer.hpp"
#include "model_file_config.hpp"
#include "model_file_limits.hpp"
#include "model_file_tensor.hpp"
#include "strict_json.hpp"

namespace celerinfer {

struct LoadOptions {
    bool allow_nonfinite = false;  // accept NaN/Inf in weights and the RoPE cache
};

// The bytes of a sidecar file. `data` must be 4-byte aligned (a mapping is page aligned);
// `keep` keeps them alive (the mapping) as long as the loaded model.
struct SidecarBytes {
    const uint8_t* data = nullptr;
    size_t size = 0;
    std::shared_ptr<const void> keep;
};
// Given the sidecar's plain file name (already checked), its bytes; throws ModelFileError when
// the file is missing or not a regular file.
using SidecarProvider = std::function<SidecarBytes(const std::string& name)>;

// A loaded model: the buffers the ModelWeights pointers refer to live as long as this object.
struct LoadedModel {
    std::shared_ptr<const void> sidecar;  // the sidecar mapping, when there is one
    std::unique_ptr<ModelWeights> model;
    std::map<std::string, std::vector<float>> weights;  // decoded base64 tensors (and the RoPE cache)
    std::vector<int64_t> input_ids, attention_mask;
    int batch = 0, seq_len = 0;
};

namespace model_file_detail {

struct Implied {  // one tensor the config implies
    std::string name;
    std::vector<int64_t> shape;
    const WeightRow* row;
    int layer;  // -1: not in a layer
};

// How many tensors a row of the weight table stands for (0 when its feature is off).
inline int64_t row_instances(const Config& c, const WeightRow& row) {
    if (!has_feature(c, row.feature)) return 0;
    return row.scope == Scope::Model ? 1 : int64_t(c.layers) * scope_copies(c, row.scope);
}

inline int64_t tensors_implied(const Config& c) {
    int64_t n = 0;
    for (const WeightRow& row : kWeightRows) n += row_instances(c, row);
    return n;
}

// Elements of all implied weights (the limits keep this far below 2^63; __int128 regardless).
inline __int128 elements_implied(const Config& c) {
    __int128 n = 0;
    for (const WeightRow& row : kWeightRows) {
        __int128 numel = row_instances(c, row);
        for (int d = 0; d < row.rank; ++d) numel *= dim_size(c, row.shape[d]);
        n += numel;
    }
    return n;
}

// MiniMind state-dict names and shapes (celerinfer_lab.modelfile.weight_shapes), from the weight
// table. Only called once the file is known to hold about as many entries.
inline std::vector<Implied> weights_implied(const Config& c) {
    std::vector<Implied> out;
    for_each_weight(c, [&](const WeightRow& row, int layer, int index) {
        out.push_back({weight_name(row, layer, index), row_shape(c, row), &row, layer});
    });
    return out;
}

inline const json& section(const json& doc, const char* key, const std::string& where) {
    const json* v = find(doc, key);
    if (!v) refuse(where, "missing field '", key, "'");
    if (!v->is_object()) refuse(where, "field '", key, "' must be a JSON object, got ", type_name(*v));
    return *v;
}

// Whether a key is an original CelerInfer name (the weight table's v0) outside weights.layers
// (Scope::Model) or in a weights.layers entry (any other scope).
inline bool is_v0_name(Scope where, const std::string& key) {
    for (const WeightRow& row : kWeightRows)
        if ((row.scope == Scope::Model) == (where == Scope::Model) && row.v0 && key == row.v0) return true;
    return false;
}

// Whether two (not yet checked) tensor objects hold the same dtype, shape and bytes.
inline bool same_tensor(const json& a, const json& b) {
    if (!a.is_object() || !b.is_object()) return false;
    const json *da = find(a, "dtype"), *db = find(b, "dtype"), *sa = find(a, "shape"), *sb = find(b, "shape");
    const json *xa = find(a, "data"), *xb = find(b, "data");
    if (!da || !db || !sa || !sb || !xa || !xb || !xa->is_string() || !xb->is_string()) return false;
    if (!da->is_string() || !db->is_string() || *da != *db || !sa->is_array() || !sb->is_array() || sa->size() != sb->size())
        return false;
    for (size_t i = 0; i < sa->size(); ++i)  // shapes of numbers only: no deep comparison
        if (!(*sa)[i].is_number_integer() || (*sa)[i] != (*sb)[i]) return false;
    const std::string &ta = xa->get_ref<const std::string&>(), &tb = xb->get_ref<const std::string&>();
    if (ta == tb) return true;
    if (ta.size() != tb.size()) return false;
    std::vector<uint8_t> ba, bb;  // base64 may differ in unused trailing bits and still be the same bytes
    if (!base64_decode_to(ta, ba) || !base64_decode_to(tb, bb)) return false;
    return ba == bb;
}

// A weight table entry: where it is in the file, what the config implies.
struct Slot {
    std::string name;  // the state-dict name (or rope.cos / rope.sin)
    std::vector<int64_t> shape;
    const json* obj;
    std::string where;  // "PATH: tensor 'name'" or "PATH: weights.layers[i]: tensor 'wq'"
    TensorRef ref;
    std::string section, label;  // where it is missing from, the name it has in the file
};

inline void check_sidecar_name(const std::string& name, const std::string& where) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
        name.find('\0') != std::string::npos)
        refuse(where, "sidecar.file '", strict_json_detail::printable(name), "' must be a plain file name in the model "
               "file's folder (no '/', not '.' or '..')");
}

struct SidecarEntry {
    std::string name;
    std::vector<int64_t> shape;
    uint64_t start = 0, end = 0;
};

// Step 5: the safetensors header, against the data section and the JSON's sidecar tensors.
inline std::map<std::string, const float*> check_sidecar(const SidecarBytes& bytes, const std::string& where,
                                                         const std::vector<Slot*>& marked) {
    const std::string w = where + ": sidecar";
    if (bytes.size < 8) refuse(w, "too short to be a safetensors file (", bytes.size, " bytes)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes.data[i];  // little-endian
    if (n % 8) refuse(w, "header length ", n, " is not a multiple of 8");
    if (n > bytes.size - 8) refuse(w, "header length ", n, " runs past the end of the file (", bytes.size, " bytes)");
    json header;
    std::string error;
    if (!parse_strict_json(std::string_view(reinterpret_cast<const char*>(bytes.data) + 8, size_t(n)), header, error))
        refuse(w, "the safetensors header: ", error);
    if (!header.is_object()) refuse(w, "the safetensors header must be a JSON object, got ", type_name(header));
    const uint64_t data_size = bytes.size - 8 - n;
    std::vector<SidecarEntry> entries;
    for (auto it = header.begin(); it != header.end(); ++it) {
        const std::string tw = w + ": tensor '" + strict_json_detail::printable(it.key()) + "'";
        if (it.key() == "__metadata__") {
            if (!it->is_object()) refuse(w, "__metadata__ must be a JSON object");
            continue;
        }
        const json& info = *it;
        if (!info.is_object()) refuse(tw, "must be a JSON object, got ", type_name(info));
        const json *dtype = find(info, "dtype"), *shape = find(info, "shape"), *offsets = find(info, "data_offsets");
        if (!dtype || !shape || !offsets) refuse(tw, "needs dtype, shape and data_offsets");
        if (!(dtype->is_string() && dtype->get_ref<const std::string&>() == "F32"))
            refuse(tw, "has dtype ", short_repr(*dtype), "; readable: 'F32'");
        SidecarEntry e;
        e.name = it.key();
        if (!shape->is_array()) refuse(tw, "shape must be a list of non-negative integers");
        uint64_t bytes_needed = 4;
        for (const json& d : *shape) {
            int64_t x = 0;
            if (as_int(d, x) != IntKind::Ok || x < 0) refuse(tw, "shape must be a list of non-negative integers");
            e.shape.push_back(x);
            if (__builtin_mul_overflow(bytes_needed, uint64_t(x), &bytes_needed)) bytes_needed = UINT64_MAX;
        }
        int64_t start = 0, end = 0;
        if (!offsets->is_array() || offsets->size() != 2 || as_int((*offsets)[0], start) != IntKind::Ok ||
            as_int((*offsets)[1], end) != IntKind::Ok || start < 0 || end < start)
            refuse(tw, "data_offsets must be [start, end], integers with 0 <= start <= end");
        e.start = uint64_t(start);
        e.end = uint64_t(end);
        if (e.end - e.start != bytes_needed)
            refuse(tw, "data_offsets [", start, ", ", end, "] hold ", e.end - e.start, " bytes, its shape of F32 needs ",
                   bytes_needed);
        if (e.end > data_size)
            refuse(tw, "needs bytes ", start, "..", end, " of the data, the file holds ", data_size, " (truncated?)");
        entries.push_back(std::move(e));
    }
    std::sort(entries.begin(), entries.end(),
              [](const SidecarEntry& a, const SidecarEntry& b) { return a.start != b.start ? a.start < b.start : a.end < b.end; });
    uint64_t at = 0;
    for (const SidecarEntry& e : entries) {
        if (e.start != at)
            refuse(w, "tensor '", strict_json_detail::printable(e.name), "' starts at byte ", e.start, " of the data, ",
                   e.start < at ? "overlapping the tensor before it" : "leaving a gap", " (expected ", at, ")");
        at = e.end;
    }
    if (at != data_size) refuse(w, "the tensors end at byte ", at, " of the data, the data holds ", data_size);
    // The sidecar holds exactly the tensors the JSON marks "sidecar", each with the JSON's shape.
    std::map<std::string, const SidecarEntry*> by_name;
    for (const SidecarEntry& e : entries) by_name[e.name] = &e;
    std::map<std::string, const float*> out;
    const uint8_t* base = bytes.data + 8 + n;
    for (const Slot* s : marked) {
        auto it = by_name.find(s->name);
        if (it == by_name.end()) refuse(s->where, "not in the sidecar");
        if (it->second->shape != s->shape)
            refuse(s->where, "the JSON says shape ", shape_str(s->shape), ", the sidecar holds ", shape_str(it->second->shape));
        out[s->name] = reinterpret_cast<const float*>(base + it->second->start);
    }
    if (out.size() != entries.size())
        for (const SidecarEntry& e : entries)
            if (!out.count(e.name))
                refuse(w, "tensor '", strict_json_detail::printable(e.name),
                       "' is not a weight the model file marks \"encoding\": \"sidecar\"");
    return out;
}

}  // namespace model_file_detail

// The core: check and load a model file from its JSON text and a sidecar provider.
// `where` names the file in messages.
inline LoadedModel parse_model_file(const std::string& where, std::string_view text, const SidecarProvider& sidecar,
                                    const LoadOptions& options = {}) {
    using namespace model_file_detail;
    // 1. The JSON text.
    json doc;
    {
        std::string error;
        if (!parse_strict_json(text, doc, error)) refuse(where, error, "; the file may be truncated or not a model file");
    }
    if (!doc.is_object()) refuse(where, "top level must be a JSON object, got ", type_name(doc));

    // 2. The layout.
    const json* version = find(doc, "format_version");
    const json* weights_v = find(doc, "weights");
    const bool v0 = !version;
    if (v0 && !(weights_v && weights_v->is_object() && find(*weights_v, "layers")))
        refuse(where, "not a model file: no 'format_version' (this project's format) and no 'weights.layers' "
               "(original CelerInfer layout)");
    if (!v0) {
        int64_t x = 0;
        const json* format = find(doc, "format");
        if (!(format && format->is_string() && format->get_ref<const std::string&>() == "celerinfer-lab"))
            refuse(where, "format is ", format ? short_repr(*format) : std::string("missing"), ", expected 'celerinfer-lab'");
        if (as_int(*version, x) != IntKind::Ok || x != 1)
            refuse(where, "format_version ", short_repr(*version), " is not supported (this version reads 1)");
    }
    const json& cfg_raw = section(doc, "config", where);
    const json& inputs = section(doc, "inputs", where);
    const json& rope = section(doc, "rope", where);
    const json& weights = section(doc, "weights", where);
    const json* meta = find(doc, "meta");
    if (meta && !meta->is_object()) refuse(where, "field 'meta' must be a JSON object, got ", type_name(*meta));
    const json* side = find(doc, "sidecar");
    std::string side_name;
    std::optional<int64_t> side_bytes;
    if (side) {
        if (v0) refuse(where, "sidecar: only this project's format (format_version 1) has a sidecar");
        if (!side->is_object()) refuse(where, "sidecar must be {\"file\": NAME, \"format\": \"safetensors\"}");
        for (const auto& item : side->items())
            if (item.key() != "file" && item.key() != "format" && item.key() != "bytes")
                refuse(where, "sidecar must be {\"file\": NAME, \"format\": \"safetensors\", \"bytes\": SIZE}; it has '",
                       strict_json_detail::printable(item.key()), "'");
        const json *file = find(*side, "file"), *format = find(*side, "format"), *nbytes = find(*side, "bytes");
        if (!(file && file->is_string() && format && format->is_string() &&
              format->get_ref<const std::string&>() == "safetensors"))
            refuse(where, "sidecar must be {\"file\": NAME, \"format\": \"safetensors\"}");
        side_name = file->get<std::string>();
        check_sidecar_name(side_name, where);
        if (nbytes) {
            int64_t x = 0;
            if (as_int(*nbytes, x) != IntKind::Ok || x < 0)
                refuse(where, "sidecar.bytes=", short_repr(*nbytes), ": must be an integer >= 0");
            side_bytes = x;
        }
    }
    // The original layout: its own names, one layers entry per layer.
    const json* v0_layers = nullptr;
    std::optional<bool> tie_override;
    const json* head_dim_fallback = nullptr;
    if (v0) {
        std::string top;  // the original names outside weights.layers, for the message
        for (const WeightRow& row : kWeightRows)
            if (row.scope == Scope::Model && row.v0) top += cat(row.v0, ", ");
        for (auto it = weights.begin(); it != weights.end(); ++it)
            if (it.key() != "layers" && !is_v0_name(Scope::Model, it.key()))
                refuse(where, "unexpected tensor 'weights.", strict_json_detail::printable(it.key()),
                       "' (the original layout has ", top.substr(0, top.size() - 2), " and layers)");
        for (const WeightRow& row : kWeightRows)  // those every config needs (lm_head: only untied)
            if (row.scope == Scope::Model && row.v0 && row.feature == Feature::Always && !find(weights, row.v0))
                refuse(where, "missing tensor '", row.v0, "'");
        v0_layers = find(weights, "layers");
        if (!v0_layers->is_array()) refuse(where, "weights.layers must be a list, got ", type_name(*v0_layers));
        if (meta) head_dim_fallback = find(*meta, "head_dim");
        if (!find(cfg_raw, "tie_word_embeddings")) {  // the original generator wrote a tied lm_head as a copy
            const json* head = find(weights, "lm_head");
            tie_override = !head || same_tensor(*head, weights["tok_embedding"]);
        }
    }

    // 3. The config.
    const Config c = read_model_config(cfg_raw, where, head_dim_fallback, tie_override);

    // 4. The tensor table, against the config and the file's size: counted before enumerated.
    SidecarBytes side_data;
    if (side) {
        side_data = sidecar(side_name);
        if (side_bytes && uint64_t(*side_bytes) != side_data.size)
            refuse(where, "sidecar: the file holds ", side_data.size, " bytes, the model file says ", *side_bytes,
                   " (replaced or truncated?)");
    }
    const __int128 min_bytes = 2 * elements_implied(c);  // float16, the smallest float type
    const __int128 room = __int128(text.size()) / 4 * 3 + __int128(side_data.size);
    if (min_bytes > room)
        refuse(where, "the config implies ", with_commas(int64_t(std::min<__int128>(elements_implied(c), INT64_MAX))),
               " weight values, more than the file can hold (", text.size(), " bytes",
               side ? cat(" and a sidecar of ", side_data.size, " bytes") : std::string(), ")");
    const int64_t count = tensors_implied(c);
    std::vector<Slot> slots;
    const json* v0_head = v0 ? find(weights, "lm_head") : nullptr;
    if (v0) {
        if (int64_t(v0_layers->size()) != c.layers)
            refuse(where, "weights.layers has ", v0_layers->size(), " entries, the config has num_hidden_layers=", c.layers);
        for (size_t i = 0; i < v0_layers->size(); ++i) {
            const json& layer = (*v0_layers)[i];
            const std::string lw = cat(where, ": weights.layers[", i, "]");
            if (!layer.is_object()) refuse(lw, "must be a JSON object, got ", type_name(layer));
            for (auto it = layer.begin(); it != layer.end(); ++it)
                if (!is_v0_name(Scope::Layer, it.key()))
                    refuse(lw, "unexpected tensor '", strict_json_detail::printable(it.key()), "'");
        }
        if (c.tied && v0_head && !same_tensor(*v0_head, weights["tok_embedding"]))
            refuse(where, "tie_word_embeddings is true but lm_head differs from tok_embedding");
        if (!c.tied && !v0_head) refuse(where, "missing tensor 'lm_head' (tie_word_embeddings is false)");
        if (c.qk_norm || c.moe)
            refuse(where, "config: ", c.qk_norm ? "qk_norm" : "use_moe", " is true, but the original layout cannot hold ",
                   c.qk_norm ? "q_norm/k_norm weights" : "experts", " (missing tensor 'model.layers.0.",
                   c.qk_norm ? "self_attn.q_norm.weight" : "mlp.gate.weight", "')");
    } else {
        const int64_t present = int64_t(weights.size());
        if (count > present + 16)
            refuse(where, "the config implies ", with_commas(count), " weight tensors, the file has ", present);
    }
    for (Implied& t : weights_implied(c)) {
        Slot s{t.name, std::move(t.shape), nullptr, "", {}, where, t.name};
        if (v0) {  // dense, no qk_norm (checked above): each weight the table implies has an original name
            if (!t.row->v0) refuse(where, "the original layout has no name for tensor '", t.name, "'");
            s.label = t.row->v0;
            if (t.layer < 0) {
                s.obj = find(weights, t.row->v0);
            } else {
                s.section = cat(where, ": weights.layers[", t.layer, "]");
                s.obj = find((*v0_layers)[size_t(t.layer)], t.row->v0);
            }
        } else {
            s.obj = find(weights, t.name.c_str());
        }
        s.where = cat(s.section, ": tensor '", s.label, "'");
        if (!s.obj)
            refuse(s.section, "missing tensor '", s.label, "' (the config needs it, shape ", shape_str(s.shape), ")");
        slots.push_back(std::move(s));
    }
    if (!v0 && int64_t(weights.size()) != count) {
        std::set<std::string> implied;
        for (const Slot& s : slots) implied.insert(s.name);
        for (auto it = weights.begin(); it != weights.end(); ++it)
            if (!implied.count(it.key()))
                refuse(where, "unexpected tensor '", strict_json_detail::printable(it.key()), "' (not a weight of this config)");
    }
    std::vector<Slot*> marked;
    for (Slot& s : slots) {
        s.ref = check_tensor(*s.obj, s.where, &s.shape, TensorKind::Float, !v0);
        if (s.ref.sidecar) {
            if (!side) refuse(s.where, "encoding 'sidecar' but the file names no sidecar");
            marked.push_back(&s);
        }
    }
    const std::vector<int64_t> rope_shape = {c.max_pos, c.head_dim};
    Slot rope_slots[2];
    for (int k = 0; k < 2; ++k) {
        const char* key = k ? "sin" : "cos";
        const json* obj = find(rope, key);
        if (!obj) refuse(where, "missing tensor 'rope.", key, "'");
        rope_slots[k] = Slot{std::string("rope.") + key, rope_shape, obj, cat(where, ": tensor 'rope.", key, "'"), {}, where, key};
        rope_slots[k].ref = check_tensor(*obj, rope_slots[k].where, &rope_shape, TensorKind::Float, false);
    }
    TensorRef ids, mask;
    for (const char* key : {"input_ids", "attention_mask"})
        if (!find(inputs, key)) refuse(where, "missing tensor '", key, "'");
    ids = check_tensor(inputs["input_ids"], cat(where, ": tensor 'input_ids'"), nullptr, TensorKind::Int, false);
    if (ids.shape.size() != 2 || ids.shape[0] < 1 || ids.shape[1] < 1)
        refuse(where, "input_ids has shape ", shape_str(ids.shape), ", expected [batch >= 1, seq_len >= 1]");
    mask = check_tensor(inputs["attention_mask"], cat(where, ": tensor 'attention_mask'"), &ids.shape, TensorKind::Int, false,
                        "input_ids has");
    if (ids.shape[1] > c.max_pos)
        refuse(where, "seq_len ", ids.shape[1], " is longer than max_position_embeddings ", c.max_pos);

    // 5. The sidecar header.
    std::map<std::string, const float*> mapped;
    if (side) mapped = check_sidecar(side_data, where, marked);

    // 6. The values.
    LoadedModel out;
    out.sidecar = side_data.keep;
    std::vector<std::pair<std::string, std::pair<const float*, std::vector<int64_t>>>> bound;
    auto take = [&](Slot& s) {
        if (s.ref.sidecar) {
            const float* p = mapped.at(s.name);
            if (!options.allow_nonfinite) check_finite(p, size_t(s.ref.numel), s.where);
            bound.push_back({s.name, {p, s.shape}});
            return;
        }
        std::vector<float>& buf = out.weights[s.name];
        decode_floats(s.ref, s.where, buf, !options.allow_nonfinite);
        bound.push_back({s.name, {buf.data(), s.shape}});
    };
    for (Slot& s : slots) take(s);
    for (Slot& s : rope_slots) take(s);
    out.input_ids = decode_ints(ids, cat(where, ": tensor 'input_ids'"));
    out.attention_mask = decode_ints(mask, cat(where, ": tensor 'attention_mask'"));
    const int64_t S = ids.shape[1];
    for (size_t i = 0; i < out.input_ids.size(); ++i)
        if (out.input_ids[i] < 0 || out.input_ids[i] >= c.vocab)
            refuse(where, "input_ids[", int64_t(i) / S, ",", int64_t(i) % S, "] = ", out.input_ids[i],
                   " is outside the vocabulary [0, ", c.vocab, ")");
    for (size_t i = 0; i < out.attention_mask.size(); ++i)
        if (out.attention_mask[i] != 0 && out.attention_mask[i] != 1)
            refuse(where, "attention_mask[", int64_t(i) / S, ",", int64_t(i) % S, "] = ", out.attention_mask[i],
                   "; the mask must hold only 0 and 1");
    out.batch = int(ids.shape[0]);
    out.seq_len = int(S);

    // Everything checked: size the model and bind its weights.
    out.model = std::make_unique<ModelWeights>(c);
    for (auto& [name, view] : bound) out.model->bind(name, view.first, view.second);
    out.model->check_complete();
    return out;
}

// A read-only memory map of a whole file (the safetensors sidecar), unmapped on destruction.
struct Mapping {
    const uint8_t* data = nullptr;
    size_t size = 0;
    Mapping(const uint8_t* d, size_t n) : data(d), size(n) {}
    ~Mapping() {
        if (data) ::munmap(const_cast<uint8_t*>(data), size);
    }
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
};

// The sidecar provider for files: `name` in the model file's folder, a regular file, mapped.
inline SidecarProvider sidecar_files(const std::string& model_path) {
    return [model_path](const std::string& name) -> SidecarBytes {
        const size_t slash = model_path.rfind('/');
        const std::string path = (slash == std::string::npos ? std::string() : model_path.substr(0, slash + 1)) + name;
        const std::string w = model_path + ": sidecar: " + path;
        struct stat st {};
        if (::stat(path.c_str(), &st) != 0) model_file_detail::refuse(w, "the sidecar file is missing");
        if (!S_ISREG(st.st_mode)) model_file_detail::refuse(w, "not a regular file");
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) model_file_detail::refuse(w, "cannot open the sidecar file");
        struct stat fst {};
        if (::fstat(fd, &fst) != 0 || !S_ISREG(fst.st_mode)) {
            ::close(fd);
            model_file_detail::refuse(w, "not a regular file");
        }
        SidecarBytes out;
        out.size = size_t(fst.st_size);
        if (out.size == 0) {
            ::close(fd);
            static const uint64_t empty = 0;
            out.data = reinterpret_cast<const uint8_t*>(&empty);
            return out;
        }
        void* p = ::mmap(nullptr, out.size, PROT_READ, MAP_PRIVATE, fd, 0);
        ::close(fd);
        if (p == MAP_FAILED) model_file_detail::refuse(w, "cannot map the sidecar file");
        auto map = std::make_shared<Mapping>(static_cast<const uint8_t*>(p), out.size);
        out.data = map->data;
        out.keep = map;
        return out;
    };
}

// Load a model file: read it whole (its size justifies the buffer), then parse_model_file.
inline LoadedModel load_model_file(const std::string& path, const LoadOptions& options = {}) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) model_file_detail::refuse(path, errno == ENOENT ? "no such file (cannot open file)" : "cannot open file (no permission?)");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        model_file_detail::refuse(path, "cannot open file: not a regular file");
    }
    std::string text;
    try {
        text.resize(size_t(st.st_size));
    } catch (...) {
        ::close(fd);
        throw;
    }
    size_t got = 0;
    while (got < text.size()) {
        const ssize_t n = ::read(fd, &text[got], text.size() - got);
        if (n <= 0) break;
        got += size_t(n);
    }
    ::close(fd);
    text.resize(got);
    return parse_model_file(path, text, sidecar_files(path), options);
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
