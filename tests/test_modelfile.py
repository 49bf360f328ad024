import json

import numpy as np
import pytest
from conftest import REPO, small_model

from celerinfer_lab import ModelFileError, load_model, save_model, weight_shapes
from celerinfer_lab.modelfile import encode_tensor


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.json"
    small_model(qk_norm=True, tie_word_embeddings=False).save(path)
    return path


def rewrite(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def test_round_trip_is_exact(tmp_path):
    model = small_model(padding="left", use_moe=True, num_experts=3, num_experts_per_tok=2, n_shared_experts=1)
    save_model(model, tmp_path / "a.json")
    loaded = load_model(tmp_path / "a.json")
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], array, err_msg=name)
    np.testing.assert_array_equal(loaded.input_ids, model.input_ids)
    np.testing.assert_array_equal(loaded.attention_mask, model.attention_mask)
    np.testing.assert_array_equal(loaded.rope_cos, model.rope_cos)
    loaded.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_tensor_objects_have_the_original_fields(model_file):
    doc = json.loads(model_file.read_text())
    assert doc["format"] == "celerinfer-lab" and doc["format_version"] == 1
    t = doc["weights"]["model.layers.0.self_attn.q_proj.weight"]
    assert set(t) == {"name", "shape", "dtype", "encoding", "data", "preview"}
    assert t["encoding"] == "base64" and t["dtype"] == "float32" and t["shape"] == [64, 64]
    assert len(t["preview"]) == 16
    assert set(doc["inputs"]) == {"input_ids", "attention_mask"} and set(doc["rope"]) == {"cos", "sin"}


def test_weight_names_are_minimind_state_dict_keys(model_file):
    sd = load_model(model_file).state_dict()
    for key in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert key in sd


def test_tied_head_is_the_embedding():
    sd = small_model().state_dict()
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]


def test_file_matches_json_schema(model_file):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "docs" / "model-file.schema.json").read_text())
    jsonschema.validate(json.loads(model_file.read_text()), schema)


def test_v0_fixture_loads(v0_dir):
    model = load_model(v0_dir / "minimind.json")
    assert model.source_format == "celerinfer-v0"
    assert model.config.hidden_size == 64 and model.config.head_dim == 8 and model.config.tie_word_embeddings
    assert model.input_ids.shape == (2, 5) and model.attention_mask.all()
    assert set(model.state_dict()) == set(weight_shapes(model.config)) | {"lm_head.weight"}


def _drop(name):
    return lambda d: d["weights"].pop(name)


def _set(path, value):
    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "edit,expected",
    [
        (_drop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        (
            _set(["weights", Q], encode_tensor(Q, np.zeros((64, 32)), "float32")),
            f"tensor '{Q}' has shape [64, 32], the config implies [64, 64]",
        ),
        (_set(["weights", Q, "dtype"], "float8"), f"tensor '{Q}': dtype 'float8' is not allowed here"),
        (
            lambda d: d["weights"][Q].update(data=d["weights"][Q]["data"][:-8]),
            f"tensor '{Q}': data holds 21840 base64 characters but shape [64, 64] of float32 needs 21848 (16384 bytes)",
        ),
        (
            lambda d: d["weights"][Q].update(data="!!" + d["weights"][Q]["data"][2:]),
            f"tensor '{Q}': data is not valid base64",
        ),
        (lambda d: d["weights"][Q].pop("shape"), f"tensor '{Q}': tensor has no 'shape' field"),
        (
            _set(["weights", "model.layers.0.extra.weight"], encode_tensor("x", np.zeros(3), "float32")),
            "unexpected tensor 'model.layers.0.extra.weight'",
        ),
        (
            _set(["weights", Q], encode_tensor(Q, np.full((64, 64), np.nan), "float32")),
            f"tensor '{Q}' contains NaN or Inf",
        ),
        (
            _set(["inputs", "input_ids"], encode_tensor("input_ids", np.full((2, 7), 128), "int32")),
            "input_ids[0,0] = 128 is outside the vocabulary [0, 128)",
        ),
        (
            _set(["inputs", "input_ids"], encode_tensor("input_ids", np.full((2, 7), -1), "int32")),
            "outside the vocabulary",
        ),
        (
            _set(["inputs", "attention_mask"], encode_tensor("attention_mask", np.full((2, 7), 2), "uint8")),
            "attention_mask[0,0] = 2; the mask must hold only 0 and 1",
        ),
        (
            _set(["inputs", "attention_mask"], encode_tensor("attention_mask", np.ones((2, 6)), "uint8")),
            "attention_mask has shape [2, 6], input_ids has [2, 7]",
        ),
        (lambda d: d["inputs"].pop("attention_mask"), "missing tensor 'attention_mask'"),
        (
            _set(["config", "num_key_value_heads"], 3),
            "config: num_attention_heads=8 is not a multiple of num_key_value_heads=3",
        ),
        (_set(["config", "max_position_embeddings"], 4), "seq_len 7 is longer than max_position_embeddings 4"),
        (
            _set(["config", "max_position_embeddings"], 64),
            "rope cos has shape [128, 8], expected [max_position_embeddings, head_dim] = [64, 8]",
        ),
        (_set(["format_version"], 99), "format_version 99 is not supported"),
        (lambda d: d.pop("config"), "missing field 'config'"),
    ],
)
def test_bad_files_name_what_is_wrong(model_file, edit, expected):
    rewrite(model_file, edit)
    with pytest.raises(ModelFileError) as err:
        load_model(model_file)
    assert expected in str(err.value)
    assert str(model_file) in str(err.value)


def test_truncated_file(model_file):
    model_file.write_bytes(model_file.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="not valid JSON at line .* truncated"):
        load_model(model_file)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"hello", "not valid JSON"),
        (b"[1, 2]", "top level must be a JSON object"),
        (b'{"a": 1}', "not a model file"),
        (b"\xff\xfe\x00", "not"),
    ],
)
def test_not_a_model_file(tmp_path, content, expected):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "nope.json")


def test_v0_missing_layer_tensor(v0_dir, tmp_path):
    path = tmp_path / "v0.json"
    path.write_bytes((v0_dir / "minimind.json").read_bytes())
    rewrite(path, lambda d: d["weights"]["layers"][1].pop("wq"))
    with pytest.raises(ModelFileError, match=r"missing tensor 'weights.layers\[1\].wq'"):
        load_model(path)
