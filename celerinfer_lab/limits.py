"""Sizes no real model reaches: a model file or config past one of them is refused by name.

They keep a 5 KB hostile file from making a reader allocate gigabytes before it finds out the
file cannot hold such a model. The C++ reader has the same numbers (cpp/tools/model_file_limits.hpp;
tests/test_cpp_fuzz.py checks they agree). Real models for scale: Llama-3 405B has hidden 16,384,
126 layers, 128 heads, vocab 128,256; DeepSeek-V3 has 256 experts; Gemma-3 a 262,144 vocab.
"""

from __future__ import annotations

MAX_HIDDEN_SIZE = 65_536
MAX_LAYERS = 1_024
MAX_HEADS = 1_024
MAX_HEAD_DIM = 4_096
MAX_VOCAB = 4_194_304
MAX_INTERMEDIATE = 1_048_576
MAX_POSITIONS = 16_777_216
MAX_EXPERTS = 1_024
MAX_SHARED_EXPERTS = 64
MAX_NESTING = 32  # JSON depth; the top object is depth 1, a model file needs 4

# config field -> its limit (num_key_value_heads divides num_attention_heads, so MAX_HEADS bounds it too)
FIELD_LIMITS = {
    "hidden_size": MAX_HIDDEN_SIZE,
    "num_hidden_layers": MAX_LAYERS,
    "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS,
    "head_dim": MAX_HEAD_DIM,
    "vocab_size": MAX_VOCAB,
    "intermediate_size": MAX_INTERMEDIATE,
    "moe_intermediate_size": MAX_INTERMEDIATE,
    "max_position_embeddings": MAX_POSITIONS,
    "num_experts": MAX_EXPERTS,
    "n_shared_experts": MAX_SHARED_EXPERTS,
}
