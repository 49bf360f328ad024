"""GGUF export (celerinfer_lab/gguf_export.py) read back with the gguf package's own reader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import celerinfer_lab as cl
from celerinfer_lab.errors import UsageError
from celerinfer_lab.gguf_export import _permute, write_gguf
from celerinfer_lab.quantize import encode

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_every_weight_is_written_under_llama_cpp_names(tmp_path, gguf_type):
    model = cl.generate_model(cl.ModelConfig(**CONFIG, tie_word_embeddings=False), batch_size=1, seq_len=4)
    reader, tensors = read(write_gguf(model, tmp_path / "m.gguf", gguf_type))
    assert len(tensors) == 2 + 1 + 2 * 9  # embedding, final norm, head; 9 per layer
    q = model.weights["model.layers.1.self_attn.q_proj.weight"]
    stored = tensors["blk.1.attn_q.weight"]
    assert stored.tensor_type.name == gguf_type.upper()
    if gguf_type == "q8_0":  # the bytes gguf's own quantizer would write, rows permuted for llama.cpp's RoPE
        assert np.array_equal(np.asarray(stored.data).reshape(-1), encode(_permute(q, 4), "q8").reshape(-1))
    else:
        values = np.asarray(stored.data, dtype=np.float32).reshape(q.shape)
        assert np.array_equal(values, _permute(q, 4).astype(np.float16 if gguf_type == "f16" else np.float32))
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay float32
    field = reader.fields["llama.attention.head_count_kv"]
    assert int(field.parts[field.data[0]][0]) == 2


def test_the_rope_permutation_pairs_halves_into_neighbours():
    rows = np.arange(8, dtype=np.float32)[:, None]  # one head of head_dim 8: rows 0..3 and 4..7 are the halves
    assert _permute(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_what_llama_cpp_cannot_run_is_refused_by_name(tmp_path):
    moe = cl.generate_model(cl.ModelConfig(**CONFIG, use_moe=True, qk_norm=True), batch_size=1, seq_len=4)
    with pytest.raises(UsageError, match="use_moe.*qk_norm"):
        write_gguf(moe, tmp_path / "m.gguf")
    odd = cl.generate_model(
        cl.ModelConfig(**dict(CONFIG, hidden_size=48, num_attention_heads=4)), batch_size=1, seq_len=4
    )
    with pytest.raises(UsageError, match="multiple of 32"):
        write_gguf(odd, tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()
