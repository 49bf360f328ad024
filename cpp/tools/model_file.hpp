// Read a model file (this project's format 1 or the original CelerInfer layout) into owned
// buffers and a bound celerinfer::ModelWeights, checking everything docs/model-file.md ("What a reader
// checks, in order") lists, in that order, and nothing else: the same files as
// celerinfer_lab.modelfile.load_model. Every refusal is a celerinfer::ModelFileError
// "PATH: field-or-tensor: what is wrong"; nothing is sized from the config before the file is
// known to hold what the config implies.
//
// The core, parse_model_file(), reads bytes (the JSON text and a sidecar provider) so a fuzz
// target drives it without files; load_model_file(path, options) is the file wrapper (the sidecar
// memory-mapped, no copy). parse_model_file is the six steps, one function each, defined below in
// that order: 1 parse_json_text, 2 check_layout (+ check_original_layout), 3 read_model_config
// (model_file_config.hpp), 4 check_tensor_table (after open_sidecar and check_file_room; each
// tensor object: check_tensor in model_file_tensor.hpp), 5 check_sidecar, 6 read_values.
#pragma once
#include <algorithm>
#include <array>
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

// A reduced weight of a bf16/q8 file as the file stores it (for kernel sets that read bf16 or Q8_0).
struct StoredWeight {
    std::string format;             // "bf16" (uint16 bits) or "q8" (Q8_0 blocks, ceil(in/32) * 34 bytes a row)
    const uint8_t* data = nullptr;  // into `owned`, or into the sidecar mapping
    size_t bytes = 0;
    std::vector<int64_t> shape;     // the logical shape, [out, in]
    std::vector<uint8_t> owned;     // the decoded base64 (empty for a sidecar tensor)
};

// A loaded model: the buffers the ModelWeights pointers refer to live as long as this object.
struct LoadedModel {
    std::shared_ptr<const void> sidecar;  // the sidecar mapping, when there is one
    std::unique_ptr<ModelWeights> model;
    std::map<std::string, std::vector<float>> weights;  // decoded base64 tensors (and the RoPE cache)
    std::string weight_format = "f32";            // the file's "weight_format": f32, bf16 or q8
    std::map<std::string, StoredWeight> stored;   // its reduced weights' bytes (bound: their float32 decoding)
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
    const json* obj = nullptr;
    std::string where;  // "PATH: tensor 'name'" or "PATH: weights.layers[i]: tensor 'wq'"
    TensorRef ref;
    std::string section, label;  // where it is missing from, the name it has in the file
    DType reduced = DType::F32;  // BF16 or Q8_0: a weight the file's weight_format reduces
};

// Members assigned by name, not brace-initialized by position (g++ 12 then warned that the
// TensorRef's vector may be used uninitialized).
inline Slot make_slot(std::string name, std::vector<int64_t> shape, const json* obj, std::string section,
                      std::string label) {
    Slot s;
    s.name = std::move(name);
    s.shape = std::move(shape);
    s.obj = obj;
    s.section = std::move(section);
    s.label = std::move(label);
    s.where = cat(s.section, ": tensor '", s.label, "'");
    return s;
}

// ---- Step 1: the JSON text ----

inline json parse_json_text(const std::string& where, std::string_view text) {
    json doc;
    std::string error;
    if (!parse_strict_json(text, doc, error)) refuse(where, error, "; the file may be truncated or not a model file");
    if (!doc.is_object()) refuse(where, "top level must be a JSON object, got ", type_name(doc));
    return doc;
}

// ---- Step 2: the layout ----

// The `sidecar` field of format 1.
struct SidecarField {
    std::string file;              // a plain file name in the model file's folder
    std::optional<int64_t> bytes;  // absent in files written before it existed
};

struct Layout {
    bool v0 = false;  // the original CelerInfer layout (no format_version)
    const json *config = nullptr, *inputs = nullptr, *rope = nullptr, *weights = nullptr, *meta = nullptr;
    std::optional<SidecarField> sidecar;
    std::string weight_format = "f32";  // "weight_format": f32 (also when absent), bf16 or q8
};

// Which layout: format_version names this project's format (it must be format 1), weights.layers the
// original one. Returns whether it is the original layout.
inline bool is_original_layout(const json& doc, const std::string& where) {
    const json* version = find(doc, "format_version");
    if (!version) {
        const json* weights = find(doc, "weights");
        if (!(weights && weights->is_object() && find(*weights, "layers")))
            refuse(where, "not a model file: no 'format_version' (this project's format) and no 'weights.layers' "
                   "(original CelerInfer layout)");
        return true;
    }
    const json* format = find(doc, "format");
    if (!(format && format->is_string() && format->get_ref<const std::string&>() == "celerinfer-lab"))
        refuse(where, "format is ", format ? short_repr(*format) : std::string("missing"), ", expected 'celerinfer-lab'");
    int64_t x = 0;
    if (as_int(*version, x) != IntKind::Ok || x != 1)
        refuse(where, "format_version ", short_repr(*version), " is not supported (this version reads 1)");
    return false;
}

inline void check_sidecar_name(const std::string& name, const std::string& where) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
        name.find('\0') != std::string::npos)
        refuse(where, "sidecar.file '", strict_json_detail::printable(name), "' must be a plain file name in the model "
               "file's folder (no '/', not '.' or '..')");
}

// Exactly {"file": NAME, "format": "safetensors", "bytes": N}; refused in the original layout, which
// never had a sidecar (ignoring it would load other weights than meant).
inline SidecarField read_sidecar_field(const json& side, bool v0, const std::string& where) {
    if (v0) refuse(where, "sidecar: only this project's format (format_version 1) has a sidecar");
    if (!side.is_object()) refuse(where, "sidecar must be {\"file\": NAME, \"format\": \"safetensors\"}");
    for (const auto& item : side.items())
        if (item.key() != "file" && item.key() != "format" && item.key() != "bytes")
            refuse(where, "sidecar must be {\"file\": NAME, \"format\": \"safetensors\", \"bytes\": SIZE}; it has '",
                   strict_json_detail::printable(item.key()), "'");
    const json *file = find(side, "file"), *format = find(side, "format"), *nbytes = find(side, "bytes");
    if (!(file && file->is_string() && format && format->is_string() &&
          format->get_ref<const std::string&>() == "safetensors"))
        refuse(where, "sidecar must be {\"file\": NAME, \"format\": \"safetensors\"}");
    SidecarField out;
    out.file = file->get<std::string>();
    check_sidecar_name(out.file, where);
    if (nbytes) {
        int64_t x = 0;
        if (as_int(*nbytes, x) != IntKind::Ok || x < 0)
            refuse(where, "sidecar.bytes=", short_repr(*nbytes), ": must be an integer >= 0");
        out.bytes = x;
    }
    return out;
}

inline Layout check_layout(const json& doc, const std::string& where) {
    Layout l;
    l.v0 = is_original_layout(doc, where);
    l.config = &section(doc, "config", where);
    l.inputs = &section(doc, "inputs", where);
    l.rope = &section(doc, "rope", where);
    l.weights = &section(doc, "weights", where);
    l.meta = find(doc, "meta");
    if (l.meta && !l.meta->is_object()) refuse(where, "field 'meta' must be a JSON object, got ", type_name(*l.meta));
    if (const json* side = find(doc, "sidecar")) l.sidecar = read_sidecar_field(*side, l.v0, where);
    if (const json* format = find(doc, "weight_format")) {  // the original layout never had one
        if (l.v0) refuse(where, "weight_format: only this project's format (format_version 1) has one");
        const bool known = format->is_string() && (*format == "f32" || *format == "bf16" || *format == "q8");
        if (!known) refuse(where, "weight_format ", short_repr(*format), " is not one of 'f32', 'bf16', 'q8'");
        l.weight_format = format->get<std::string>();
    }
    return l;
}

// What the original layout adds before its config is read.
struct OriginalLayout {
    const json* layers = nullptr;             // weights.layers, a list
    const json* head_dim_fallback = nullptr;  // meta.head_dim, for a config without head_dim
    std::optional<bool> tie_override;         // the tie a config without tie_word_embeddings implies
};

// The original names outside weights.layers, for the message.
inline std::string original_top_names() {
    std::string top;
    for (const WeightRow& row : kWeightRows)
        if (row.scope == Scope::Model && row.v0) top += cat(row.v0, ", ");
    return top.substr(0, top.size() - 2);
}

// The original layout: its own names outside weights.layers, those every config needs, a layers list.
inline OriginalLayout check_original_layout(const Layout& l, const std::string& where) {
    OriginalLayout o;
    if (!l.v0) return o;
    const json& weights = *l.weights;
    for (auto it = weights.begin(); it != weights.end(); ++it)
        if (it.key() != "layers" && !is_v0_name(Scope::Model, it.key()))
            refuse(where, "unexpected tensor 'weights.", strict_json_detail::printable(it.key()),
                   "' (the original layout has ", original_top_names(), " and layers)");
    for (const WeightRow& row : kWeightRows)  // those every config needs (lm_head: only untied)
        if (row.scope == Scope::Model && row.v0 && row.feature == Feature::Always && !find(weights, row.v0))
            refuse(where, "missing tensor '", row.v0, "'");
    o.layers = find(weights, "layers");
    if (!o.layers->is_array()) refuse(where, "weights.layers must be a list, got ", type_name(*o.layers));
    if (l.meta) o.head_dim_fallback = find(*l.meta, "head_dim");
    if (!find(*l.config, "tie_word_embeddings")) {  // the original generator wrote a tied lm_head as a copy
        const json* head = find(weights, "lm_head");
        o.tie_override = !head || same_tensor(*head, weights["tok_embedding"]);
    }
    return o;
}

// ---- Step 4: the tensor table, against the config ----

// The sidecar's bytes (opened, not yet read), with the size the model file records.
inline SidecarBytes open_sidecar(const Layout& l, const SidecarProvider& provider, const std::string& where) {
    SidecarBytes out;
    if (!l.sidecar) return out;
    out = provider(l.sidecar->file);
    if (l.sidecar->bytes && uint64_t(*l.sidecar->bytes) != out.size)
        refuse(where, "sidecar: the file holds ", out.size, " bytes, the model file says ", *l.sidecar->bytes,
               " (replaced or truncated?)");
    return out;
}

// Every weight takes at least 2 bytes (float16, the smallest float type), at least 1 in a q8 file
// (Q8_0: 34 bytes per 32): a config larger than the file is refused before its tensors are enumerated.
inline void check_file_room(const Config& c, size_t text_size, const SidecarBytes& side, const Layout& l,
                            const std::string& where) {
    const bool has_sidecar = l.sidecar.has_value();
    const __int128 min_bytes = (l.weight_format == "q8" ? 1 : 2) * elements_implied(c);
    const __int128 room = __int128(text_size) / 4 * 3 + __int128(side.size);
    if (min_bytes > room)
        refuse(where, "the config implies ", with_commas(int64_t(std::min<__int128>(elements_implied(c), INT64_MAX))),
               " weight values, more than the file can hold (", text_size, " bytes",
               has_sidecar ? cat(" and a sidecar of ", side.size, " bytes") : std::string(), ")");
}

// The original layout: one weights.layers entry per layer, each with original names only, a tie its
// lm_head agrees with, and no feature it has no names for.
inline void check_original_entries(const Config& c, const json& weights, const json& layers, const std::string& where) {
    if (int64_t(layers.size()) != c.layers)
        refuse(where, "weights.layers has ", layers.size(), " entries, the config has num_hidden_layers=", c.layers);
    for (size_t i = 0; i < layers.size(); ++i) {
        const json& layer = layers[i];
        const std::string lw = cat(where, ": weights.layers[", i, "]");
        if (!layer.is_object()) refuse(lw, "must be a JSON object, got ", type_name(layer));
        for (auto it = layer.begin(); it != layer.end(); ++it)
            if (!is_v0_name(Scope::Layer, it.key()))
                refuse(lw, "unexpected tensor '", strict_json_detail::printable(it.key()), "'");
    }
    const json* head = find(weights, "lm_head");
    if (c.tied && head && !same_tensor(*head, weights["tok_embedding"]))
        refuse(where, "tie_word_embeddings is true but lm_head differs from tok_embedding");
    if (!c.tied && !head) refuse(where, "missing tensor 'lm_head' (tie_word_embeddings is false)");
    if (c.qk_norm || c.moe)
        refuse(where, "config: ", c.qk_norm ? "qk_norm" : "use_moe", " is true, but the original layout cannot hold ",
               c.qk_norm ? "q_norm/k_norm weights" : "experts", " (missing tensor 'model.layers.0.",
               c.qk_norm ? "self_attn.q_norm.weight" : "mlp.gate.weight", "')");
}

// Format 1: a file with far fewer entries than the config implies is refused before the implied
// names are built (their number is the config's, not the file's).
inline void check_tensor_count(const Config& c, const json& weights, const std::string& where) {
    const int64_t count = tensors_implied(c), present = int64_t(weights.size());
    if (count > present + 16) refuse(where, "the config implies ", with_commas(count), " weight tensors, the file has ", present);
}

// One slot per weight the config implies, found in the file; the first one missing is refused.
inline std::vector<Slot> find_implied_weights(const Config& c, const Layout& l, const json* layers,
                                              const std::string& where) {
    std::vector<Slot> slots;
    const DType reduced = l.weight_format == "bf16" ? DType::BF16 : l.weight_format == "q8" ? DType::Q8_0 : DType::F32;
    for (Implied& t : weights_implied(c)) {
        if (!l.v0) {
            slots.push_back(make_slot(t.name, std::move(t.shape), find(*l.weights, t.name.c_str()), where, t.name));
        } else {  // dense, no qk_norm (checked before): each weight the table implies has an original name
            if (!t.row->v0) refuse(where, "the original layout has no name for tensor '", t.name, "'");
            if (t.layer < 0)
                slots.push_back(make_slot(t.name, std::move(t.shape), find(*l.weights, t.row->v0), where, t.row->v0));
            else
                slots.push_back(make_slot(t.name, std::move(t.shape), find((*layers)[size_t(t.layer)], t.row->v0),
                                          cat(where, ": weights.layers[", t.layer, "]"), t.row->v0));
        }
        Slot& s = slots.back();
        if (t.row->reducible && has_feature(c, t.row->reduced_when)) s.reduced = reduced;  // schema.reduced_weights
        if (!s.obj) refuse(s.section, "missing tensor '", s.label, "' (the config needs it, shape ", shape_str(s.shape), ")");
    }
    return slots;
}

// Format 1: no entry besides the implied weights.
inline void check_no_unexpected_weights(const Config& c, const std::vector<Slot>& slots, const json& weights,
                                        const std::string& where) {
    if (int64_t(weights.size()) == tensors_implied(c)) return;
    std::set<std::string> implied;
    for (const Slot& s : slots) implied.insert(s.name);
    for (auto it = weights.begin(); it != weights.end(); ++it)
        if (!implied.count(it.key()))
            refuse(where, "unexpected tensor '", strict_json_detail::printable(it.key()), "' (not a weight of this config)");
}

// Each weight's tensor object; returns those the JSON marks "encoding": "sidecar".
inline std::vector<Slot*> check_weight_tensors(std::vector<Slot>& slots, const Layout& l) {
    std::vector<Slot*> marked;
    for (Slot& s : slots) {
        s.ref = check_tensor(*s.obj, s.where, &s.shape, TensorKind::Weight, !l.v0, nullptr, s.reduced);
        if (s.ref.sidecar) {
            if (!l.sidecar) refuse(s.where, "encoding 'sidecar' but the file names no sidecar");
            marked.push_back(&s);
        }
    }
    return marked;
}

// rope.cos and rope.sin: [max_position_embeddings, head_dim], base64 only.
inline std::array<Slot, 2> check_rope_tensors(const Config& c, const json& rope, const std::string& where) {
    const std::vector<int64_t> rope_shape = {c.max_pos, c.head_dim};
    std::array<Slot, 2> out;
    for (int k = 0; k < 2; ++k) {
        const char* key = k ? "sin" : "cos";
        const json* obj = find(rope, key);
        if (!obj) refuse(where, "missing tensor 'rope.", key, "'");
        out[size_t(k)] = make_slot(std::string("rope.") + key, rope_shape, obj, where, std::string("rope.") + key);
        out[size_t(k)].ref = check_tensor(*obj, out[size_t(k)].where, &rope_shape, TensorKind::Float, false);
    }
    return out;
}

struct InputTensors {
    TensorRef ids, mask;  // [batch, seq_len] each
};

// input_ids [batch >= 1, 1 <= seq_len <= max_position_embeddings], attention_mask of the same shape.
inline InputTensors check_input_tensors(const Config& c, const json& inputs, const std::string& where) {
    for (const char* key : {"input_ids", "attention_mask"})
        if (!find(inputs, key)) refuse(where, "missing tensor '", key, "'");
    InputTensors t;
    t.ids = check_tensor(inputs["input_ids"], cat(where, ": tensor 'input_ids'"), nullptr, TensorKind::Int, false);
    if (t.ids.shape.size() != 2 || t.ids.shape[0] < 1 || t.ids.shape[1] < 1)
        refuse(where, "input_ids has shape ", shape_str(t.ids.shape), ", expected [batch >= 1, seq_len >= 1]");
    t.mask = check_tensor(inputs["attention_mask"], cat(where, ": tensor 'attention_mask'"), &t.ids.shape, TensorKind::Int,
                          false, "input_ids has");
    if (t.ids.shape[1] > c.max_pos)
        refuse(where, "seq_len ", t.ids.shape[1], " is longer than max_position_embeddings ", c.max_pos);
    return t;
}

// Step 4's result: every tensor's layout checked, no value read.
struct TensorTable {
    std::vector<Slot> weights;   // in the weight table's order
    std::vector<Slot*> marked;   // the weights the JSON marks "encoding": "sidecar" (into `weights`)
    std::array<Slot, 2> rope;    // rope.cos, rope.sin
    InputTensors inputs;
};

// Counted before enumerated: the implied names are only built once the file may hold them.
inline TensorTable check_tensor_table(const Config& c, const Layout& l, const OriginalLayout& o,
                                      const std::string& where) {
    TensorTable t;
    if (l.v0) check_original_entries(c, *l.weights, *o.layers, where);
    else check_tensor_count(c, *l.weights, where);
    t.weights = find_implied_weights(c, l, o.layers, where);
    if (!l.v0) check_no_unexpected_weights(c, t.weights, *l.weights, where);
    t.marked = check_weight_tensors(t.weights, l);
    t.rope = check_rope_tensors(c, *l.rope, where);
    t.inputs = check_input_tensors(c, *l.inputs, where);
    return t;
}

// ---- Step 5: the sidecar header ----

struct SidecarEntry {
    std::string name;
    std::string dtype;  // F32, BF16 (bfloat16 bits) or U8 (Q8_0 blocks)
    std::vector<int64_t> shape;
    uint64_t start = 0, end = 0;
};

// The bytes per element of a sidecar dtype; 0: not one a model file's sidecar holds.
inline uint64_t sidecar_itemsize(const json& dtype) {
    if (!dtype.is_string()) return 0;
    const std::string& d = dtype.get_ref<const std::string&>();
    return d == "F32" ? 4 : d == "BF16" ? 2 : d == "U8" ? 1 : 0;
}

// The 8-byte little-endian header length: a multiple of 8 that fits in the file.
inline uint64_t sidecar_header_length(const SidecarBytes& bytes, const std::string& w) {
    if (bytes.size < 8) refuse(w, "too short to be a safetensors file (", bytes.size, " bytes)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes.data[i];
    if (n % 8) refuse(w, "header length ", n, " is not a multiple of 8");
    if (n > bytes.size - 8) refuse(w, "header length ", n, " runs past the end of the file (", bytes.size, " bytes)");
    return n;
}

inline json parse_sidecar_header(const SidecarBytes& bytes, uint64_t n, const std::string& w) {
    json header;
    std::string error;
    if (!parse_strict_json(std::string_view(reinterpret_cast<const char*>(bytes.data) + 8, size_t(n)), header, error))
        refuse(w, "the safetensors header: ", error);
    if (!header.is_object()) refuse(w, "the safetensors header must be a JSON object, got ", type_name(header));
    return header;
}

// An entry's shape, into `out`; returns the bytes it needs at `itemsize` bytes an element (UINT64_MAX
// when past 2^64).
inline uint64_t read_sidecar_shape(const json& shape, std::vector<int64_t>& out, const std::string& tw,
                                   uint64_t itemsize) {
    if (!shape.is_array()) refuse(tw, "shape must be a list of non-negative integers");
    uint64_t bytes_needed = itemsize;
    for (const json& d : shape) {
        int64_t x = 0;
        if (as_int(d, x) != IntKind::Ok || x < 0) refuse(tw, "shape must be a list of non-negative integers");
        out.push_back(x);
        if (__builtin_mul_overflow(bytes_needed, uint64_t(x), &bytes_needed)) bytes_needed = UINT64_MAX;
    }
    return bytes_needed;
}

// One header entry: {"dtype": "F32" | "BF16" | "U8", "shape": [...], "data_offsets": [start, end]} (more
// keys are ignored, as the safetensors package does), its bytes those of its shape, inside the data section.
inline SidecarEntry read_sidecar_entry(const std::string& name, const json& info, uint64_t data_size,
                                       const std::string& tw) {
    if (!info.is_object()) refuse(tw, "must be a JSON object, got ", type_name(info));
    const json *dtype = find(info, "dtype"), *shape = find(info, "shape"), *offsets = find(info, "data_offsets");
    if (!dtype || !shape || !offsets) refuse(tw, "needs dtype, shape and data_offsets");
    const uint64_t itemsize = sidecar_itemsize(*dtype);
    if (!itemsize) refuse(tw, "has dtype ", short_repr(*dtype), "; readable: 'F32', 'BF16', 'U8' (Q8_0)");
    SidecarEntry e;
    e.name = name;
    e.dtype = dtype->get<std::string>();
    const uint64_t bytes_needed = read_sidecar_shape(*shape, e.shape, tw, itemsize);
    int64_t start = 0, end = 0;
    if (!offsets->is_array() || offsets->size() != 2 || as_int((*offsets)[0], start) != IntKind::Ok ||
        as_int((*offsets)[1], end) != IntKind::Ok || start < 0 || end < start)
        refuse(tw, "data_offsets must be [start, end], integers with 0 <= start <= end");
    e.start = uint64_t(start);
    e.end = uint64_t(end);
    if (e.end - e.start != bytes_needed)
        refuse(tw, "data_offsets [", start, ", ", end, "] hold ", e.end - e.start, " bytes, its shape of ", e.dtype,
               " needs ", bytes_needed);
    if (e.end > data_size)
        refuse(tw, "needs bytes ", start, "..", end, " of the data, the file holds ", data_size, " (truncated?)");
    return e;
}

inline std::vector<SidecarEntry> read_sidecar_entries(const json& header, uint64_t data_size, const std::string& w) {
    std::vector<SidecarEntry> entries;
    for (auto it = header.begin(); it != header.end(); ++it) {
        if (it.key() == "__metadata__") {
            if (!it->is_object()) refuse(w, "__metadata__ must be a JSON object");
            continue;
        }
        const std::string tw = w + ": tensor '" + strict_json_detail::printable(it.key()) + "'";
        entries.push_back(read_sidecar_entry(it.key(), *it, data_size, tw));
    }
    return entries;
}

// Sorted by start, the entries tile the data section exactly: no gap, no overlap, from 0 to its end.
inline void check_sidecar_tiling(std::vector<SidecarEntry>& entries, uint64_t data_size, const std::string& w) {
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
}

// The sidecar holds exactly the tensors the JSON marks "sidecar", each with the JSON's dtype (float32:
// F32, bfloat16: BF16, q8_0: U8) and shape (q8_0 [out, in]: U8 [out, ceil(in/32) * 34]).
inline std::map<std::string, const uint8_t*> match_sidecar_tensors(const std::vector<SidecarEntry>& entries,
                                                                   const std::vector<Slot*>& marked, const uint8_t* base,
                                                                   const std::string& w) {
    std::map<std::string, const SidecarEntry*> by_name;
    for (const SidecarEntry& e : entries) by_name[e.name] = &e;
    std::map<std::string, const uint8_t*> out;
    for (const Slot* s : marked) {
        auto it = by_name.find(s->name);
        if (it == by_name.end()) refuse(s->where, "not in the sidecar");
        const DType d = s->ref.dtype;
        const char* want = d == DType::BF16 ? "BF16" : d == DType::Q8_0 ? "U8" : "F32";
        if (it->second->dtype != want)
            refuse(s->where, "the sidecar holds ", it->second->dtype, ", a ", dtype_name(d), " weight is ", want);
        std::vector<int64_t> shape = s->shape;
        if (d == DType::Q8_0) shape = {s->shape[0], q8_row_bytes(s->shape[1])};
        if (it->second->shape != shape)
            refuse(s->where, "the JSON says shape ", shape_str(s->shape),
                   d == DType::Q8_0 ? cat(" (Q8_0 bytes ", shape_str(shape), " in the sidecar)") : std::string(),
                   ", the sidecar holds ", shape_str(it->second->shape));
        out[s->name] = base + it->second->start;
    }
    if (out.size() != entries.size())
        for (const SidecarEntry& e : entries)
            if (!out.count(e.name))
                refuse(w, "tensor '", strict_json_detail::printable(e.name),
                       "' is not a weight the model file marks \"encoding\": \"sidecar\"");
    return out;
}

// Step 5: the safetensors header, against the data section and the JSON's sidecar tensors.
inline std::map<std::string, const uint8_t*> check_sidecar(const SidecarBytes& bytes, const std::string& where,
                                                           const std::vector<Slot*>& marked) {
    const std::string w = where + ": sidecar";
    const uint64_t n = sidecar_header_length(bytes, w);
    const json header = parse_sidecar_header(bytes, n, w);
    const uint64_t data_size = bytes.size - 8 - n;
    std::vector<SidecarEntry> entries = read_sidecar_entries(header, data_size, w);
    check_sidecar_tiling(entries, data_size, w);
    return match_sidecar_tensors(entries, marked, bytes.data + 8 + n, w);
}

// ---- Step 6: the values ----

using BoundWeights = std::vector<std::pair<std::string, std::pair<const float*, std::vector<int64_t>>>>;

// A reduced weight's stored bytes: the sidecar's (`mapped`), or base64 decoded into the entry.
inline StoredWeight& stored_entry(const Slot& s, const uint8_t* mapped, LoadedModel& out) {
    StoredWeight& w = out.stored[s.name];
    w.format = format_of(s.ref.dtype);
    w.shape = s.shape;
    w.bytes = size_t(s.ref.nbytes);
    w.data = mapped;
    return w;
}

// A weight's values: its view into the sidecar (float32 at a 4-byte aligned offset), or decoded into
// out.weights (base64; a misaligned float32 sidecar tensor is copied); a reduced weight's float32
// decoding, its stored bytes kept in out.stored. Non-finite values refused unless allowed.
inline void read_weight_values(const Slot& s, const std::map<std::string, const uint8_t*>& mapped,
                               bool check_finite_values, LoadedModel& out, BoundWeights& bound) {
    const size_t n = size_t(s.ref.numel);
    if (s.ref.sidecar && s.ref.dtype == DType::F32 && reinterpret_cast<uintptr_t>(mapped.at(s.name)) % alignof(float) == 0) {
        const float* p = reinterpret_cast<const float*>(mapped.at(s.name));
        if (check_finite_values) check_finite(p, n, s.where);
        bound.push_back({s.name, {p, s.shape}});
        return;
    }
    std::vector<float>& buf = out.weights[s.name];
    if (!s.ref.sidecar) {
        std::vector<uint8_t> raw;
        decode_floats(s.ref, s.where, buf, check_finite_values, is_reduced_dtype(s.ref.dtype) ? &raw : nullptr);
        if (is_reduced_dtype(s.ref.dtype)) {
            StoredWeight& w = stored_entry(s, nullptr, out);
            w.owned = std::move(raw);
            w.data = w.owned.data();
        }
    } else if (s.ref.dtype == DType::F32) {
        buf.resize(n);
        std::memcpy(buf.data(), mapped.at(s.name), n * sizeof(float));
        if (check_finite_values) check_finite(buf.data(), n, s.where);
    } else {
        buf.resize(n);
        decode_reduced(s.ref.dtype, mapped.at(s.name), n, s.shape.back(), s.where, buf.data(), check_finite_values);
        stored_entry(s, mapped.at(s.name), out);
    }
    bound.push_back({s.name, {buf.data(), s.shape}});
}

// Token ids in [0, vocab_size), the mask only 0 and 1; messages name [batch, position].
inline void check_input_values(const LoadedModel& out, int64_t seq_len, int64_t vocab, const std::string& where) {
    const int64_t S = seq_len;
    for (size_t i = 0; i < out.input_ids.size(); ++i)
        if (out.input_ids[i] < 0 || out.input_ids[i] >= vocab)
            refuse(where, "input_ids[", int64_t(i) / S, ",", int64_t(i) % S, "] = ", out.input_ids[i],
                   " is outside the vocabulary [0, ", vocab, ")");
    for (size_t i = 0; i < out.attention_mask.size(); ++i)
        if (out.attention_mask[i] != 0 && out.attention_mask[i] != 1)
            refuse(where, "attention_mask[", int64_t(i) / S, ",", int64_t(i) % S, "] = ", out.attention_mask[i],
                   "; the mask must hold only 0 and 1");
}

// Every value read and checked, the inputs decoded; returns the views to bind.
inline BoundWeights read_values(const TensorTable& table, const std::map<std::string, const uint8_t*>& mapped,
                                const Config& c, const LoadOptions& options, const std::string& where,
                                LoadedModel& out) {
    BoundWeights bound;
    for (const Slot& s : table.weights) read_weight_values(s, mapped, !options.allow_nonfinite, out, bound);
    for (const Slot& s : table.rope) read_weight_values(s, mapped, !options.allow_nonfinite, out, bound);
    const InputTensors& in = table.inputs;
    out.input_ids = decode_ints(in.ids, cat(where, ": tensor 'input_ids'"));
    out.attention_mask = decode_ints(in.mask, cat(where, ": tensor 'attention_mask'"));
    check_input_values(out, in.ids.shape[1], c.vocab, where);
    out.batch = int(in.ids.shape[0]);
    out.seq_len = int(in.ids.shape[1]);
    return bound;
}

}  // namespace model_file_detail

// The core: check and load a model file from its JSON text and a sidecar provider, in the order of
// docs/model-file.md ("What a reader checks, in order"). `where` names the file in messages.
inline LoadedModel parse_model_file(const std::string& where, std::string_view text, const SidecarProvider& sidecar,
                                    const LoadOptions& options = {}) {
    using namespace model_file_detail;
    const json doc = parse_json_text(where, text);                         // 1. the JSON text
    const Layout layout = check_layout(doc, where);                        // 2. the layout
    const OriginalLayout original = check_original_layout(layout, where);  //    (the original one's names)
    const Config c = read_model_config(*layout.config, where, original.head_dim_fallback, original.tie_override);  // 3.
    const SidecarBytes side = open_sidecar(layout, sidecar, where);        // 4. the tensor table
    check_file_room(c, text.size(), side, layout, where);
    const TensorTable table = check_tensor_table(c, layout, original, where);
    std::map<std::string, const uint8_t*> mapped;                          // 5. the sidecar header
    if (layout.sidecar) mapped = check_sidecar(side, where, table.marked);
    LoadedModel out;                                                       // 6. the values
    out.sidecar = side.keep;
    out.weight_format = layout.weight_format;
    const BoundWeights bound = read_values(table, mapped, c, options, where, out);

    // Everything checked: size the model and bind its weights.
    out.model = std::make_unique<ModelWeights>(c);
    for (const auto& [name, view] : bound) out.model->bind(name, view.first, view.second);
    // A bf16/q8 file's stored bytes too: the kernel sets of its format read them, the others the decoding.
    for (const auto& [name, s] : out.stored)
        out.model->bind_stored(name, s.format == "bf16" ? WeightFormat::BF16 : WeightFormat::Q8, s.data, s.bytes);
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
