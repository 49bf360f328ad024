"""The safetensors sidecar: written as a stream, read memory-mapped by Python and base_line_micro."""

import json
import tracemalloc

import numpy as np
import pytest
from conftest import REPO, small_config

from celerinfer_lab import ModelFileError, generate_model, load_model, load_native, preset
from celerinfer_lab.standalone import run_standalone
from celerinfer_lab.writer import sidecar_named_by


def sidecar_of(path):
    """The sidecar a model file names: <stem>.<16 hex of its sha256>.safetensors."""
    return path.with_name(sidecar_named_by(path))


@pytest.fixture
def pair(tmp_path):
    cfg = small_config(qk_norm=True, tie_word_embeddings=False)
    generate_model(cfg, 2, 6, 1, output=tmp_path / "plain.json")
    generate_model(cfg, 2, 6, 1, output=tmp_path / "side.json", sidecar=True)
    return tmp_path / "plain.json", tmp_path / "side.json"


def test_sidecar_holds_the_same_model(pair):
    plain, side = load_model(pair[0]), load_model(pair[1])
    assert side.config == plain.config
    for name, array in plain.weights.items():
        np.testing.assert_array_equal(side.weights[name], array)
        assert isinstance(side.weights[name], np.memmap) or isinstance(side.weights[name].base, np.memmap)
    doc = json.loads(pair[1].read_text())
    side_file = sidecar_of(pair[1])
    assert doc["sidecar"] == {"file": side_file.name, "format": "safetensors", "bytes": side_file.stat().st_size}
    assert side_file.name.startswith("side.") and len(side_file.name) == len("side..safetensors") + 16
    assert doc["weights"]["model.norm.weight"]["encoding"] == "sidecar"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads((REPO / "docs" / "model-file.schema.json").read_text()))


def test_sidecar_is_real_safetensors(pair):
    from safetensors.numpy import load_file

    tensors = load_file(sidecar_of(pair[1]))
    np.testing.assert_array_equal(tensors["lm_head.weight"], load_model(pair[0]).weights["lm_head.weight"])


def test_bad_sidecars_are_named(pair):
    side = sidecar_of(pair[1])
    data = side.read_bytes()
    side.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="runs past|truncated"):
        load_model(pair[1])
    side.unlink()
    with pytest.raises(ModelFileError, match=r"the sidecar file \S+ is missing"):
        load_model(pair[1])


def test_native_and_standalone_read_the_sidecar(pair, tmp_path, standalone_binary):
    native = load_native()
    np.testing.assert_array_equal(
        native.forward(load_model(pair[1])).logits, native.forward(load_model(pair[0])).logits
    )
    binary = standalone_binary
    a = run_standalone(binary, pair[0], tmp_path / "a", 0, 1)
    b = run_standalone(binary, pair[1], tmp_path / "b", 0, 1)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_largest_preset_generates_loads_and_runs(tmp_path):
    """minimind2 (104M): generate, load and run without holding several copies of the weights."""
    cfg = preset("minimind2", max_position_embeddings=64)
    tracemalloc.start()
    try:
        generate_model(cfg, 1, 4, 0, output=tmp_path / "big.json", sidecar=True, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.1 * cfg.num_parameters() * 4  # one tensor at a time, never the model
    model = load_model(tmp_path / "big.json")  # memory-mapped: nothing copied
    assert model.config.num_parameters() == 104_030_976
    logits = load_native(kernels="fast").forward(model).logits
    assert logits.shape == (1, 4, 6400) and np.isfinite(logits).all()
