// One TENSOR object of a model file: its layout checked against what the config implies (no
// decoding, nothing sized), then its strict base64 decoded into float32 or int64 buffers. A weight a
// bf16/q8 file reduces has dtype bfloat16 (uint16 bits, the weight's shape) or q8_0 (llama.cpp's Q8_0
// blocks of a float16 scale and 32 int8, ceil(in/32) * 34 bytes per row of the logical [out, in]).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "model_file_config.hpp"
#include "strict_json.hpp"

namespace celerinfer {

enum class DType { F32, F64, F16, I32, I64, U8, BF16, Q8_0 };
enum class TensorKind { Float, Int, Weight };  // Weight: a float type, or the file's reduced dtype

// kQ8Block (32 weights per Q8_0 block along the input dimension) and kQ8BlockBytes (a float16 scale
// + 32 int8): model.hpp, shared with the q8 kernel sets.

struct TensorRef {
    DType dtype = DType::F32;
    bool sidecar = false;
    const std::string* data = nullptr;  // the base64 text (not for a sidecar tensor)
    std::vector<int64_t> shape;
    int64_t numel = 0, nbytes = 0;
};

namespace model_file_detail {

inline std::string shape_str(const std::vector<int64_t>& shape) {
    std::string out = "[";
    for (size_t i = 0; i < shape.size() && i < 8; ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    if (shape.size() > 8) out += ", ... (" + std::to_string(shape.size()) + " sizes)";
    return out + "]";
}

inline size_t dtype_size(DType d) {
    switch (d) {
        case DType::F64: case DType::I64: return 8;
        case DType::F32: case DType::I32: return 4;
        case DType::F16: case DType::BF16: return 2;
        default: return 1;  // U8, and Q8_0's bytes
    }
}

inline const char* dtype_name(DType d) {
    static const char* const names[] = {"float32", "float64", "float16", "int32", "int64", "uint8", "bfloat16", "q8_0"};
    return names[int(d)];
}

inline int base64_value(unsigned char ch) {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
}

inline int64_t base64_length(int64_t nbytes) { return (nbytes + 2) / 3 * 4; }

// Decode strict base64 (standard alphabet, '=' padding only at the end) of exactly `n` bytes into
// dst; text.size() == base64_length(n) is already checked. Returns the index of the first bad
// character, or -1.
inline int64_t base64_decode_into(const std::string& text, uint8_t* dst, size_t n) {
    const size_t pad = (3 - n % 3) % 3, len = text.size();
    size_t out = 0;
    for (size_t i = 0; i < len; i += 4) {
        uint32_t v = 0;
        for (size_t j = 0; j < 4; ++j) {
            const size_t at = i + j;
            int x;
            if (at >= len - pad) {
                if (text[at] != '=') return int64_t(at);
                x = 0;
            } else {
                x = base64_value(static_cast<unsigned char>(text[at]));
                if (x < 0) return int64_t(at);
            }
            v = (v << 6) | uint32_t(x);
        }
        for (int k = 2; k >= 0 && out < n; --k) dst[out++] = uint8_t(v >> (8 * k));
    }
    return -1;
}

// Any strict base64 text (the padding decides the byte count). False when invalid.
inline bool base64_decode_to(const std::string& text, std::vector<uint8_t>& out) {
    if (text.size() % 4) return false;
    size_t pad = 0;
    while (pad < 2 && pad < text.size() && text[text.size() - 1 - pad] == '=') ++pad;
    const size_t n = text.size() / 4 * 3 - pad;
    out.assign(n, 0);
    return base64_decode_into(text, out.data(), n) < 0;
}

inline float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);  // Inf, NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: mant * 2^-24, exact in float
        float f = std::ldexp(float(mant), -24);
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// The shape field: a list of non-negative integers.
inline std::vector<int64_t> read_shape(const json& shape, const std::string& where) {
    std::vector<int64_t> out;
    bool shape_ok = shape.is_array();
    if (shape_ok)
        for (const json& d : shape) {
            int64_t x = 0;
            if (as_int(d, x) != IntKind::Ok || x < 0) {
                shape_ok = false;
                break;
            }
            out.push_back(x);
        }
    if (!shape_ok) refuse(where, "shape is not a list of non-negative integers");
    return out;
}

inline bool is_reduced_dtype(DType d) { return d == DType::BF16 || d == DType::Q8_0; }

inline const char* format_of(DType d) { return d == DType::BF16 ? "bf16" : "q8"; }

// The dtype field: a known name, a float type for weights and RoPE, an integer type for inputs. A
// weight (kind Weight) the file's weight_format reduces has exactly `reduced` (BF16 or Q8_0); those
// two are for such weights only. `reduced` is F32 for a weight that is not reduced.
inline DType read_dtype(const json& dtype, TensorKind kind, const std::string& where, DType reduced = DType::F32) {
    int found = -1;
    if (dtype.is_string())
        for (int i = 0; i < 8; ++i)
            if (dtype.get_ref<const std::string&>() == dtype_name(DType(i))) found = i;
    if (kind == TensorKind::Weight && is_reduced_dtype(reduced) && found != int(reduced))
        refuse(where, "dtype ", short_repr(dtype), ", but the file's weight_format is '", format_of(reduced),
               "': its reduced weights (projections, experts, head) must be ", dtype_name(reduced));
    if (found < 0)
        refuse(where, "unknown dtype ", short_repr(dtype), "; known: float32, float64, float16, int32, int64, uint8, bfloat16, q8_0");
    if (kind == TensorKind::Weight && is_reduced_dtype(DType(found)) && !is_reduced_dtype(reduced))
        refuse(where, "dtype '", dtype_name(DType(found)), "' is only for the weights a ", format_of(DType(found)),
               " model reduces, in a file whose weight_format is '", format_of(DType(found)),
               "'; this weight stays a float type (norms and the router always do)");
    if (kind == TensorKind::Weight && is_reduced_dtype(reduced)) return DType(found);
    const bool is_float = found < 3;
    if (kind != TensorKind::Int && !is_float)
        refuse(where, "has dtype ", dtype_name(DType(found)), ", weights and the RoPE cache must be floating point");
    if (kind == TensorKind::Int && (is_float || is_reduced_dtype(DType(found))))
        refuse(where, "has dtype ", dtype_name(DType(found)), ", input_ids and attention_mask must be integers");
    return DType(found);
}

// The shape the config implies (or, with `other`, the shape of the tensor named `other`).
inline void check_shape(const std::vector<int64_t>& shape, const std::vector<int64_t>* expected, const char* other,
                        const std::string& where) {
    if (!expected || shape == *expected) return;
    if (other) throw ModelFileError(cat(where, " has shape ", shape_str(shape), ", ", other, " ", shape_str(*expected)));
    throw ModelFileError(cat(where, " has shape ", shape_str(shape), ", the config implies ", shape_str(*expected)));
}

// Bytes of one row of a Q8_0 matrix with `in` weights: ceil(in/32) blocks of 34 bytes.
inline int64_t q8_row_bytes(int64_t in) { return (in + kQ8Block - 1) / kQ8Block * kQ8BlockBytes; }

// numel and nbytes without overflow, nbytes small enough for its base64 length to fit int64. A
// q8_0 tensor (a checked [out, in]) holds out * q8_row_bytes(in) bytes.
inline void count_elements(TensorRef& t, const std::string& where) {
    int64_t numel = 1;
    for (int64_t d : t.shape)
        if (__builtin_mul_overflow(numel, d, &numel)) refuse(where, "shape ", shape_str(t.shape), " is too large");
    bool overflow;
    if (t.dtype == DType::Q8_0)
        overflow = t.shape.size() != 2 || __builtin_mul_overflow(t.shape[0], q8_row_bytes(t.shape[1]), &t.nbytes);
    else
        overflow = __builtin_mul_overflow(numel, int64_t(dtype_size(t.dtype)), &t.nbytes);
    if (overflow || t.nbytes > (INT64_MAX / 4 - 4)) refuse(where, "shape ", shape_str(t.shape), " is too large");
    t.numel = numel;
}

// The data field: a string of exactly the base64 length the tensor's bytes need (not yet decoded).
inline const std::string& check_base64_length(const json* data, const TensorRef& t, const std::string& where) {
    if (!data) refuse(where, "tensor has no 'data' field");
    if (!data->is_string()) refuse(where, "data must be a base64 string");
    const std::string& text = data->get_ref<const std::string&>();
    const int64_t need = base64_length(t.nbytes);
    if (int64_t(text.size()) != need) {
        int64_t pad = 0;
        while (pad < 2 && pad < int64_t(text.size()) && text[text.size() - 1 - size_t(pad)] == '=') ++pad;
        const int64_t held = int64_t(text.size()) / 4 * 3 - (text.size() % 4 ? 0 : pad);
        refuse(where, "data holds ", held, " bytes but shape and dtype need ", t.nbytes, " (", t.numel, " elements of ",
               dtype_name(t.dtype), "; ", need, " base64 characters, the data has ", text.size(), ")");
    }
    return text;
}

// The layout of one tensor object (step 4): shape, dtype, shape against `expected`, size, encoding
// ("sidecar" only where `sidecar_ok`, and float32 or the reduced dtype), base64 length. No value is
// decoded. `reduced`: see read_dtype.
inline TensorRef check_tensor(const json& obj, const std::string& where, const std::vector<int64_t>* expected,
                              TensorKind kind, bool sidecar_ok, const char* other = nullptr,
                              DType reduced = DType::F32) {
    if (!obj.is_object()) refuse(where, "a tensor must be a JSON object, got ", type_name(obj));
    const json *shape = find(obj, "shape"), *dtype = find(obj, "dtype"), *enc = find(obj, "encoding"), *data = find(obj, "data");
    for (const auto& [key, v] : {std::pair<const char*, const json*>{"shape", shape}, {"dtype", dtype}})
        if (!v) refuse(where, "tensor has no '", key, "' field");
    TensorRef t;
    t.shape = read_shape(*shape, where);
    t.dtype = read_dtype(*dtype, kind, where, reduced);
    check_shape(t.shape, expected, other, where);
    count_elements(t, where);
    if (enc && !enc->is_string()) refuse(where, "unknown encoding ", short_repr(*enc));
    const std::string encoding = enc ? enc->get<std::string>() : "base64";
    if (encoding == "sidecar" && sidecar_ok) {
        if (t.dtype != DType::F32 && t.dtype != reduced)
            refuse(where, "encoding 'sidecar' needs dtype ", dtype_name(reduced), ", the JSON says ", dtype_name(t.dtype));
        t.sidecar = true;
        return t;
    }
    if (encoding != "base64")
        refuse(where, "unknown encoding ", short_repr(*enc), "; only 'base64'", sidecar_ok ? " and 'sidecar' are" : " is",
               " supported here");
    t.data = &check_base64_length(data, t, where);
    return t;
}

inline std::vector<uint8_t> decode_bytes(const TensorRef& t, const std::string& where) {
    std::vector<uint8_t> raw(size_t(t.nbytes));
    const int64_t bad = base64_decode_into(*t.data, raw.data(), raw.size());
    if (bad >= 0) refuse(where, "data is not valid base64 (character ", bad, ")");
    return raw;
}

[[noreturn]] inline void refuse_nonfinite(const std::string& where, size_t i) {
    refuse(where, "contains NaN or Inf (element ", i, ", in float32); refused unless --allow-nonfinite");
}

inline void check_finite(const float* p, size_t n, const std::string& where) {
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) refuse_nonfinite(where, i);
}

inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = uint32_t(b) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// A reduced weight's stored bytes (bfloat16 bits, or Q8_0 blocks of rows of `in` weights) decoded into
// float32 `out`, exactly as quantize.decode does (a Q8_0 weight: int8 times its float16 scale, in
// double, rounded to float; both fit a float exactly); with `check`, a non-finite value refused.
inline void decode_reduced(DType dtype, const uint8_t* raw, size_t numel, int64_t in, const std::string& where,
                           float* out, bool check) {
    if (dtype == DType::BF16) {
        for (size_t i = 0; i < numel; ++i) {
            uint16_t b;
            std::memcpy(&b, raw + 2 * i, 2);
            out[i] = bf16_to_float(b);
            if (check && !std::isfinite(out[i])) refuse_nonfinite(where, i);
        }
        return;
    }
    const size_t cols = size_t(in), rows = cols ? numel / cols : 0, row_bytes = size_t(q8_row_bytes(in));
    for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < cols; ++j) {
            const uint8_t* block = raw + r * row_bytes + j / kQ8Block * kQ8BlockBytes;
            uint16_t d;
            std::memcpy(&d, block, 2);
            const int8_t q = int8_t(block[2 + j % kQ8Block]);
            const size_t i = r * cols + j;
            out[i] = float(double(q) * double(half_to_float(d)));
            if (check && !std::isfinite(out[i])) refuse_nonfinite(where, i);
        }
}

// Decode a float tensor into float32 (float64 rounded, float16 widened); with `check`, refuse a
// value that is not finite in float32 (NaN, Inf, or a float64 past float32's range). A reduced
// weight (bfloat16, q8_0): decode_reduced, its stored bytes kept in `stored`.
inline void decode_floats(const TensorRef& t, const std::string& where, std::vector<float>& out, bool check,
                          std::vector<uint8_t>* stored = nullptr) {
    const size_t n = size_t(t.numel);
    if (is_reduced_dtype(t.dtype)) {
        std::vector<uint8_t> raw = decode_bytes(t, where);
        out.resize(n);
        decode_reduced(t.dtype, raw.data(), n, t.shape.empty() ? 1 : t.shape.back(), where, out.data(), check);
        if (stored) *stored = std::move(raw);
        return;
    }
    if (t.dtype == DType::F32) {
        out.resize(n);
        const int64_t bad = base64_decode_into(*t.data, reinterpret_cast<uint8_t*>(out.data()), n * 4);
        if (bad >= 0) refuse(where, "data is not valid base64 (character ", bad, ")");
        if (check) check_finite(out.data(), n, where);
        return;
    }
    const std::vector<uint8_t> raw = decode_bytes(t, where);
    out.resize(n);
    for (size_t i = 0; i < n; ++i) {
        if (t.dtype == DType::F64) {
            double v;
            std::memcpy(&v, raw.data() + 8 * i, 8);
            out[i] = float(v);
            if (check && !std::isfinite(out[i])) refuse_nonfinite(where, i);  // also a double past float32's range
        } else {
            uint16_t h;
            std::memcpy(&h, raw.data() + 2 * i, 2);
            if (check && ((h >> 10) & 0x1f) == 0x1f) refuse_nonfinite(where, i);
            out[i] = half_to_float(h);
        }
    }
}

inline std::vector<int64_t> decode_ints(const TensorRef& t, const std::string& where) {
    const std::vector<uint8_t> raw = decode_bytes(t, where);
    const size_t n = size_t(t.numel);
    std::vector<int64_t> out(n);
    for (size_t i = 0; i < n; ++i) {
        if (t.dtype == DType::I64) {
            std::memcpy(&out[i], raw.data() + 8 * i, 8);
        } else if (t.dtype == DType::I32) {
            int32_t v;
            std::memcpy(&v, raw.data() + 4 * i, 4);
            out[i] = v;
        } else {
            out[i] = raw[i];
        }
    }
    return out;
}

}  // namespace model_file_detail
}  // namespace celerinfer
