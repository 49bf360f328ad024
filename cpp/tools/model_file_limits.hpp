// Sizes no real model reaches: a model file whose config passes one of them is refused by name,
// before any buffer is sized from the config. The same numbers are in celerinfer_lab/limits.py
// (tests/test_cpp_fuzz.py checks they agree) and in the table of docs/model-file.md.
#pragma once
#include <cstdint>

namespace celerinfer {

constexpr int64_t MAX_HIDDEN_SIZE = 65536;
constexpr int64_t MAX_LAYERS = 1024;
constexpr int64_t MAX_HEADS = 1024;  // num_attention_heads, and so num_key_value_heads
constexpr int64_t MAX_HEAD_DIM = 4096;
constexpr int64_t MAX_VOCAB = 4194304;
constexpr int64_t MAX_INTERMEDIATE = 1048576;  // intermediate_size, moe_intermediate_size
constexpr int64_t MAX_POSITIONS = 16777216;
constexpr int64_t MAX_EXPERTS = 1024;
constexpr int64_t MAX_SHARED_EXPERTS = 64;
constexpr int64_t MAX_NESTING = 32;  // JSON depth; the top object is depth 1, a model file needs 4

}  // namespace celerinfer
