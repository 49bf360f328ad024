"""Model configuration for the MiniMind family: field names, sizing rules, presets, validation.

Field names are MiniMind's own (``hidden_size``, ``num_key_value_heads``, ...), so a
checkpoint's config.json maps onto ``ModelConfig`` directly. Two MiniMind generations differ in
details that matter for exact reproduction; each such detail is an explicit field here:

* ``sizing_rule``   how ``intermediate_size`` is derived when not given
                    ("minimind2": 64*ceil(int(8h/3)/64), "minimind3": 64*ceil(h*pi/64));
* ``rope_pairing``  "half" (rotate_half, the default) or "interleaved" (pairs (2i, 2i+1),
                    MiniMind v1 and MiniMind2 checkpoints from before April 2025);
* ``topk_renorm``   when the MoE top-k weights are renormalised to sum to 1:
                    "always" (MiniMind-3), "k>1" (MiniMind2), or "never".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, overload

SIZING_RULES = ("minimind2", "minimind3")
ROPE_PAIRINGS = ("half", "interleaved")
TOPK_RENORM_RULES = ("always", "k>1", "never")

# MiniMind's YaRN parameters (model_minimind.py, ``inference_rope_scaling=True``).
DEFAULT_YARN = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 16.0,
    "original_max_position_embeddings": 2048,
    "attention_factor": 1.0,
    "type": "yarn",
}
# Which YaRN a config's RoPE cache holds (rope_scaling["rule"], absent: "minimind"):
#   "minimind"      MiniMind's precompute_freqs_cis: scales only when max_position_embeddings exceeds
#                   original_max_position_embeddings, the ramp's high bound clamped to head_dim//2 - 1,
#                   attention_factor 1.0 unless given;
#   "transformers"  transformers' _compute_yarn_parameters (modeling_rope_utils.py): always applied,
#                   bounds clamped to [0, head_dim - 1], floor/ceil only with truncate (default true),
#                   attention_factor explicit (the importer stores the value transformers derives).
YARN_RULES = ("minimind", "transformers")
YARN_KEYS = {
    "minimind": frozenset(DEFAULT_YARN) | {"rule"},
    "transformers": frozenset(DEFAULT_YARN) | {"rule", "truncate"},
}
YARN_REQUIRED = {"transformers": ("factor", "original_max_position_embeddings", "attention_factor")}


from .errors import ConfigError  # noqa: E402,F401  (defined in errors.py, re-exported here)
from .limits import FIELD_LIMITS  # noqa: E402
from .schema import num_parameters  # noqa: E402

_SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "intermediate_size",
)
_FLAG_FIELDS = ("tie_word_embeddings", "qk_norm", "use_moe", "inference_rope_scaling")


class DerivedSize:
    """A size field that may be given as None ("derive it") and is an int once __post_init__ has
    derived it: the constructor takes ``int | None``, every read gets ``int`` (no None check at each
    use). The value lives in the instance's ``__dict__`` under ``_<name>``; the dataclass default,
    read from the class, is None."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    @overload
    def __get__(self, obj: None, owner: type) -> None: ...
    @overload
    def __get__(self, obj: ModelConfig, owner: type) -> int: ...
    def __get__(self, obj: ModelConfig | None, owner: type) -> int | None:
        if obj is None:
            return None
        value: int = obj.__dict__[self.slot]
        return value

    def __set__(self, obj: ModelConfig, value: int | None) -> None:
        obj.__dict__[self.slot] = value


def intermediate_size_for(hidden_size: int, sizing_rule: str) -> int:
    """MiniMind's default FFN width for a hidden size."""
    if sizing_rule == "minimind2":
        return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)
    if sizing_rule == "minimind3":
        return 64 * math.ceil(hidden_size * math.pi / 64)
    raise ConfigError(f"sizing_rule={sizing_rule!r}: must be one of {SIZING_RULES}")


@dataclass
class ModelConfig:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = 128
    max_position_embeddings: int = 128
    head_dim: DerivedSize = DerivedSize()  # None: hidden_size // num_attention_heads
    intermediate_size: DerivedSize = DerivedSize()  # None: from sizing_rule
    sizing_rule: str = "minimind3"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    qk_norm: bool = False
    rope_pairing: str = "half"
    inference_rope_scaling: bool = False
    rope_scaling: dict | None = None  # YaRN parameters; None with scaling on: DEFAULT_YARN
    # Mixture of experts (ignored unless use_moe)
    use_moe: bool = False
    num_experts: int = 4  # routed experts (MiniMind2 calls it n_routed_experts)
    num_experts_per_tok: int = 1
    n_shared_experts: int = 0
    moe_intermediate_size: DerivedSize = DerivedSize()  # None: intermediate_size
    topk_renorm: str = "always"
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict)  # unknown fields from a file, kept for round trips

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads"):  # the defaults below derive from these
            _check_size(name, getattr(self, name))
        # The DerivedSize fields read as int, but here, before they are derived, None means "derive it".
        if self.head_dim is None and _is_pos_int(self.hidden_size) and _is_pos_int(self.num_attention_heads):
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}: head_dim cannot be derived (set head_dim explicitly)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and _is_pos_int(self.hidden_size):
            self.intermediate_size = intermediate_size_for(self.hidden_size, self.sizing_rule)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.inference_rope_scaling and self.rope_scaling is None:
            self.rope_scaling = dict(DEFAULT_YARN)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per kv head: query head j reads kv head j // n_rep."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def uses_topk_renorm(self) -> bool:
        """Whether the top-k routing weights are divided by their sum, under topk_renorm."""
        if self.topk_renorm == "always":
            return True
        if self.topk_renorm == "k>1":
            return self.num_experts_per_tok > 1
        return False

    # ---- validation ----------------------------------------------------------------------
    def validate(self, seq_len: int | None = None) -> None:
        """Raise ConfigError naming the first field that breaks a rule."""
        for name in _SIZE_FIELDS:
            _check_size(name, getattr(self, name))
        for name in _FLAG_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be true or false")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs "
                f"an equal number of query heads per kv head)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim}: RoPE rotates pairs of dimensions, head_dim must be even")
        if not (_is_number(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps!r}: must be a number > 0")
        if not (_is_number(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"rope_theta={self.rope_theta!r}: must be a number > 1")
        if self.sizing_rule not in SIZING_RULES:
            raise ConfigError(f"sizing_rule={self.sizing_rule!r}: must be one of {SIZING_RULES}")
        if self.rope_pairing not in ROPE_PAIRINGS:
            raise ConfigError(f"rope_pairing={self.rope_pairing!r}: must be one of {ROPE_PAIRINGS}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.inference_rope_scaling:
            self._validate_yarn()
        if self.use_moe:
            self._validate_moe()
        if seq_len is not None:
            if not _is_pos_int(seq_len):
                raise ConfigError(f"seq_len={seq_len!r}: must be an integer >= 1")
            if seq_len > self.max_position_embeddings:
                raise ConfigError(
                    f"seq_len={seq_len} is longer than max_position_embeddings="
                    f"{self.max_position_embeddings} (the RoPE cache has no positions past it)"
                )

    def _validate_yarn(self) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling={scaling!r}: must be a dict of YaRN parameters")
        known = YARN_KEYS["minimind"] | YARN_KEYS["transformers"]
        unknown = set(scaling) - known
        if unknown:
            raise ConfigError(f"rope_scaling has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        rule = scaling.get("rule", "minimind")
        if rule not in YARN_RULES:
            raise ConfigError(f"rope_scaling.rule={rule!r}: must be one of {YARN_RULES}")
        meaningless = set(scaling) - YARN_KEYS[rule]
        if meaningless:
            raise ConfigError(
                f"rope_scaling.{sorted(meaningless)[0]} means nothing under rule {rule!r} (MiniMind's YaRN always "
                f"truncates its ramp bounds); keys of this rule: {sorted(YARN_KEYS[rule])}"
            )
        if scaling.get("type", "yarn") != "yarn":
            raise ConfigError(f"rope_scaling.type={scaling.get('type')!r}: only 'yarn' is supported")
        missing = [k for k in YARN_REQUIRED.get(rule, ()) if k not in scaling]
        if missing:
            raise ConfigError(
                f"rope_scaling.{missing[0]} is required under rule {rule!r} (no default: transformers derives "
                "attention_factor from factor, mscale and mscale_all_dim, and the importer stores that number)"
            )
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"):
            if key in scaling and not (_is_number(scaling[key]) and scaling[key] > 0):
                raise ConfigError(f"rope_scaling.{key}={scaling[key]!r}: must be a number > 0")
        if not isinstance(scaling.get("truncate", True), bool):
            raise ConfigError(f"rope_scaling.truncate={scaling['truncate']!r}: must be true or false")

    def _validate_moe(self) -> None:
        _check_size("num_experts", self.num_experts)
        if not _is_pos_int(self.num_experts_per_tok):
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok!r}: must be an integer >= 1")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} is above num_experts="
                f"{self.num_experts} (top-k cannot pick more experts than exist)"
            )
        _check_size("n_shared_experts", self.n_shared_experts, minimum=0)
        _check_size("moe_intermediate_size", self.moe_intermediate_size)
        if self.topk_renorm not in TOPK_RENORM_RULES:
            raise ConfigError(f"topk_renorm={self.topk_renorm!r}: must be one of {TOPK_RENORM_RULES}")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a config dict: this project's, MiniMind-3's or MiniMind2's field names."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        # MiniMind2 names for the MoE fields, and its renormalisation rule (only when k > 1).
        minimind2_moe = "n_routed_experts" in data
        if minimind2_moe:
            data.setdefault("num_experts", data.pop("n_routed_experts"))
        if "norm_topk_prob" in data and not isinstance(data["norm_topk_prob"], bool):
            raise ConfigError(f"norm_topk_prob={data['norm_topk_prob']!r}: must be true or false")
        if "topk_renorm" not in data and "norm_topk_prob" in data:
            if not data["norm_topk_prob"]:
                data["topk_renorm"] = "never"
            else:
                data["topk_renorm"] = "k>1" if minimind2_moe else "always"
        data.pop("norm_topk_prob", None)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def num_parameters(self) -> int:
        """The weights' total size, counted from the weight table (schema.py), tied lm_head once."""
        return num_parameters(self)


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_size(name: str, value: Any, minimum: int = 1) -> None:
    """An integer (not a bool, not a float) in [minimum, the field's limit in limits.py]."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigError(f"{name}={_short_repr(value)}: must be an integer >= {minimum}")
    limit = FIELD_LIMITS[name]
    if value > limit:
        shown = value if value < 10**20 else f"a {len(str(value))}-digit integer"
        raise ConfigError(
            f"{name}={shown}: above {limit:,}, the limit for this field (no real model needs more; "
            f"celerinfer_lab/limits.py)"
        )


# Presets for the released MiniMind models (vocab 6400, MiniMind's tokenizer).
PRESETS: dict[str, dict[str, Any]] = {
    "minimind2-small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=6400,
        max_position_embeddings=32768,
        sizing_rule="minimind2",
        rms_norm_eps=1e-5,
    ),
    "minimind2": dict(
        hidden_size=768,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=6400,
        max_position_embeddings=32768,
        sizing_rule="minimind2",
        rms_norm_eps=1e-5,
    ),
    "minimind2-moe": dict(
        hidden_size=640,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=6400,
        max_position_embeddings=32768,
        sizing_rule="minimind2",
        rms_norm_eps=1e-5,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        topk_renorm="k>1",
    ),
    "minimind3": dict(
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=6400,
        max_position_embeddings=32768,
        sizing_rule="minimind3",
        rms_norm_eps=1e-6,
        qk_norm=True,
    ),
    "minimind3-moe": dict(
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=6400,
        max_position_embeddings=32768,
        sizing_rule="minimind3",
        rms_norm_eps=1e-6,
        qk_norm=True,
        use_moe=True,
        num_experts=4,
        num_experts_per_tok=1,
        n_shared_experts=0,
        topk_renorm="always",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a released model, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
