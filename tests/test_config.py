import pytest

from celerinfer_lab import PRESETS, ConfigError, ModelConfig, preset
from celerinfer_lab.config import intermediate_size_for


@pytest.mark.parametrize(
    "hidden,rule,expected",
    [
        (512, "minimind2", 1408),
        (768, "minimind2", 2048),
        (640, "minimind2", 1728),
        (768, "minimind3", 2432),
        (64, "minimind3", 256),
    ],
)
def test_intermediate_size_rules(hidden, rule, expected):
    assert intermediate_size_for(hidden, rule) == expected
    assert ModelConfig(hidden_size=hidden, num_attention_heads=8, sizing_rule=rule).intermediate_size == expected


@pytest.mark.parametrize(
    "name,params", [("minimind2-small", 25_829_888), ("minimind2", 104_030_976), ("minimind2-moe", 145_029_760)]
)
def test_preset_parameter_counts(name, params):
    # The released sizes: 25.8M, 104M and 145M.
    assert preset(name).num_parameters() == params


def test_presets_are_the_released_shapes():
    m = preset("minimind2-moe")
    assert (m.hidden_size, m.num_hidden_layers, m.num_experts, m.n_shared_experts, m.num_experts_per_tok) == (
        640,
        8,
        4,
        1,
        2,
    )
    assert m.topk_renorm == "k>1" and m.uses_topk_renorm
    m3 = preset("minimind3")
    assert m3.qk_norm and m3.rms_norm_eps == 1e-6 and m3.num_key_value_heads == 4 and m3.intermediate_size == 2432
    m3moe = preset("minimind3-moe")
    assert m3moe.use_moe and m3moe.num_experts_per_tok == 1 and m3moe.uses_topk_renorm
    assert set(PRESETS) == {"minimind2-small", "minimind2", "minimind2-moe", "minimind3", "minimind3-moe"}


def test_topk_renorm_rules():
    cfg = lambda rule, k: ModelConfig(use_moe=True, num_experts=4, num_experts_per_tok=k, topk_renorm=rule)  # noqa: E731
    assert cfg("always", 1).uses_topk_renorm and cfg("always", 2).uses_topk_renorm
    assert not cfg("k>1", 1).uses_topk_renorm and cfg("k>1", 2).uses_topk_renorm
    assert not cfg("never", 2).uses_topk_renorm


def test_head_dim_defaults_and_overrides():
    assert ModelConfig(hidden_size=64, num_attention_heads=8).head_dim == 8
    assert ModelConfig(hidden_size=64, num_attention_heads=8, head_dim=16).q_dim == 128


@pytest.mark.parametrize(
    "kwargs,field,rule",
    [
        (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=4), "num_attention_heads=6", "multiple"),
        (dict(hidden_size=60, num_attention_heads=8), "hidden_size=60", "divisible"),
        (dict(hidden_size=64, num_attention_heads=8, head_dim=7), "head_dim=7", "even"),
        (dict(hidden_size=0), "hidden_size=0", ">= 1"),
        (dict(num_hidden_layers=0), "num_hidden_layers=0", ">= 1"),
        (dict(vocab_size=-3), "vocab_size=-3", ">= 1"),
        (dict(num_key_value_heads=0), "num_key_value_heads=0", ">= 1"),
        (dict(intermediate_size=0), "intermediate_size=0", ">= 1"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps=0.0", "> 0"),
        (dict(use_moe=True, num_experts=2, num_experts_per_tok=3), "num_experts_per_tok=3", "above num_experts=2"),
        (dict(use_moe=True, num_experts=0), "num_experts=0", ">= 1"),
        (dict(use_moe=True, n_shared_experts=-1), "n_shared_experts=-1", ">= 0"),
        (dict(use_moe=True, topk_renorm="sometimes"), "topk_renorm='sometimes'", "one of"),
        (dict(rope_pairing="diagonal"), "rope_pairing='diagonal'", "one of"),
        (dict(sizing_rule="llama"), "sizing_rule='llama'", "one of"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'", "silu"),
        (dict(hidden_size=64.0), "hidden_size=64.0", ">= 1"),
        (dict(inference_rope_scaling=True, rope_scaling={"factor": 4, "bogus": 1}), "rope_scaling", "unknown keys"),
        (dict(inference_rope_scaling=True, rope_scaling={"rule": "llama3"}), "rope_scaling.rule='llama3'", "one of"),
        (
            dict(inference_rope_scaling=True, rope_scaling={"truncate": False}),
            "rope_scaling.truncate",
            "rule 'minimind'",
        ),
        (
            dict(
                inference_rope_scaling=True,
                rope_scaling={"rule": "transformers", "factor": 4.0, "original_max_position_embeddings": 8},
            ),
            "attention_factor",
            "required",
        ),
        (
            dict(
                inference_rope_scaling=True,
                rope_scaling={
                    "rule": "transformers",
                    "factor": 4,
                    "original_max_position_embeddings": 8,
                    "attention_factor": 1,
                    "truncate": 0,
                },
            ),
            "rope_scaling.truncate=0",
            "true or false",
        ),
        (dict(inference_rope_scaling=True, rope_scaling={"beta_fast": "32"}), "rope_scaling.beta_fast='32'", "> 0"),
    ],
)
def test_invalid_configs_name_field_and_rule(kwargs, field, rule):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert field in str(err.value) and rule in str(err.value)


def test_sequence_longer_than_max_positions():
    cfg = ModelConfig(max_position_embeddings=16)
    cfg.validate(seq_len=16)
    with pytest.raises(ConfigError, match="seq_len=17 is longer than max_position_embeddings=16"):
        cfg.validate(seq_len=17)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'minimind9'"):
        preset("minimind9")


def test_from_dict_reads_minimind2_and_minimind3_names():
    m2 = ModelConfig.from_dict(
        dict(
            hidden_size=640,
            num_attention_heads=8,
            num_key_value_heads=2,
            use_moe=True,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            norm_topk_prob=True,
            dropout=0.0,
        )
    )
    assert m2.num_experts == 4 and m2.topk_renorm == "k>1" and m2.extra == {"dropout": 0.0}
    m3 = ModelConfig.from_dict(dict(use_moe=True, num_experts=4, norm_topk_prob=True))
    assert m3.topk_renorm == "always"
    assert ModelConfig.from_dict(dict(use_moe=True, norm_topk_prob=False)).topk_renorm == "never"


def test_round_trip_through_dict():
    cfg = preset("minimind2-moe", inference_rope_scaling=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_derived_sizes_are_ints_once_built_and_none_as_defaults():
    """head_dim, intermediate_size and moe_intermediate_size: None given (or left out) means derived;
    the built config holds ints, and the dataclass defaults stay None (the JSON round trip as before)."""
    import dataclasses

    derived = ("head_dim", "intermediate_size", "moe_intermediate_size")
    config = ModelConfig(hidden_size=48, num_attention_heads=4, head_dim=None, intermediate_size=None)
    assert (config.head_dim, config.intermediate_size, config.moe_intermediate_size) == (12, 192, 192)
    assert {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in derived} == dict.fromkeys(derived)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig(head_dim=6).to_dict()["head_dim"] == 6
    assert dataclasses.replace(config, head_dim=None).head_dim == 12  # replace re-derives a size set to None
