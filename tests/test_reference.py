"""The PyTorch reference: the original tool's logits, MiniMind's math, and the trace contract."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_config, small_model

from celerinfer_lab import ReferenceModel, load_model, reference_forward, trace_points
from celerinfer_lab.generate import random_inputs


def logits_for(model, ids=None, mask=None, dtype=torch.float32):
    ref = ReferenceModel(model, dtype)
    ids = None if ids is None else torch.as_tensor(ids)
    mask = None if mask is None else torch.as_tensor(mask)
    return ref.forward(ids, mask)[0].numpy()


def test_reproduces_original_celerinfer_logits(v0_dir):
    model = load_model(v0_dir / "minimind.json")
    expected = np.load(v0_dir / "logits_torch.npy")
    logits = reference_forward(model).logits
    assert logits.shape == expected.shape == (2, 5, 128)
    assert np.abs(logits - expected).max() <= 1e-6


VARIANTS = {
    "dense": {},
    "qk_norm": dict(qk_norm=True),
    "interleaved": dict(rope_pairing="interleaved"),
    "moe_shared": dict(use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=2, topk_renorm="k>1"),
    "untied_mha": dict(tie_word_embeddings=False, num_key_value_heads=8),
    "yarn": dict(inference_rope_scaling=True, rope_scaling={"original_max_position_embeddings": 32, "factor": 4}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_trace_names_shapes_and_order(variant):
    model = small_model(batch_size=3, seq_len=6, padding="mixed", **VARIANTS[variant])
    result = reference_forward(model, trace=True)
    points = trace_points(model.config, 3, 6)
    assert list(result.trace) == [p.name for p in points]
    for p in points:
        assert result.trace[p.name].shape == p.shape, p.name
    np.testing.assert_array_equal(result.trace["lm_head"], result.logits)
    assert reference_forward(model).trace is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_agrees_with_float64(variant):
    model = small_model(batch_size=2, seq_len=9, padding="left", **VARIANTS[variant])
    l32, l64 = logits_for(model), logits_for(model, dtype=torch.float64)
    assert l64.dtype == np.float64
    rel = np.linalg.norm(l32 - l64) / np.linalg.norm(l64)
    assert rel < 1e-5, rel


@pytest.mark.parametrize("variant", ["dense", "moe_shared", "qk_norm"])
def test_causality(variant):
    """Changing token t changes no logits before t, and does change logits at t."""
    model = small_model(batch_size=1, seq_len=10, **VARIANTS[variant])
    base = logits_for(model)
    for t in (0, 4, 9):
        ids = model.input_ids.copy()
        ids[0, t] = (ids[0, t] + 1) % model.config.vocab_size
        changed = logits_for(model, ids, model.attention_mask)
        np.testing.assert_allclose(changed[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert np.abs(changed[:, t] - base[:, t]).max() > 1e-3


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padding_masks_keys(padding):
    """Padded tokens do not influence unpadded queries; fully masked rows stay finite."""
    cfg = small_config()
    model = small_model(batch_size=3, seq_len=8)
    ids, mask = random_inputs(cfg, 3, 8, seed=5, padding=padding, pad_lengths=[0, 3, 7])
    base = logits_for(model, ids, mask)
    assert np.isfinite(base).all()
    other = ids.copy()
    other[mask == 0] = (other[mask == 0] + 17) % cfg.vocab_size
    changed = logits_for(model, other, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(changed[real], base[real], rtol=0, atol=1e-6)
    if padding == "right":
        # Right padding: the real tokens see exactly what an unpadded shorter sequence sees.
        short = logits_for(model, ids[1:2, :5], mask[1:2, :5])
        np.testing.assert_allclose(base[1, :5], short[0], rtol=0, atol=1e-5)


def test_mask_semantics_are_minimind():
    """scores hold -inf above the diagonal and score - 1e9 at padded keys, as MiniMind adds them."""
    model = small_model(batch_size=2, seq_len=4, padding="left")
    ids, mask = random_inputs(model.config, 2, 4, 0, "left", [0, 2])
    model.input_ids, model.attention_mask = ids, mask
    scores = reference_forward(model, trace=True).trace["model.layers.0.self_attn.scores"]
    assert np.isneginf(scores[:, :, 0, 1:]).all()
    assert (scores[1, :, 3, :2] < -1e8).all() and np.isfinite(scores[1, :, 3, :2]).all()
    probs = reference_forward(model, trace=True).trace["model.layers.0.self_attn.probs"]
    np.testing.assert_allclose(probs[1, :, 0, 0], 1.0)  # a padded query whose only key is masked


def _mha_logits(model):
    """An independent multi-head forward with torch's scaled_dot_product_attention."""
    cfg, sd = model.config, {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    ids = torch.from_numpy(model.input_ids)
    B, S = ids.shape
    nh, hd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
    norm = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # noqa: E731
    cos, sin = torch.from_numpy(model.rope_cos[:S]), torch.from_numpy(model.rope_sin[:S])

    def rope(x):  # [B, nh, S, hd]
        rot = torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1)
        return x * cos + rot * sin

    h = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q, k, v = (F.linear(x, sd[p + f"self_attn.{n}_proj.weight"]).view(B, S, nh, hd).transpose(1, 2) for n in "qkv")
        att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        h = h + F.linear(att.transpose(1, 2).reshape(B, S, -1), sd[p + "self_attn.o_proj.weight"])
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        h = h + F.linear(
            F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"]),
            sd[p + "mlp.down_proj.weight"],
        )
    return F.linear(norm(h, sd["model.norm.weight"]), sd["lm_head.weight"]).numpy()


def test_kv_heads_equal_heads_is_plain_multi_head_attention():
    model = small_model(batch_size=2, seq_len=7, num_key_value_heads=8)
    np.testing.assert_allclose(logits_for(model), _mha_logits(model), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kvh", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv_heads(kvh):
    """Query head j reads kv head j // (heads/kv_heads): repeating each kv head's rows gives an MHA model."""
    gqa = small_model(batch_size=2, seq_len=6, num_key_value_heads=kvh)
    mha = small_model(batch_size=2, seq_len=6, num_key_value_heads=8)
    mha.weights = dict(gqa.weights)
    hd, n_rep = gqa.config.head_dim, 8 // kvh
    for i in range(2):
        for n in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{n}.weight"
            heads = gqa.weights[key].reshape(kvh, hd, -1)
            mha.weights[key] = np.repeat(heads, n_rep, axis=0).reshape(8 * hd, -1)
    mha.input_ids = gqa.input_ids
    np.testing.assert_allclose(logits_for(gqa), logits_for(mha), rtol=0, atol=1e-5)


def test_one_expert_top1_equals_dense_ffn():
    moe = small_model(use_moe=True, num_experts=1, num_experts_per_tok=1, topk_renorm="always")
    dense = small_model()
    dense.weights = {}
    for name, array in moe.weights.items():
        if ".mlp.gate.weight" in name:
            continue
        dense.weights[name.replace(".mlp.experts.0.", ".mlp.")] = array
    dense.input_ids = moe.input_ids
    np.testing.assert_array_equal(logits_for(moe), logits_for(dense))


def test_interleaved_rope_equals_half_split_after_permuting_rows():
    """Pair i is (2i, 2i+1) interleaved and (i, i+hd/2) half-split: permute q/k rows within each head."""
    inter = small_model(rope_pairing="interleaved", qk_norm=True)
    half = small_model(qk_norm=True)
    hd = inter.config.head_dim
    perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])  # half-split slot -> interleaved dim
    half.weights = dict(inter.weights)
    half.input_ids = inter.input_ids
    for i in range(inter.config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        for n in ("q_proj", "k_proj"):
            w = inter.weights[p + n + ".weight"]
            half.weights[p + n + ".weight"] = w.reshape(-1, hd, w.shape[1])[:, perm].reshape(w.shape)
        for n in ("q_norm", "k_norm"):
            half.weights[p + n + ".weight"] = inter.weights[p + n + ".weight"][perm]
    np.testing.assert_allclose(logits_for(inter), logits_for(half), rtol=0, atol=1e-5)
    assert np.abs(logits_for(inter) - logits_for(small_model(qk_norm=True))).max() > 1e-2


def test_moe_routing_trace():
    model = small_model(
        batch_size=2, seq_len=8, use_moe=True, num_experts=4, num_experts_per_tok=2, topk_renorm="never"
    )
    tr = reference_forward(model, trace=True).trace
    probs, idx, w = (tr[f"model.layers.0.mlp.{n}"] for n in ("router_probs", "topk_idx", "topk_weight"))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(idx, np.argsort(-probs, axis=-1)[..., :2])
    np.testing.assert_array_equal(w, np.take_along_axis(probs, idx, -1))
    renorm = small_model(
        batch_size=2, seq_len=8, use_moe=True, num_experts=4, num_experts_per_tok=2, topk_renorm="always"
    )
    np.testing.assert_allclose(
        reference_forward(renorm, trace=True).trace["model.layers.0.mlp.topk_weight"].sum(-1), 1.0, rtol=1e-6
    )


def test_yarn_cache_follows_minimind():
    from celerinfer_lab.rope import rope_cache

    cfg = small_config(
        inference_rope_scaling=True,
        max_position_embeddings=128,
        rope_scaling={"original_max_position_embeddings": 32, "factor": 4},
    )
    plain = small_config(max_position_embeddings=128)
    (c, s), (c0, _) = rope_cache(cfg), rope_cache(plain)
    # High-frequency pairs keep their frequency; low-frequency ones are slowed by the factor.
    np.testing.assert_allclose(c[:, 0], c0[:, 0], atol=1e-6)
    dim = cfg.head_dim
    f_last = 1.0 / (cfg.rope_theta ** ((dim - 2) / dim))
    np.testing.assert_allclose(s[:, dim // 2 - 1], np.sin(np.arange(128) * f_last / 4), atol=1e-6)
    # Within the original range no scaling applies (MiniMind's end / orig_max > 1 rule).
    short = small_config(
        inference_rope_scaling=True,
        max_position_embeddings=32,
        rope_scaling={"original_max_position_embeddings": 32, "factor": 4},
    )
    np.testing.assert_array_equal(rope_cache(short)[0], rope_cache(small_config(max_position_embeddings=32))[0])
    assert math.isclose(float(c[0, 0]), 1.0)


def test_wrong_sequence_length_is_refused():
    model = small_model(max_position_embeddings=8, batch_size=1, seq_len=8)
    ids = np.zeros((1, 9), dtype=np.int64)
    with pytest.raises(ValueError, match="seq_len=9 is longer than max_position_embeddings=8"):
        logits_for(model, ids, np.ones_like(ids))


def test_forward_takes_numpy_torch_and_lists_and_checks_them_as_the_cpp_side_does():
    model = small_model(batch_size=2, seq_len=6, padding="left")
    ref = ReferenceModel(model)
    ids, mask = model.input_ids, model.attention_mask  # numpy, as the Model holds them
    expected = ref.forward()[0]
    for given in [
        (ids, mask),
        (torch.from_numpy(ids), torch.from_numpy(mask)),
        (ids.tolist(), mask.tolist()),
        (ids.astype(np.int32), mask.astype(bool)),
    ]:
        assert torch.equal(ref.forward(*given)[0], expected)
    real = ref.forward(ids[:1])[0]  # ids without a mask: every position is real
    assert torch.equal(real, ref.forward(ids[:1], np.ones((1, 6), np.int64))[0])
    with pytest.raises(TypeError, match="input_ids must be integers"):
        ref.forward(ids.astype(np.float32), mask)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ref.forward(ids + model.config.vocab_size, mask)
    with pytest.raises(ValueError, match=r"input_ids has shape \[6\], expected \[batch >= 1, seq_len >= 1\]"):
        ref.forward(ids[0])
    with pytest.raises(ValueError, match="only 0 and 1"):
        ref.forward(ids, mask * 2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ref.forward(ids, mask[:, :3])
