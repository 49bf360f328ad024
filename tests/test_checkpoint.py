"""Real checkpoints (celerinfer_lab/checkpoint.py): HF folders written by transformers itself and
MiniMind .pth files of every era import; transformers, code nobody here wrote, is the oracle for the
reference's logits; export loads in transformers; import(export(m)) == m; bad checkpoints get a
named error (exit 2 on the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import celerinfer_lab as cl
from celerinfer_lab.checkpoint import ERAS, _yarn_from_hf, config_from_hf, export_checkpoint, import_checkpoint
from celerinfer_lab.errors import CheckpointError
from celerinfer_lab.rope import transformers_yarn_freqs

transformers = pytest.importorskip("transformers")  # the test extra pins it; CI installs it

TOL = 2e-5  # float32 logits, the reference against transformers (the bound)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celerinfer_lab.cli", *args], capture_output=True, text=True)


# ---- checkpoints written by transformers ----------------------------------------------------------------
def hf_model(kind: str, tied: bool = False, seed: int = 0, yarn: dict | None = None) -> torch.nn.Module:
    """A tiny random transformers model of ``kind`` (llama, qwen3, qwen3_moe), weights not at their init
    values (norm weights around 1, not 1: an ignored norm weight would show); ``yarn``: YaRN's
    rope_parameters (128 positions)."""
    common = dict(
        **SMALL,
        intermediate_size=96,
        max_position_embeddings=64 if yarn is None else 128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        head_dim=16,
    )
    theta = 10000.0 if kind == "llama" else 1e6
    rope = (
        dict(rope_theta=theta)
        if yarn is None
        else dict(rope_parameters=dict(rope_type="yarn", rope_theta=theta, **yarn))
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, **rope)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, **rope)
    else:
        cfg = transformers.Qwen3MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1))
    return model


def hf_logits(hf: torch.nn.Module, model: cl.Model) -> np.ndarray:
    ids = torch.as_tensor(model.input_ids)
    mask = torch.as_tensor(model.attention_mask)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.float().numpy()


def assert_logits_match(model: cl.Model, expected: np.ndarray) -> None:
    """Reference logits against ``expected`` at every real (unpadded) position."""
    ours = np.asarray(cl.reference_forward(model).logits)
    real = model.attention_mask.astype(bool)
    assert not real.all(), "the inputs should have padding"
    err = np.abs(ours[real] - expected[real]).max()
    assert err <= TOL, f"max |reference - transformers| = {err:.3g} > {TOL}"


@pytest.mark.parametrize(
    "kind,tied,how",
    [
        ("llama", False, "safetensors"),
        ("llama", True, "sharded"),
        ("qwen3", False, "bin"),
        ("qwen3", True, "safetensors"),
        ("qwen3_moe", False, "safetensors"),
        ("qwen3_moe", True, "bin"),  # state_dict(): transformers 5's fused experts
    ],
)
def test_transformers_folder_imports_and_matches_transformers(tmp_path, kind, tied, how):
    hf = hf_model(kind, tied)
    folder = tmp_path / "hf"
    if how == "bin":
        hf.config.save_pretrained(folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    else:
        hf.save_pretrained(folder, **({"max_shard_size": "20KB"} if how == "sharded" else {}))
    if how == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
    model = import_checkpoint(folder, batch_size=3, seq_len=9, padding="left")
    assert model.config.qk_norm == (kind != "llama") and model.config.use_moe == (kind == "qwen3_moe")
    assert model.config.tie_word_embeddings == tied
    assert_logits_match(model, hf_logits(hf, model))


def test_export_loads_in_transformers_and_round_trips_bit_for_bit(tmp_path):
    for i, overrides in enumerate(
        [
            dict(),
            dict(qk_norm=True, tie_word_embeddings=False, head_dim=24),
            dict(qk_norm=True, use_moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
            dict(qk_norm=True, use_moe=True, num_experts=3, num_experts_per_tok=1, topk_renorm="never"),
        ]
    ):
        model = cl.generate_model(cl.ModelConfig(**SMALL, **overrides), batch_size=3, seq_len=8, padding="left")
        folder = export_checkpoint(model, tmp_path / f"exp{i}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert_logits_match(model, hf_logits(hf, model))
        back = import_checkpoint(folder)
        assert back.config.to_dict() == model.config.to_dict()
        assert back.weights.keys() == model.weights.keys()
        for name, array in model.weights.items():
            assert np.array_equal(back.weights[name], array), name
        assert np.array_equal(back.rope_cos, model.rope_cos) and np.array_equal(back.rope_sin, model.rope_sin)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("minimind2-moe", dict(max_position_embeddings=64)),  # shared expert, the k>1 rule
        ("minimind3", dict(max_position_embeddings=4096, inference_rope_scaling=True)),  # q/k norm, MiniMind's YaRN
    ],
)
def test_minimind_format_round_trips(tmp_path, name, overrides):
    config = cl.preset(name, hidden_size=64, num_hidden_layers=2, vocab_size=96, **overrides)
    model = cl.generate_model(config, batch_size=2, seq_len=6)
    folder = export_checkpoint(model, tmp_path / "mm", fmt="minimind")
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MiniMindForCausalLM"]
    back = import_checkpoint(folder)
    assert back.config.to_dict() == model.config.to_dict()
    assert all(np.array_equal(back.weights[n], a) for n, a in model.weights.items())
    assert np.array_equal(back.rope_cos, model.rope_cos)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(rope_pairing="interleaved"), "interleaved"),
        (dict(qk_norm=True, use_moe=True, n_shared_experts=1), "shared experts"),
        (dict(qk_norm=True, use_moe=True, num_experts_per_tok=2, topk_renorm="k>1"), "k>1"),
        (dict(use_moe=True), "qk_norm"),
        (dict(inference_rope_scaling=True), "YaRN"),
    ],
)
def test_export_refuses_what_transformers_cannot_express(tmp_path, overrides, words):
    model = cl.generate_model(cl.ModelConfig(**SMALL, **overrides), batch_size=1, seq_len=4)
    with pytest.raises(CheckpointError, match=words):
        export_checkpoint(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- YaRN: transformers' rule, carried by the config ------------------------------------------------------
YARN = dict(factor=4.0, original_max_position_embeddings=32)
YARN_CASES = {
    "llama, attention_factor derived": ("llama", YARN),
    "qwen3, truncate false": ("qwen3", dict(YARN, truncate=False)),
    "qwen3, attention_factor and betas given": (
        "qwen3",
        dict(YARN, attention_factor=0.9, beta_fast=16.0, beta_slow=2.0),
    ),
}


def yarn_folder(tmp_path: Path, case: str) -> tuple[torch.nn.Module, Path]:
    kind, yarn = YARN_CASES[case]
    hf = hf_model(kind, yarn=yarn)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


@pytest.mark.parametrize("case", YARN_CASES)
def test_yarn_folder_imports_as_rule_transformers_and_round_trips(tmp_path, case):
    """A folder with YaRN imports with rope_scaling rule "transformers"; the reference's logits match
    transformers' at positions past original_max_position_embeddings (32); the export is transformers'
    YaRN again, loads in transformers, and imports back bit for bit."""
    hf, folder = yarn_folder(tmp_path, case)
    model = import_checkpoint(folder, batch_size=2, seq_len=48, padding="left")
    scaling = model.config.rope_scaling
    assert model.config.inference_rope_scaling and scaling["rule"] == "transformers"
    assert scaling["truncate"] == YARN_CASES[case][1].get("truncate", True)
    if "attention_factor" not in YARN_CASES[case][1]:  # derived as transformers derives it: 0.1 ln(4) + 1
        assert scaling["attention_factor"] == 0.1 * np.log(4.0) + 1.0
    assert model.attention_mask[:, 32:].any(), "the inputs must reach past original_max_position_embeddings"
    assert_logits_match(model, hf_logits(hf, model))
    out = export_checkpoint(model, tmp_path / "exp")
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["attention_factor"] == scaling["attention_factor"]
    assert_logits_match(model, hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), model))
    back = import_checkpoint(out, batch_size=2, seq_len=48, padding="left")
    assert back.config.to_dict() == model.config.to_dict()
    assert all(np.array_equal(back.weights[n], a) for n, a in model.weights.items())
    assert np.array_equal(back.rope_cos, model.rope_cos) and np.array_equal(back.rope_sin, model.rope_sin)


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize(
    "head_dim,theta,orig,betas", [(16, 1e4, 32, {}), (64, 1e6, 2048, {"beta_fast": 8.0}), (8, 5e5, 4, {})]
)
def test_transformers_rule_frequencies_are_transformers_bit_for_bit(head_dim, theta, orig, betas, truncate):
    """rope.transformers_yarn_freqs against transformers' own _compute_yarn_parameters, bit for bit."""
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    yarn = dict(factor=4.0, original_max_position_embeddings=orig, truncate=truncate, **betas)
    hf = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=4 * orig,
        rope_parameters=dict(rope_type="yarn", rope_theta=theta, **yarn),
    )  # fmt: skip
    expected, attention_factor = _compute_yarn_parameters(hf)
    assert torch.equal(transformers_yarn_freqs(head_dim, theta, yarn), expected)
    assert (
        _yarn_from_hf(dict(rope_type="yarn", **yarn), {"max_position_embeddings": 4 * orig}, "")["attention_factor"]
        == attention_factor
    )


def test_yarn_read_as_minimind_rule_is_caught_by_the_oracle(tmp_path):
    """The companion: the same folder's YaRN parameters computed by MiniMind's rule (its attention
    factor defaults to 1, its ramp is clamped elsewhere) give logits beyond 2e-5."""
    hf, folder = yarn_folder(tmp_path, "llama, attention_factor derived")
    as_minimind = {"type": "yarn", "rule": "minimind", **YARN}
    model = import_checkpoint(folder, batch_size=2, seq_len=48, padding="left", config={"rope_scaling": as_minimind})
    assert model.config.rope_scaling == as_minimind
    with pytest.raises(AssertionError, match="reference - transformers"):
        assert_logits_match(model, hf_logits(hf, model))


def test_yarn_rules_refused_where_the_format_cannot_run_them(tmp_path):
    """MiniMind's rule exports only as MiniMind's format, transformers' only as HF; a MiniMind folder
    that names rule "transformers" is refused; YaRN's other HF relatives are refused by name."""
    minimind_rule = cl.ModelConfig(
        **SMALL, inference_rope_scaling=True, rope_scaling={"original_max_position_embeddings": 16}
    )
    model = cl.generate_model(minimind_rule, batch_size=1, seq_len=4)
    with pytest.raises(CheckpointError, match=r"rule 'minimind'.*format 'minimind'"):
        export_checkpoint(model, tmp_path / "x")
    with pytest.raises(
        CheckpointError, match=r"original_max_position_embeddings=16: MiniMind's MiniMindConfig replaces"
    ):
        export_checkpoint(model, tmp_path / "mm", fmt="minimind")  # MiniMind would run its own constants
    own = cl.generate_model(cl.ModelConfig(**SMALL, inference_rope_scaling=True), batch_size=1, seq_len=4)
    assert export_checkpoint(own, tmp_path / "mm", fmt="minimind").is_dir()  # the companion: MiniMind's values
    _, folder = yarn_folder(tmp_path, "qwen3, truncate false")
    with pytest.raises(CheckpointError, match=r"rule='transformers'.*format 'hf'"):
        export_checkpoint(import_checkpoint(folder), tmp_path / "y", fmt="minimind")
    mm = dict(MINIMIND2_CONFIG, inference_rope_scaling=True, rope_scaling={"factor": 4, "rule": "transformers"})
    with pytest.raises(CheckpointError, match="rope_scaling.rule='transformers'"):
        config_from_hf(mm)
    assert (
        config_from_hf(dict(mm, rope_scaling={"factor": 4, "rule": "minimind"}))[1]["rope_scaling"]["rule"]
        == "minimind"
    )
    for rope_type in ("linear", "dynamic", "longrope", "llama3"):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["rope_parameters"]["rope_type"] = rope_type
        with pytest.raises(CheckpointError, match=f"rope_type='{rope_type}'"):
            config_from_hf(cfg)


# ---- MiniMind .pth files of every era ---------------------------------------------------------------------
_TO_V1 = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    (".self_attn.q_proj.", ".attention.wq."),
    (".self_attn.k_proj.", ".attention.wk."),
    (".self_attn.v_proj.", ".attention.wv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
    (".mlp.shared_experts.0.", ".feed_forward.shared_experts."),
    (".mlp.", ".feed_forward."),
    ("gate_proj.", "w1."),
    ("down_proj.", "w2."),
    ("up_proj.", "w3."),
    ("model.layers.", "layers."),
]


def era_state_dict(model: cl.Model, era: str) -> dict[str, torch.Tensor]:
    """The state dict MiniMind's code of ``era`` saves for ``model`` (tied: the embedding under both names)."""
    sd = {}
    for name, array in model.state_dict().items():
        if ERAS[era].names == "v1":
            for old, new in _TO_V1:
                name = name.replace(old, new)
        sd[name] = torch.from_numpy(np.array(array))
    if era == "v1":  # the first v1 code saved its causal mask as a buffer
        for layer in range(model.config.num_hidden_layers):
            sd[f"layers.{layer}.attention.mask"] = torch.full((1, 1, 8, 8), float("-inf")).triu(1)
    return sd


def era_model(era: str, moe: bool) -> cl.Model:
    e = ERAS[era]
    fields = dict(e.defaults, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, vocab_size=96)
    fields.update(rope_pairing=e.rope_pairing, topk_renorm=e.topk_renorm, qk_norm=era == "minimind3")
    fields["max_position_embeddings"] = min(fields["max_position_embeddings"], 256)
    if moe:
        fields.update(use_moe=True, num_experts=4, num_experts_per_tok=2 if e.names == "v1" else 1)
        fields["n_shared_experts"] = 0 if era == "minimind3" else 1
    return cl.generate_model(cl.ModelConfig(**fields), batch_size=2, seq_len=6, padding="left")


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("era", list(ERAS))
def test_pth_of_each_era_imports_with_its_pairing_and_rule(tmp_path, era, moe):
    model = era_model(era, moe)
    path = tmp_path / "model.pth"
    torch.save(era_state_dict(model, era), path)
    max_pos = {"max_position_embeddings": model.config.max_position_embeddings}
    back = import_checkpoint(path, era=None if era != "minimindlm" else "minimindlm", config=max_pos)
    assert back.meta["era"] == era
    assert back.config.to_dict() == model.config.to_dict()
    assert all(np.array_equal(back.weights[n], a) for n, a in model.weights.items())
    ids, mask = model.input_ids, model.attention_mask
    np.testing.assert_array_equal(
        cl.ReferenceModel(back).forward(ids, mask)[0], cl.ReferenceModel(model).forward(ids, mask)[0]
    )


def test_v1_names_without_the_mask_buffer_are_ambiguous(tmp_path):
    model = era_model("minimindlm", moe=False)
    path = tmp_path / "model.pth"
    torch.save(era_state_dict(model, "minimindlm"), path)
    with pytest.raises(CheckpointError, match=r"two eras.*rope_theta.*v1.*minimindlm"):
        import_checkpoint(path)
    r = run_cli("import", str(path), "-o", str(tmp_path / "m.json"))
    assert r.returncode == 2 and "--era" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("import", str(path), "-o", str(tmp_path / "m.json"), "--era", "minimindlm", "--max-pos", "256")
    assert r.returncode == 0, r.stderr
    assert "minimindlm" in r.stdout and "rope interleaved" in r.stdout


def test_imported_model_passes_the_cpp_compare_at_every_point(tmp_path, native):
    hf = hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    model = import_checkpoint(tmp_path / "hf", tmp_path / "m.json", sidecar=True)
    report = cl.compare(model, native, kernels="all")
    assert report.agrees, report.culprits
    pth = tmp_path / "v1.pth"
    v1 = era_model("v1", moe=True)
    torch.save(era_state_dict(v1, "v1"), pth)
    assert cl.compare(import_checkpoint(pth, config={"max_position_embeddings": 256}), native, kernels="fast").agrees
    _, folder = yarn_folder(tmp_path / "yarn", "qwen3, truncate false")
    report = cl.compare(import_checkpoint(folder, seq_len=48), native, kernels="all")
    assert report.agrees, report.culprits


# ---- bad checkpoints: a named error, exit 2 -----------------------------------------------------------------
def _folder(tmp_path: Path, edit=None, config_edit=None) -> Path:
    hf = hf_model("llama")
    folder = tmp_path / "bad"
    hf.config.save_pretrained(folder)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if edit:
        edit(sd)
    torch.save(sd, folder / "pytorch_model.bin")
    if config_edit:
        cfg = json.loads((folder / "config.json").read_text())
        config_edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/celerinfer_pwned",))


@pytest.mark.parametrize(
    "case,words",
    [
        ("nan", r"tensor 'model.layers.1.self_attn.v_proj.weight' contains NaN or Inf"),
        ("missing", "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        ("shape", r"model.layers.0.self_attn.k_proj.weight' has shape \[16, 64\]"),
        ("architecture", "unknown architecture 'GPT2LMHeadModel'"),
        ("bias", "q_proj.bias': biases are not supported"),
        ("config_bias", "attention_bias=True: biases"),
        ("rope", "rope_type='linear'"),
        ("activation", "hidden_act='gelu'"),
        ("config_field", "missing field 'num_hidden_layers'"),
        ("code", r"objects other than tensors \(posix.system\)"),
        ("truncated", "not a safetensors file|past the end|does not fit"),
        ("header", r"weight' has shape \[-64\]: not a list of sizes"),
        ("offsets", r"data_offsets \[0\.0, \d+\] must be two integers"),  # the sidecar's header parser, shared
        ("shard", r"names shard 'model-0000\d-of-0000\d.safetensors', which is not in"),
    ],
)
def test_bad_checkpoints_are_named(tmp_path, case, words):
    if case == "nan":
        src = _folder(tmp_path, lambda sd: sd["model.layers.1.self_attn.v_proj.weight"].view(-1)[5].fill_(float("nan")))
    elif case == "missing":
        src = _folder(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "shape":
        src = _folder(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    elif case == "architecture":
        src = _folder(tmp_path, config_edit=lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    elif case == "bias":
        src = _folder(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    elif case == "config_bias":
        src = _folder(tmp_path, config_edit=lambda c: c.update(attention_bias=True))
    elif case == "rope":
        src = _folder(tmp_path, config_edit=lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0}))
    elif case == "config_field":
        src = _folder(tmp_path, config_edit=lambda c: c.pop("num_hidden_layers"))
    elif case == "activation":
        src = _folder(tmp_path, config_edit=lambda c: c.update(hidden_act="gelu"))
    elif case == "code":
        src = tmp_path / "evil.pth"
        torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "x": _Evil()}, src)
    elif case == "header":
        src = tmp_path / "h"
        hf_model("llama").save_pretrained(src)
        data = (src / "model.safetensors").read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = data[8 : 8 + n].replace(b'"shape":[64]', b'"shape":[-64]', 1)
        assert len(header) == n + 1
        (src / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])
    elif case == "offsets":
        src = tmp_path / "o"
        hf_model("llama").save_pretrained(src)
        data = (src / "model.safetensors").read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = data[8 : 8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[0.0,', 1)
        assert len(header) == n + 2
        (src / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])
    elif case == "shard":
        src = tmp_path / "sharded"
        hf_model("llama").save_pretrained(src, max_shard_size="60KB")
        shards = sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))
        (src / shards[-1]).unlink()
    else:
        hf_model("llama").save_pretrained(tmp_path / "t")
        src = tmp_path / "t"
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    Path("/tmp/celerinfer_pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=words):
        import_checkpoint(src)
    assert not Path("/tmp/celerinfer_pwned").exists(), "the pickle's code ran"
    r = run_cli("import", str(src), "-o", str(tmp_path / "out.json"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "out.json").exists()


def test_good_folder_passes_the_cli_and_export_cli(tmp_path):
    """The companion of the bad cases: the same folder unedited imports, exit 0 (an int64 buffer of
    position ids, as older transformers saved, is left out); export writes a folder."""
    src = _folder(tmp_path, lambda sd: sd.update({"model.position_ids": torch.arange(8)[None]}))
    r = run_cli("import", str(src), "-o", str(tmp_path / "m.json"), "--sidecar")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", str(tmp_path / "m.json"), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    interleaved = tmp_path / "i.json"
    cl.generate_model(cl.ModelConfig(**SMALL, rope_pairing="interleaved"), 1, 4).save(interleaved)
    r = run_cli("export", str(interleaved), "-o", str(tmp_path / "out2"))
    assert r.returncode == 2 and "interleaved" in r.stderr


@pytest.mark.parametrize("field,value", [("rope_theta", 500.0), ("rms_norm_eps", 1e-2), ("tie_word_embeddings", True)])
def test_the_oracle_sees_a_wrongly_mapped_field(tmp_path, field, value):
    """The companion of the oracle tests: a folder whose config.json says something else than the model
    transformers ran (a theta, an eps, a tied head) imports, and its logits are caught beyond 2e-5."""
    hf = hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update({field: value})
    if field == "rope_theta":
        cfg["rope_parameters"]["rope_theta"] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    if field == "tie_word_embeddings":  # a tied config with both tensors saved: the head that differs is named
        with pytest.raises(CheckpointError, match="tie_word_embeddings is true but lm_head.weight differs"):
            import_checkpoint(tmp_path / "hf")
        return
    model = import_checkpoint(tmp_path / "hf", batch_size=3, seq_len=9)
    with pytest.raises(AssertionError, match="reference - transformers"):
        assert_logits_match(model, hf_logits(hf, model))


# MiniMind's own config.json, as its MiniMindConfig writes it (model_minimind.py of each era)
MINIMIND2_CONFIG = {
    "architectures": ["MiniMindForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "model_minimind.MiniMindForCausalLM"},
    "model_type": "minimind",
    "aux_loss_alpha": 0.1,
    "bos_token_id": 1,
    "dropout": 0.0,
    "eos_token_id": 2,
    "flash_attn": True,
    "hidden_act": "silu",
    "intermediate_size": None,
    "max_position_embeddings": 256,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "inference_rope_scaling": False,
    "rope_theta": 1000000.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "torch_dtype": "float32",
    "transformers_version": "4.57.1",
}


@pytest.mark.parametrize("moe", [False, True])
def test_minimind2_hf_folder_as_minimind_writes_it(tmp_path, moe):
    """A MiniMind2 folder (config.json with MiniMind's bookkeeping fields, intermediate_size null: the
    8h/3 rule) imports as the model it is; a field that clashes with the tensors is named."""
    model = era_model("minimind2", moe)
    folder = tmp_path / "MiniMind2"
    folder.mkdir()
    cfg = dict(MINIMIND2_CONFIG, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    cfg.update(vocab_size=96, use_moe=moe, num_experts_per_tok=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    # era_model sized the FFN by MiniMind-3's rule; MiniMind2's config says null (8h/3): name the clash
    with pytest.raises(CheckpointError, match="gate_proj.weight' has shape"):
        import_checkpoint(folder)
    cfg["intermediate_size"] = model.config.intermediate_size
    (folder / "config.json").write_text(json.dumps(cfg))
    back = import_checkpoint(folder, tmp_path / "m.json")
    assert back.meta["era"] == "minimind2" and back.config.rope_pairing == "half"
    assert back.config.topk_renorm == "k>1" and back.config.use_moe == moe
    ids, mask = model.input_ids, model.attention_mask
    np.testing.assert_array_equal(
        cl.ReferenceModel(back).forward(ids, mask)[0], cl.ReferenceModel(model).forward(ids, mask)[0]
    )
    cfg["scoring_func"] = "sigmoid"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="scoring_func='sigmoid'"):
        import_checkpoint(folder)
