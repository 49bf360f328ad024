"""The ``generate`` flags that set ModelConfig fields: one table for the CLI and for every message
that tells a user which flags would give a model they need."""

from __future__ import annotations

# The inputs of a model without --batch-size/--seq-len (generate_model's too); the tiny model shape
# itself is ModelConfig's defaults (config.py: the original CelerInfer generator's 64/2/8/2/128).
DEFAULT_BATCH_SIZE = 2
DEFAULT_SEQ_LEN = 5

# flag (argparse dest) -> ModelConfig field, for flags that map one to one
CONFIG_FLAGS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kvh": "num_key_value_heads",
    "vocab": "vocab_size",
    "max_pos": "max_position_embeddings",
    "head_dim": "head_dim",
    "intermediate": "intermediate_size",
    "sizing_rule": "sizing_rule",
    "eps": "rms_norm_eps",
    "theta": "rope_theta",
    "rope_pairing": "rope_pairing",
    "experts": "num_experts",
    "topk": "num_experts_per_tok",
    "shared_experts": "n_shared_experts",
    "moe_intermediate": "moe_intermediate_size",
    "topk_renorm": "topk_renorm",
}
# boolean fields set by a switch: field -> (switch when True, switch when False)
SWITCHES = {
    "qk_norm": ("--qk-norm", None),
    "use_moe": ("--moe", None),
    "inference_rope_scaling": ("--yarn", None),
    "tie_word_embeddings": (None, "--untied"),
}


def flag_for(field: str, value: object) -> str:
    """The generate flag(s) that give ``field`` = ``value``, e.g. '--untied' or '--heads 8'."""
    if field in SWITCHES:
        switch = SWITCHES[field][0 if value else 1]
        return switch or f"(the default: drop {SWITCHES[field][1 if value else 0]})"
    for flag, name in CONFIG_FLAGS.items():
        if name == field:
            return f"--{flag.replace('_', '-')} {value}"
    raise KeyError(f"no generate flag sets {field}")


def flags_for(overrides: dict) -> str:
    """All the flags for a dict of ModelConfig overrides, in one string."""
    return " ".join(flag_for(field, value) for field, value in overrides.items())
