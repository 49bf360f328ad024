"""The config reaches the C++ by two roads that must agree: native.py builds a C++ Config from a ModelConfig
(the notebook path), cpp/tools/model_file_config.hpp parses the file's JSON config (base_line_micro).

(a) For configs covering every feature, both roads give the same Config, member by member, and the members
    compared are all of Config's data members (a member added in C++ and set by only one road fails here).
(b) Every ModelConfig field reaches the C++ Config, or is listed in PYTHON_ONLY with the reason it need not:
    a field added in Python and forgotten in C++ fails here.
"""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from celerinfer_lab.config import ModelConfig
from celerinfer_lab.generate import generate_model

# Fields the C++ Config does not carry, and why that is right.
PYTHON_ONLY = {
    "rope_theta": "RoPE frequencies: in the model file's RoPE cache, not the config",
    "inference_rope_scaling": "YaRN: in the RoPE cache",
    "rope_scaling": "YaRN: in the RoPE cache",
    "sizing_rule": "resolved into intermediate_size before either road reads it",
    "hidden_act": "only silu is accepted (validated in Python and C++)",
    "extra": "unknown fields kept for round trips",
}
# For every other field: a change that must change the C++ Config (on BASE).
BASE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
CHANGES = {
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "vocab_size": 41,
    "max_position_embeddings": 33,
    "head_dim": 16,
    "intermediate_size": 24,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "qk_norm": True,
    "rope_pairing": "interleaved",
    "use_moe": True,
    # MoE sizes change the Config only with use_moe on: those four are tried on a MoE base
    "num_experts": 3,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 8,
    "topk_renorm": "never",
}
MOE_FIELDS = {"num_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "topk_renorm"}
CASES = {
    "dense": {},
    "qk_norm interleaved untied": dict(qk_norm=True, rope_pairing="interleaved", tie_word_embeddings=False),
    "head_dim and eps": dict(head_dim=12, rms_norm_eps=1e-6, intermediate_size=20),
    "moe always": dict(use_moe=True, num_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    "moe k>1": dict(use_moe=True, num_experts=3, num_experts_per_tok=1, topk_renorm="k>1", moe_intermediate_size=8),
    "moe never": dict(use_moe=True, num_experts=2, num_experts_per_tok=2, topk_renorm="never"),
    "yarn": dict(inference_rope_scaling=True, rope_scaling={"original_max_position_embeddings": 8, "factor": 4.0}),
    "yarn, transformers' rule": dict(
        inference_rope_scaling=True,
        rope_scaling={
            "rule": "transformers",
            "original_max_position_embeddings": 8,
            "factor": 4.0,
            "attention_factor": 1.1,
            "truncate": False,
        },
    ),
}


def config_members(native) -> list[str]:
    """Config's data members, as cppyy sees the C++ struct."""
    c = native.ns.Config()
    return sorted(n for n in dir(c) if not n.startswith("_") and not callable(getattr(c, n)))


def native_config(native, config: ModelConfig) -> dict[str, str]:
    """The Config native.py hands the C++ (read back from a prepared model), as text like --print-config's."""
    model = generate_model(config, batch_size=1, seq_len=2, seed=0)
    c = native.prepare(model, "readable").cpp.config
    out = {}
    for name in config_members(native):
        value = getattr(c, name)
        out[name] = f"{float(value):.9g}" if isinstance(value, float) else str(int(value))
    return out


def file_config(binary, config: ModelConfig, path) -> dict[str, str]:
    """The Config base_line_micro parses from the model file's JSON."""
    generate_model(config, batch_size=1, seq_len=2, seed=0).save(path)
    result = subprocess.run([str(binary), "--print-config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@pytest.mark.parametrize("case", CASES)
def test_both_roads_give_the_same_cpp_config(case, native, standalone_binary, tmp_path):
    config = ModelConfig(**{**BASE, **CASES[case]})
    from_python = native_config(native, config)
    from_file = file_config(standalone_binary, config, tmp_path / "m.json")
    assert sorted(from_file) == config_members(native), "--print-config must print every Config member"
    assert differences(from_python, from_file) == []


def test_a_disagreement_is_reported(native, standalone_binary, tmp_path):
    """The comparison can fail: two configs that differ in one field give a named difference."""
    a = native_config(native, ModelConfig(**BASE))
    b = file_config(standalone_binary, ModelConfig(**{**BASE, "rms_norm_eps": 1e-6}), tmp_path / "m.json")
    assert differences(a, b) == ["eps: 9.99999975e-06 vs 9.99999997e-07"]


def test_every_config_field_reaches_the_cpp_or_says_why_not(native):
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unlisted = fields - set(CHANGES) - set(PYTHON_ONLY)
    assert not unlisted, f"new ModelConfig fields {sorted(unlisted)}: map them to the C++ Config or add to PYTHON_ONLY"
    moe_base = {**BASE, "use_moe": True, "num_experts": 2, "num_experts_per_tok": 1}
    for name, value in CHANGES.items():
        base = moe_base if name in MOE_FIELDS else BASE
        before = native_config(native, ModelConfig(**base))
        after = native_config(native, ModelConfig(**{**base, name: value}))
        assert before != after, f"ModelConfig.{name} = {value!r} does not change the C++ Config"


@pytest.mark.parametrize(
    "scaling, fragment",
    [
        ({"rule": "llama3"}, "rope_scaling.rule='llama3'"),
        ({"truncate": False}, "rope_scaling.truncate"),
        ({"rule": "transformers", "factor": 4.0, "original_max_position_embeddings": 8}, "attention_factor"),
        ({"beta_slow": 0}, "rope_scaling.beta_slow=0"),
        ({"rule": "transformers", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": 1.0,
          "truncate": "yes"}, "rope_scaling.truncate='yes'"),
    ],
)  # fmt: skip
def test_both_readers_refuse_the_same_rope_scaling(scaling, fragment, standalone_binary, tmp_path):
    """A rope_scaling one rule cannot hold is refused by Python's ModelConfig and by the C++ reader,
    naming the same key; the same file with a valid rope_scaling is read by both (the companion)."""
    import json

    from celerinfer_lab import ModelFileError, load_model

    path = tmp_path / "m.json"
    generate_model(ModelConfig(**BASE, inference_rope_scaling=True), batch_size=1, seq_len=2, seed=0).save(path)
    ok = subprocess.run([str(standalone_binary), "--print-config", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and load_model(path).config.inference_rope_scaling, ok.stderr
    doc = json.loads(path.read_text())
    doc["config"]["rope_scaling"] = scaling
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_model(path)
    r = subprocess.run([str(standalone_binary), "--print-config", str(path)], capture_output=True, text=True)
    assert r.returncode != 0 and fragment in r.stderr + r.stdout, r.stderr + r.stdout
