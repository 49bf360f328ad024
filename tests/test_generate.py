import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from conftest import small_config, small_model

from celerinfer_lab import ConfigError, generate_model, load_model, preset, reference_forward
from celerinfer_lab.generate import random_inputs


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "celerinfer_lab.cli", *args], capture_output=True, text=True, **kwargs)


def test_original_flags_and_byte_identical_output(tmp_path):
    args = [
        "generate",
        "--hidden",
        "64",
        "--layers",
        "2",
        "--heads",
        "8",
        "--kvh",
        "2",
        "--vocab",
        "128",
        "--seq-len",
        "5",
        "--batch-size",
        "2",
        "--seed",
        "123",
        "--max-pos",
        "128",
    ]
    for name in ("a.json", "b.json"):
        result = cli(*args, "--output", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    model = load_model(tmp_path / "a.json")
    assert model.input_ids.shape == (2, 5) and model.config.num_key_value_heads == 2
    assert cli("generate", "--seed", "124", "--output", str(tmp_path / "c.json")).returncode == 0
    assert (tmp_path / "c.json").read_bytes() != (tmp_path / "a.json").read_bytes()


def test_defaults_are_the_original_tools(tmp_path):
    assert cli("generate", "--output", str(tmp_path / "m.json")).returncode == 0
    m = load_model(tmp_path / "m.json")
    c = m.config
    assert (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        c.max_position_embeddings,
        m.batch_size,
        m.seq_len,
    ) == (64, 2, 8, 2, 128, 128, 2, 5)


def test_cli_variant_flags(tmp_path):
    out = tmp_path / "m.json"
    r = cli(
        "generate",
        "--preset",
        "minimind3-moe",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--vocab",
        "50",
        "--max-pos",
        "64",
        "--experts",
        "3",
        "--topk",
        "2",
        "--shared-experts",
        "1",
        "--untied",
        "--rope-pairing",
        "interleaved",
        "--padding",
        "mixed",
        "--pad-lengths",
        "0,2,3",
        "--batch-size",
        "3",
        "--seq-len",
        "6",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    c = load_model(out).config
    assert c.use_moe and c.qk_norm and c.num_experts == 3 and c.num_experts_per_tok == 2 and c.n_shared_experts == 1
    assert not c.tie_word_embeddings and c.rope_pairing == "interleaved" and c.hidden_size == 64
    mask = load_model(out).attention_mask
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_cli_reports_invalid_config(tmp_path):
    r = cli("generate", "--heads", "8", "--kvh", "3", "--output", str(tmp_path / "m.json"))
    assert r.returncode == 2 and "num_key_value_heads=3" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", "--seq-len", "200", "--output", str(tmp_path / "m.json"))
    assert r.returncode == 2 and "seq_len=200 is longer than max_position_embeddings=128" in r.stderr


def test_every_parameter_matters():
    """Perturbing any single tensor changes the logits: nothing is ignored, no norm weight is all ones.
    (Elementwise, not a uniform scale: with q/k norm a uniformly scaled q_proj rightly changes nothing.)"""
    rng = np.random.default_rng(0)
    model = small_model(
        batch_size=2,
        seq_len=16,
        qk_norm=True,
        tie_word_embeddings=False,
        use_moe=True,
        num_experts=3,
        num_experts_per_tok=2,
        n_shared_experts=1,
        num_hidden_layers=2,
    )
    base = reference_forward(model).logits
    for name, array in model.weights.items():
        if array.ndim == 1:
            assert not np.allclose(array, 1.0), f"{name} is all ones"
        original = model.weights[name]
        model.weights[name] = original * rng.uniform(0.5, 1.5, original.shape).astype(np.float32)
        changed = reference_forward(model).logits
        model.weights[name] = original
        assert np.abs(changed - base).max() > 1e-4, f"{name} does not change the logits"


def test_untied_head_is_distinct():
    sd = small_model(tie_word_embeddings=False).state_dict()
    assert not np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def test_activations_stay_realistic_through_depth():
    model = generate_model(small_config(hidden_size=256, num_hidden_layers=12, vocab_size=512), 1, 32, seed=3)
    trace = reference_forward(model, trace=True).trace
    for i in range(12):
        rms = float(np.sqrt(np.mean(trace[f"model.layers.{i}"].astype(np.float64) ** 2)))
        assert 0.05 < rms < 5, f"layer {i} output rms {rms}"
        probs = trace[f"model.layers.{i}.self_attn.probs"][0, :, -1, :]  # last query sees all keys
        assert probs.max() > 3 / 32, f"layer {i} attention is nearly uniform"
    logits_std = float(trace["lm_head"].std())
    assert 0.5 < logits_std < 10


@pytest.mark.parametrize("padding", ["left", "right", "mixed"])
def test_padding_layouts(padding):
    cfg = small_config()
    ids, mask = random_inputs(cfg, 4, 6, seed=1, padding=padding, pad_lengths=[0, 1, 2, 5])
    assert mask.sum(axis=1).tolist() == [6, 5, 4, 1]
    for b in range(4):
        left = padding == "left" or (padding == "mixed" and b % 2 == 0)
        row = mask[b].tolist()
        assert row == sorted(row) if left else row == sorted(row, reverse=True)
        assert (ids[b][mask[b] == 0] == 0).all()
    ids, mask = random_inputs(cfg, 3, 6, seed=1, padding=padding)
    assert mask[0].all() and not mask[1:].all(axis=1).any()


def test_bad_padding_requests():
    cfg = small_config()
    with pytest.raises(ConfigError, match=r"pad_lengths\[1\]=6"):
        random_inputs(cfg, 2, 6, 0, "left", [0, 6])
    with pytest.raises(ConfigError, match="pad_lengths has 1 entries, batch_size is 2"):
        random_inputs(cfg, 2, 6, 0, "left", [0])
    with pytest.raises(ConfigError, match="batch_size=0"):
        random_inputs(cfg, 0, 6, 0)


def test_large_model_is_streamed(tmp_path):
    """Writing minimind2-small (103 MB of float32) never holds the model: peak stays near one tensor."""
    cfg = preset("minimind2-small")
    tracemalloc.start()
    try:
        generate_model(cfg, 1, 8, seed=0, output=tmp_path / "small.json", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    model_bytes = cfg.num_parameters() * 4
    assert peak < model_bytes * 0.7, f"peak {peak / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
    assert load_model(tmp_path / "small.json").config == cfg


def test_progress_bar_for_large_models(tmp_path):
    r = cli(
        "generate",
        "--preset",
        "minimind2-small",
        "--seq-len",
        "4",
        "--batch-size",
        "1",
        "--output",
        str(tmp_path / "s.json"),
    )
    assert r.returncode == 0 and "tensor" in r.stderr and "100%" in r.stderr
