"""One weight table (celerinfer_lab/schema.py) for Python and C++: the generated header is current, and
C++ binds and requires exactly the weights, shapes and nn.Linear flags Python implies, in the same order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import edit_file, small_config

from celerinfer_lab import load_model, schema
from celerinfer_lab.cpp_tables import GENERATED, GENERATED_DIR, weight_table_header
from celerinfer_lab.native import NativeError, _native_config, load_native

CONFIGS = {
    "dense": dict(),
    "qk_norm": dict(qk_norm=True),
    "moe_shared": dict(
        use_moe=True, num_experts=3, num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=96
    ),
    "untied": dict(tie_word_embeddings=False),
    "everything": dict(qk_norm=True, tie_word_embeddings=False, use_moe=True, num_experts=2, n_shared_experts=1),
}


# ---- the committed header is the generator's output -----------------------------------------------
def stale_headers() -> list[str]:
    return [name for name, text_of in GENERATED.items() if (GENERATED_DIR / name).read_text() != text_of()]


def test_generated_headers_are_current():
    assert not stale_headers(), f"{stale_headers()} differ from the tables: run python -m celerinfer_lab.cpp_tables"


def test_a_changed_table_makes_the_header_stale(monkeypatch):
    row = schema.WEIGHTS[2]._replace(shape=("kv_dim", "hidden"))
    monkeypatch.setattr(schema, "WEIGHTS", (*schema.WEIGHTS[:2], row, *schema.WEIGHTS[3:]))
    assert stale_headers() == ["weight_table.hpp"]
    assert '{Dim::KvDim, Dim::Hidden}, Feature::Always, true, true, Feature::Always, "wq"}' in weight_table_header()


# ---- C++ agrees with Python ------------------------------------------------------------------------
def python_weights(config) -> list[tuple[str, tuple[int, ...], bool]]:
    return [
        (schema.weight_name(row, layer, index), schema.shape_of(config, row), row.linear)
        for row, layer, index in schema.iter_weights(config)
    ]


def cpp_weights(engine, config) -> list[tuple[str, tuple[int, ...], bool]]:
    """for_each_weight of the engine's compiled headers: (name, shape, linear) in its order."""
    import cppyy

    ns, fn = engine.namespace, f"schema_test_weights_{engine.namespace}"
    if not hasattr(cppyy.gbl, fn):
        cppyy.cppdef(f"""
            std::vector<std::string> {fn}(const {ns}::Config& c) {{
                std::vector<std::string> out;  // "name d0,d1, linear"
                {ns}::for_each_weight(c, [&](const {ns}::WeightRow& row, int layer, int index) {{
                    std::string shape;
                    for (int64_t d : {ns}::row_shape(c, row)) shape += std::to_string(d) + ",";
                    out.push_back({ns}::weight_name(row, layer, index) + " " + shape + " " + (row.linear ? "1" : "0"));
                }});
                return out;
            }}""")
    rows = [str(line).split(" ") for line in getattr(cppyy.gbl, fn)(_native_config(engine.ns, config))]
    return [(name, tuple(int(d) for d in shape.split(",")[:-1]), linear == "1") for name, shape, linear in rows]


def bind_all(engine, config, weights) -> tuple[object, dict[str, np.ndarray]]:
    """Bind each (name, shape) to its own zero array in a fresh C++ Model, then check_complete."""
    model = engine.ns.ModelWeights(_native_config(engine.ns, config))
    arrays = {name: np.zeros(shape, np.float32) for name, shape in weights}
    arrays["rope.cos"] = np.zeros((config.max_position_embeddings, config.head_dim), np.float32)
    arrays["rope.sin"] = arrays["rope.cos"].copy()
    try:
        for name, array in arrays.items():
            model.bind(name, array, [int(d) for d in array.shape])
        model.check_complete()
    except Exception as exc:  # cppyy raises the C++ std::runtime_error type
        raise NativeError(str(exc)) from None
    return model, arrays


def cpp_linears(engine, model) -> list[tuple[int, int, int]]:
    """(address, out, in) of every weight ModelWeights::for_each_linear hands a kernel set to pack."""
    import cppyy

    ns, fn = engine.namespace, f"schema_test_linears_{engine.namespace}"
    if not hasattr(cppyy.gbl, fn):
        cppyy.cppdef(f"""
            std::vector<int64_t> {fn}(const {ns}::ModelWeights& m) {{
                std::vector<int64_t> out;
                m.for_each_linear([&](const float* W, int rows, int cols) {{
                    out.insert(out.end(), {{int64_t(reinterpret_cast<uintptr_t>(W)), rows, cols}});
                }});
                return out;
            }}""")
    flat = [int(x) for x in getattr(cppyy.gbl, fn)(model)]
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


def python_linears(config, arrays: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
    """(address, out, in) of the nn.Linear rows' arrays, in file order, then a tied head."""
    linear = [(arrays[name].ctypes.data, *shape) for name, shape, is_linear in python_weights(config) if is_linear]
    if config.tie_word_embeddings:  # the head is the embedding, packed as the head's linear
        linear.append((arrays["model.embed_tokens.weight"].ctypes.data, config.vocab_size, config.hidden_size))
    return linear


@pytest.mark.parametrize("case", CONFIGS)
def test_cpp_walks_the_weights_python_implies(native, case):
    config = small_config(**CONFIGS[case])
    assert cpp_weights(native, config) == python_weights(config)
    model, arrays = bind_all(native, config, schema.iter_weight_shapes(config))  # C++ accepts each, needs no other
    assert cpp_linears(native, model) == python_linears(config, arrays)


@pytest.mark.parametrize("case", CONFIGS)
def test_cpp_requires_each_weight_and_refuses_others(native, case):
    config = small_config(**CONFIGS[case])
    shapes = list(schema.iter_weight_shapes(config))
    for i in (0, len(shapes) // 2, len(shapes) - 1):
        with pytest.raises(NativeError, match=f"missing tensor '{shapes[i][0]}'"):
            bind_all(native, config, shapes[:i] + shapes[i + 1 :])
    others = {name for row in schema.WEIGHTS for name in [schema.weight_name(row)]} - dict(shapes).keys()
    for name in sorted(others):  # a weight of another feature: refused with the reason
        with pytest.raises(NativeError, match=rf"unknown tensor '{name}' \(a weight only when "):
            bind_all(native, config, [(name, (1,))])


def test_a_cpp_table_that_differs_is_caught(cpp_copy):
    """Plant discrepancies in a copy's header (the k_norm row gone, o_proj not an nn.Linear): caught."""
    table = cpp_copy / "include/celerinfer/weight_table.hpp"
    edit_file(
        table,
        '{Scope::Layer, "self_attn.k_norm.weight", nullptr, &LayerWeights::k_norm, nullptr, 1, '
        "{Dim::HeadDim, Dim::None}, Feature::QkNorm, false, false, Feature::Always, nullptr},",
        "",
    )
    edit_file(
        table,
        'Feature::Always, true, true, Feature::Always, "wo"}',
        'Feature::Always, false, true, Feature::Always, "wo"}',
    )
    engine = load_native(cpp_copy, kernels="readable")
    config = small_config(qk_norm=True)
    assert cpp_weights(engine, config) != python_weights(config)
    with pytest.raises(NativeError, match="unknown tensor 'model.layers.0.self_attn.k_norm.weight'"):
        bind_all(engine, config, schema.iter_weight_shapes(config))
    dense = small_config()
    model, arrays = bind_all(engine, dense, schema.iter_weight_shapes(dense))  # binds, but packs too little
    assert cpp_linears(engine, model) != python_linears(dense, arrays)


# ---- sizes and the original layout -----------------------------------------------------------------
@pytest.mark.parametrize("case", CONFIGS)
def test_num_parameters_is_the_sum_of_the_weight_shapes(case):
    config = small_config(**CONFIGS[case])
    shapes = schema.weight_shapes(config)
    assert config.num_parameters() == sum(math.prod(s) for s in shapes.values())
    assert schema.tensor_count(config) == len(shapes)


def test_num_parameters_that_miscounts_copies_is_caught(monkeypatch):
    """The companion: per-row arithmetic that ignores expert copies no longer equals the enumeration."""
    config = small_config(**CONFIGS["moe_shared"])

    def one_copy(config, row):
        return 0 if not schema.has_feature(config, row.feature) else 1 if row.scope == "model" else 2

    monkeypatch.setattr(schema, "instances", one_copy)
    assert config.num_parameters() != sum(math.prod(s) for s in schema.weight_shapes(config).values())


def test_v0_names_round_trip(v0_dir):
    """The original tool's file holds exactly the table's v0 names; loaded, its weights are the ones
    weight_shapes implies; renamed back through the map, they are the file's names again."""
    doc = json.loads((v0_dir / "minimind.json").read_text())
    model = load_model(v0_dir / "minimind.json")
    top, layer = schema.v0_top_names(), schema.v0_layer_names()
    assert set(doc["weights"]) - {"layers"} == set(top)
    assert all(set(entry) == set(layer) for entry in doc["weights"]["layers"])
    assert set(model.weights) == set(schema.weight_shapes(model.config))
    back, back_layer = {v: k for k, v in top.items()}, {v: k for k, v in layer.items()}

    def original_name(name: str):  # "model.layers.3.self_attn.q_proj.weight" -> (3, "wq")
        if name in back:
            return back[name]
        _, _, i, within = name.split(".", 3)
        return int(i), back_layer[within]

    renamed = {original_name(name) for name in model.weights}
    file_names = {k for k in doc["weights"] if k != "layers"} | {
        (i, k) for i, entry in enumerate(doc["weights"]["layers"]) for k in entry
    }
    if model.config.tie_word_embeddings:  # the original tool stored a tied head as a copy; the reader drops it
        file_names.discard("lm_head")
    assert renamed == file_names


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda w: (*w[:-1], w[1], w[-1]), "per-layer rows must be consecutive"),
        (lambda w: (w[0]._replace(shape=("hiden",)), *w[1:]), "unknown"),
        (lambda w: (w[0]._replace(feature="sometimes"), *w[1:]), "unknown"),
        (lambda w: (w[0]._replace(shape=("hidden",) * 3), *w[1:]), "1 or 2"),
        (lambda w: (*w[:13], w[13]._replace(v0="w_expert"), *w[14:]), "no experts"),
    ],
)
def test_check_table_refuses_rows_the_walk_cannot_follow(bad, message):
    schema.check_table(schema.WEIGHTS)
    with pytest.raises(ValueError, match=message):
        schema.check_table(bad(schema.WEIGHTS))


def test_a_renamed_v0_name_no_longer_matches_the_original_file(v0_dir, monkeypatch):
    """The companion: the table's v0 names are checked against the original tool's own file."""
    doc = json.loads((v0_dir / "minimind.json").read_text())
    rows = tuple(row._replace(v0="rms_att") if row.v0 == "rms_attn" else row for row in schema.WEIGHTS)
    monkeypatch.setattr(schema, "WEIGHTS", rows)
    assert set(doc["weights"]["layers"][0]) != set(schema.v0_layer_names())
