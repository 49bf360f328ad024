"""Test helpers shared by the test suite and scripts/ (like numpy.testing): hypothesis strategies.

Imports hypothesis, so only tests and scripts import this module; the package itself never does.

    from celerinfer_lab.testing import model_cases
    @given(model=model_cases())
"""

from __future__ import annotations

from hypothesis import strategies as st

from .config import ModelConfig
from .generate import generate_model
from .modelfile import Model


@st.composite
def model_cases(draw: st.DrawFn) -> Model:
    """A random small model (a Model: config, weights, input_ids, attention_mask) over the property
    grid: GQA ratios, head_dim independent of hidden, MoE, YaRN, qk_norm, both RoPE pairings, tied
    or not, and mixed left and right padding row by row."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    n_rep = draw(st.sampled_from([1, 2, 4]))  # GQA ratios 1, 2, 4; kv_heads 1 = every head shares one
    head_dim = draw(st.sampled_from([4, 6, 8, 16]))
    hidden = draw(st.sampled_from([16, 24, 32, 48]))  # head_dim independent of hidden / heads
    moe = draw(st.booleans())
    yarn = draw(st.booleans())
    experts = draw(st.integers(1, 4))
    config = ModelConfig(
        hidden_size=hidden,
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=kv_heads * n_rep,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=draw(st.integers(8, 96)),
        max_position_embeddings=64,
        intermediate_size=draw(st.sampled_from([16, 40, 64])),
        qk_norm=draw(st.booleans()),
        rope_pairing=draw(st.sampled_from(["half", "interleaved"])),
        inference_rope_scaling=yarn,
        rope_scaling={"original_max_position_embeddings": 16, "factor": 4.0} if yarn else None,
        tie_word_embeddings=draw(st.booleans()),
        use_moe=moe,
        num_experts=experts,
        num_experts_per_tok=draw(st.integers(1, min(2, experts))),
        n_shared_experts=draw(st.integers(0, 2)),
        topk_renorm=draw(st.sampled_from(["always", "k>1", "never"])),
    )
    batch, seq_len = draw(st.integers(1, 4)), draw(st.integers(1, 33))
    model = generate_model(config, batch, seq_len, seed=draw(st.integers(0, 2**16)))
    for b in range(batch):  # mixed left and right padding, row by row
        pad = draw(st.integers(0, seq_len - 1))
        if pad:
            cols = slice(0, pad) if draw(st.booleans()) else slice(seq_len - pad, seq_len)
            model.attention_mask[b, cols] = 0
    return model
