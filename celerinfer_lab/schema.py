"""The weights a config implies, in one table: name, shape, the feature that requires it, its C++ slot.

Everything that lists weights reads ``WEIGHTS``: the model file's names and shapes in file order
(``iter_weight_shapes``), ``ModelConfig.num_parameters``, the writer's tensor count, the original
CelerInfer layout's names (reader.py), and, through the generated
``cpp/include/celerinfer/weight_table.hpp``, C++'s ``ModelWeights::bind``, ``check_complete``,
``for_each_linear`` and the C++ model-file reader. Adding a weight: add its row here, run
``python -m celerinfer_lab.cpp_tables``, write the op that uses it (tests/test_schema.py fails until
the header is regenerated).

Functions take any object with ModelConfig's attributes: this module does not import config.py,
which imports it.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple

LAYER_PREFIX = "model.layers.{layer}."


class Dim(NamedTuple):
    """A size symbol: the ModelConfig attribute it reads and the C++ Config expression for it."""

    attr: str
    cpp: str


DIMS = {
    "vocab": Dim("vocab_size", "c.vocab"),
    "hidden": Dim("hidden_size", "c.hidden"),
    "q_dim": Dim("q_dim", "c.q_dim()"),
    "kv_dim": Dim("kv_dim", "c.kv_dim()"),
    "head_dim": Dim("head_dim", "c.head_dim"),
    "intermediate": Dim("intermediate_size", "c.intermediate"),
    "moe_intermediate": Dim("moe_intermediate_size", "c.moe_intermediate"),
    "experts": Dim("num_experts", "c.experts"),
    "shared_experts": Dim("n_shared_experts", "c.shared_experts"),
}


class Feature(NamedTuple):
    """When a weight exists: the config flag and the value it must have (no flag: always)."""

    flag: str | None
    value: bool
    cpp: str  # the same test on a C++ Config `c`


FEATURES = {
    "always": Feature(None, True, "true"),
    "qk_norm": Feature("qk_norm", True, "c.qk_norm"),
    "dense": Feature("use_moe", False, "!c.moe"),
    "moe": Feature("use_moe", True, "c.moe"),
    "untied": Feature("tie_word_embeddings", False, "!c.tied"),
    "tied": Feature("tie_word_embeddings", True, "c.tied"),
}


class Scope(NamedTuple):
    """Where a weight sits: the name before its suffix, the C++ struct holding its slot and, for
    experts, how many copies a layer has ({index} in the prefix) and the feature they need."""

    prefix: str
    struct: str
    copies: str | None = None  # a DIMS key
    feature: str = "always"


SCOPES = {
    "model": Scope("", "ModelWeights"),
    "layer": Scope(LAYER_PREFIX, "LayerWeights"),
    "mlp": Scope(LAYER_PREFIX + "mlp.", "FFNWeights"),  # a dense layer's FFN: LayerWeights::ffn
    "expert": Scope(LAYER_PREFIX + "mlp.experts.{index}.", "FFNWeights", "experts", "moe"),
    "shared_expert": Scope(LAYER_PREFIX + "mlp.shared_experts.{index}.", "FFNWeights", "shared_experts", "moe"),
}


class Weight(NamedTuple):
    scope: str  # a SCOPES key
    suffix: str  # the MiniMind state-dict name after the scope's prefix
    shape: tuple[str, ...]  # DIMS keys; nn.Linear weights are [out, in]
    feature: str  # a FEATURES key
    slot: str  # the member of the scope's C++ struct (model.hpp) that points at it
    linear: bool  # an nn.Linear weight: kernel sets pack it (prepare_linear)
    # When a bf16/q8 model stores it in that format (a FEATURES key), None: always float32. The matrices
    # a forward streams are reduced; norms stay float32, and so does the MoE router (as llama.cpp keeps
    # ffn_gate_inp: top-k near-ties would flip); the embedding only when tied, since it is then the head.
    reduced: str | None
    v0: str | None = None  # its name in the original CelerInfer layout, when that layout has it


# In file order. Model-scope rows come before and after one block of per-layer rows; within a layer,
# an expert scope's consecutive rows repeat per expert (expert 0's three, then expert 1's, ...).
WEIGHTS = (
    Weight(
        "model", "model.embed_tokens.weight", ("vocab", "hidden"), "always", "embed", False, "tied", "tok_embedding"
    ),
    Weight("layer", "input_layernorm.weight", ("hidden",), "always", "input_norm", False, None, "rms_attn"),
    Weight("layer", "self_attn.q_proj.weight", ("q_dim", "hidden"), "always", "wq", True, "always", "wq"),
    Weight("layer", "self_attn.k_proj.weight", ("kv_dim", "hidden"), "always", "wk", True, "always", "wk"),
    Weight("layer", "self_attn.v_proj.weight", ("kv_dim", "hidden"), "always", "wv", True, "always", "wv"),
    Weight("layer", "self_attn.o_proj.weight", ("hidden", "q_dim"), "always", "wo", True, "always", "wo"),
    Weight("layer", "self_attn.q_norm.weight", ("head_dim",), "qk_norm", "q_norm", False, None),
    Weight("layer", "self_attn.k_norm.weight", ("head_dim",), "qk_norm", "k_norm", False, None),
    Weight("layer", "post_attention_layernorm.weight", ("hidden",), "always", "post_norm", False, None, "rms_ffn"),
    Weight("mlp", "gate_proj.weight", ("intermediate", "hidden"), "dense", "gate", True, "always", "w_gate"),
    Weight("mlp", "up_proj.weight", ("intermediate", "hidden"), "dense", "up", True, "always", "w_up"),
    Weight("mlp", "down_proj.weight", ("hidden", "intermediate"), "dense", "down", True, "always", "w_down"),
    Weight("layer", "mlp.gate.weight", ("experts", "hidden"), "moe", "router", True, None),
    Weight("expert", "gate_proj.weight", ("moe_intermediate", "hidden"), "moe", "gate", True, "always"),
    Weight("expert", "up_proj.weight", ("moe_intermediate", "hidden"), "moe", "up", True, "always"),
    Weight("expert", "down_proj.weight", ("hidden", "moe_intermediate"), "moe", "down", True, "always"),
    Weight("shared_expert", "gate_proj.weight", ("moe_intermediate", "hidden"), "moe", "gate", True, "always"),
    Weight("shared_expert", "up_proj.weight", ("moe_intermediate", "hidden"), "moe", "up", True, "always"),
    Weight("shared_expert", "down_proj.weight", ("hidden", "moe_intermediate"), "moe", "down", True, "always"),
    Weight("model", "model.norm.weight", ("hidden",), "always", "final_norm", False, None, "final_rms"),
    Weight("model", "lm_head.weight", ("vocab", "hidden"), "untied", "lm_head", True, "always", "lm_head"),
)


def check_table(rows: tuple[Weight, ...]) -> None:
    """Raise ValueError for a row the walk below cannot follow: an unknown symbol, a per-layer row
    after the model rows that follow the layers, a v0 name where the original layout has no place."""
    block = [i for i, row in enumerate(rows) if row.scope != "model"]
    if block and block != list(range(block[0], block[-1] + 1)):
        raise ValueError(f"per-layer rows must be consecutive; row {rows[block[-1]].suffix!r} is after a model row")
    for row in rows:
        features = (row.feature,) + ((row.reduced,) if row.reduced else ())
        unknown = [d for d in row.shape if d not in DIMS] + [f for f in features if f not in FEATURES]
        if row.scope not in SCOPES or unknown or not 1 <= len(row.shape) <= 2:
            raise ValueError(f"weight {row.suffix!r}: scope, shape (1 or 2 of DIMS) or feature unknown: {row}")
        if row.v0 and SCOPES[row.scope].copies:
            raise ValueError(f"weight {row.suffix!r}: the original layout has no experts, so no v0 name")


check_table(WEIGHTS)


# ---- the weights of one config -------------------------------------------------------------------
def dim(config: Any, symbol: str) -> int:
    return getattr(config, DIMS[symbol].attr)


def has_feature(config: Any, feature: str) -> bool:
    flag, value, _ = FEATURES[feature]
    return flag is None or getattr(config, flag) == value


def copies(config: Any, scope: str) -> int:
    """How many of a scope's struct one layer has (1 unless it is an expert scope)."""
    s = SCOPES[scope]
    if s.copies is None:
        return 1
    return dim(config, s.copies) if has_feature(config, s.feature) else 0


def instances(config: Any, row: Weight) -> int:
    """How many tensors a row stands for under ``config`` (0 when its feature is off)."""
    if not has_feature(config, row.feature):
        return 0
    return 1 if row.scope == "model" else config.num_hidden_layers * copies(config, row.scope)


def shape_of(config: Any, row: Weight) -> tuple[int, ...]:
    return tuple(dim(config, d) for d in row.shape)


def weight_name(row: Weight, layer: int = 0, index: int = 0) -> str:
    return SCOPES[row.scope].prefix.format(layer=layer, index=index) + row.suffix


def iter_weights(config: Any) -> Iterator[tuple[Weight, int, int]]:
    """(row, layer, index) of every weight ``config`` implies, in file order, one at a time."""
    rows = [row for row in WEIGHTS if row.scope != "model"]
    first = next((i for i, row in enumerate(WEIGHTS) if row.scope != "model"), len(WEIGHTS))
    yield from ((row, -1, -1) for row in WEIGHTS[:first] if has_feature(config, row.feature))
    runs = _runs(rows)
    for layer in range(config.num_hidden_layers if rows else 0):
        for run in runs:
            for index in range(copies(config, run[0].scope)):
                yield from ((row, layer, index) for row in run if has_feature(config, row.feature))
    yield from ((row, -1, -1) for row in WEIGHTS[first + len(rows) :] if has_feature(config, row.feature))


def _runs(rows: list[Weight]) -> list[list[Weight]]:
    """Consecutive rows of one scope (an expert's rows repeat together)."""
    runs: list[list[Weight]] = []
    for row in rows:
        if runs and runs[-1][0].scope == row.scope:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def iter_weight_shapes(config: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """weight_shapes one at a time: a reader looks each up in a file without building them all."""
    for row, layer, index in iter_weights(config):
        yield weight_name(row, layer, index), shape_of(config, row)


def reduced_weights(config: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the weights a bf16 or q8 model stores in that format (the rest stay float32)."""
    for row, layer, index in iter_weights(config):
        if row.reduced and has_feature(config, row.reduced):
            yield weight_name(row, layer, index), shape_of(config, row)


def weight_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """MiniMind state-dict names and shapes, in the order the file stores them (tied lm_head omitted)."""
    return dict(iter_weight_shapes(config))


# ---- sizes, counted per row (a config of a million layers is never enumerated) ---------------------
def num_parameters(config: Any) -> int:
    return sum(instances(config, row) * math.prod(shape_of(config, row)) for row in WEIGHTS)


def tensor_count(config: Any) -> int:
    """How many weights ``weight_shapes(config)`` holds."""
    return sum(instances(config, row) for row in WEIGHTS)


def largest_weight(config: Any) -> tuple[str, tuple[int, ...]]:
    """A name (layer 0, expert 0) and the shape of the largest weight; the first such in file order."""
    present = [row for row in WEIGHTS if instances(config, row)]
    row = max(present, key=lambda r: math.prod(shape_of(config, r)))
    return weight_name(row), shape_of(config, row)


# ---- the original CelerInfer layout ---------------------------------------------------------------
def v0_top_names(required: bool = False) -> dict[str, str]:
    """Original name -> state-dict name, for the weights outside weights.layers (``required``: only
    those every config has)."""
    return {
        row.v0: row.suffix
        for row in WEIGHTS
        if row.v0 and row.scope == "model" and (row.feature == "always" or not required)
    }


def v0_layer_names() -> dict[str, str]:
    """Original name in a weights.layers entry -> state-dict name after model.layers.{i}."""
    return {
        row.v0: SCOPES[row.scope].prefix.removeprefix(LAYER_PREFIX) + row.suffix
        for row in WEIGHTS
        if row.v0 and row.scope != "model"
    }
