"""Weight formats in model files (issue 14): bf16 and q8 (llama.cpp's Q8_0) beside float32, in the JSON
and in the safetensors sidecar, through both readers, the writer, ``generate --weights`` and
``quantize``. The codecs themselves are tests/test_quantize.py's."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import load_doc, read_sidecar, save_doc, sidecar_of, tiny_config, write_model, write_sidecar
from readers import cpp_verdicts

from celerinfer_lab import ModelFileError, generate_model, load_model
from celerinfer_lab.cli import main
from celerinfer_lab.errors import SidecarError
from celerinfer_lab.quantize import to_bf16, to_q8
from celerinfer_lab.reference import ReferenceModel
from celerinfer_lab.schema import reduced_weights
from celerinfer_lab.standalone import StandaloneError, run_standalone
from celerinfer_lab.writer import weight_bytes

FORMATS = ("f32", "bf16", "q8")
NORM = "model.norm.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


def _config():  # rows of 48: each Q8_0 row ends in a half-empty (zero-padded) block; a separate head
    return tiny_config(hidden_size=48, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def original():
    return generate_model(_config(), 2, 4, 3)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


# ---- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sidecar", [False, True], ids=["json", "sidecar"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_bit_for_bit(original, tmp_path, fmt, sidecar):
    model = original.as_format(fmt)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    model.save(first, sidecar=sidecar)
    back = load_model(first)
    assert back.weight_format == fmt and set(back.stored) == set(model.stored)
    assert set(back.stored) == ({n for n, _ in reduced_weights(back.config)} if fmt != "f32" else set())
    for name in model.weights:
        np.testing.assert_array_equal(back.weights[name], model.weights[name], err_msg=name)
        assert back.weights[name].dtype == np.float32
    for name in model.stored:
        assert back.stored[name].dtype == model.stored[name].dtype
        np.testing.assert_array_equal(back.stored[name], model.stored[name], err_msg=name)
    back.save(second, sidecar=sidecar)
    a, b = first.read_bytes(), second.read_bytes()
    if sidecar:
        assert sidecar_of(first).read_bytes() == sidecar_of(second).read_bytes()
        a, b = a.replace(sidecar_of(first).name.encode(), b""), b.replace(sidecar_of(second).name.encode(), b"")
    assert a == b
    assert (b'"weight_format"' in a) == (fmt != "f32")  # a float32 file is as every file before the formats


def test_the_file_and_sidecar_hold_the_formats_layout(original, tmp_path):
    original.as_format("q8").save(tmp_path / "q.json")
    doc = load_doc(tmp_path / "q.json")
    assert doc["weight_format"] == "q8"
    q, norm = doc["weights"][Q], doc["weights"][NORM]
    assert (q["dtype"], q["shape"], norm["dtype"]) == ("q8_0", [48, 48], "float32")
    assert len(base64.b64decode(q["data"])) == 48 * 2 * 34  # 2 blocks a row, the second half padding
    assert q["preview"][:4] == [float(v) for v in original.as_format("q8").weights[Q][0, :4]]
    original.as_format("bf16").save(tmp_path / "s.json", sidecar=True)
    header, _ = read_sidecar(sidecar_of(tmp_path / "s.json"))
    assert header[Q]["dtype"] == "BF16" and header[NORM]["dtype"] == "F32"
    original.as_format("q8").save(tmp_path / "s8.json", sidecar=True)
    header, _ = read_sidecar(sidecar_of(tmp_path / "s8.json"))
    assert (header[Q]["dtype"], header[Q]["shape"]) == ("U8", [48, 68])


def test_sizes_follow_the_format(original, tmp_path):
    sizes = {}
    for fmt in FORMATS:
        original.as_format(fmt).save(tmp_path / f"{fmt}.json", sidecar=True)
        sizes[fmt] = sidecar_of(tmp_path / f"{fmt}.json").stat().st_size
        header, data = read_sidecar(sidecar_of(tmp_path / f"{fmt}.json"))
        assert len(data) == weight_bytes(original.config, fmt)
    assert sizes["q8"] < sizes["bf16"] < sizes["f32"]


def test_generate_weights_is_as_format_of_the_float32_model(original, tmp_path):
    for fmt in ("bf16", "q8"):
        path = generate_model(_config(), 2, 4, 3, output=tmp_path / f"{fmt}.json", weights=fmt)
        loaded, expected = load_model(path), original.as_format(fmt)
        assert loaded.weight_format == fmt
        for name in expected.stored:
            np.testing.assert_array_equal(loaded.stored[name], expected.stored[name], err_msg=name)
    assert generate_model(_config(), 2, 4, 3, weights="q8").weight_format == "q8"
    with pytest.raises(Exception, match="weight format 'int4'"):
        generate_model(_config(), 2, 4, 3, weights="int4")


# ---- the precision-matched oracle ---------------------------------------------------------------------
def test_a_q8_files_float64_reference_is_the_reference_of_as_format(original, tmp_path):
    original.as_format("q8").save(tmp_path / "q.json", sidecar=True)
    from_file = ReferenceModel(load_model(tmp_path / "q.json"), torch.float64).forward()[0]
    in_memory = ReferenceModel(original.as_format("q8"), torch.float64).forward()[0]
    torch.testing.assert_close(from_file, in_memory, rtol=0, atol=0)
    float32 = ReferenceModel(original, torch.float64).forward()[0]
    assert not torch.equal(from_file, float32)  # the quantized weights do change the logits


# ---- the C++ reader decodes what Python decodes ---------------------------------------------------
@pytest.mark.parametrize("fmt", ["bf16", "q8"])
def test_cpp_logits_of_a_reduced_file_equal_those_of_its_decoded_float32(original, standalone_binary, tmp_path, fmt):
    reduced = original.as_format(fmt)
    reduced.save(tmp_path / "r.json", sidecar=fmt == "q8")
    reduced.as_format("f32").save(tmp_path / "f.json")  # the decoded values, as float32
    env = {"THREADS": "1", "KERNELS": "readable"}
    r = run_standalone(standalone_binary, tmp_path / "r.json", tmp_path / "r", 0, 1, env)
    f = run_standalone(standalone_binary, tmp_path / "f.json", tmp_path / "f", 0, 1, env)
    assert f"weights: {fmt}" in r.stdout
    np.testing.assert_array_equal(r.logits, f.logits)


@pytest.mark.parametrize("fmt", ["bf16", "q8"])
def test_the_standalone_runs_a_reduced_files_own_kernel_sets(original, standalone_binary, tmp_path, fmt):
    """base_line_micro binds the file's stored bytes: the bf16/q8 sets read them (readable and fast
    agree with the readable float32 run on the decoding), a set of the other format is refused by name."""
    original.as_format(fmt).save(tmp_path / "r.json", sidecar=fmt == "bf16")
    runs = {
        kernels: run_standalone(standalone_binary, tmp_path / "r.json", tmp_path / kernels, 0, 1, {"KERNELS": kernels})
        for kernels in ("readable", f"readable-{fmt}", fmt)
    }
    assert f"weights: {fmt}\n" in runs[fmt].stdout and f"kernels: {fmt}," in runs[fmt].stdout
    np.testing.assert_allclose(runs[f"readable-{fmt}"].logits, runs["readable"].logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(runs[fmt].logits, runs["readable"].logits, rtol=0, atol=1e-4)
    other = "q8" if fmt == "bf16" else "bf16"
    with pytest.raises(StandaloneError, match=f"kernel set '{other}' reads {other} weights; this model stores {fmt}"):
        run_standalone(standalone_binary, tmp_path / "r.json", tmp_path / "x", 0, 1, {"KERNELS": other})


# ---- planted bad files: both readers refuse them, by name ---------------------------------------------
def _retag(doc, name, dtype, data):
    doc["weights"][name].update(dtype=dtype, data=_b64(data))


def _planted(original):
    """(file name, builder(folder) -> path, what Python's message names)."""
    q8_q, bf_q = to_q8(original.weights[Q]), to_bf16(original.weights[Q])

    def edit(fmt, change, sidecar=False):
        def build(folder):
            path = folder / "m.json"
            original.as_format(fmt).save(path, sidecar=sidecar)
            doc = load_doc(path)
            change(doc)
            save_doc(path, doc)
            return path

        return build

    def side_entry(**changes):
        def build(folder):
            path = folder / "m.json"
            original.as_format("q8").save(path, sidecar=True)
            header, data = read_sidecar(sidecar_of(path))
            header[Q].update(changes)
            write_sidecar(path, header, data)
            return path

        return build

    cut = edit("q8", lambda d: d["weights"][Q].update(data=d["weights"][Q]["data"][:-4]))
    norm_bf16 = edit("bf16", lambda d: _retag(d, NORM, "bfloat16", to_bf16(original.weights[NORM])))
    inf_scale = q8_q.copy()
    inf_scale[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    return [
        ("wrong_dtype", edit("q8", lambda d: _retag(d, Q, "bfloat16", bf_q)), "must be q8_0"),
        ("f32_reduced_in_q8", edit("q8", lambda d: _retag(d, Q, "float32", original.weights[Q])), "must be q8_0"),
        ("mixed_formats", edit("bf16", lambda d: _retag(d, Q, "q8_0", q8_q)), "must be bfloat16"),
        ("bf16_in_f32_file", edit("f32", lambda d: _retag(d, Q, "bfloat16", bf_q)), "only for the weights"),
        ("format_without_data", edit("f32", lambda d: d.update(weight_format="q8")), "must be q8_0"),
        ("norm_bf16", norm_bf16, "stays a float type"),
        ("byte_count", cut, "base64 characters"),
        ("unknown_format", edit("bf16", lambda d: d.update(weight_format="int4")), "weight_format 'int4'"),
        ("format_as_number", edit("bf16", lambda d: d.update(weight_format=16)), "weight_format 16"),
        ("q8_inf_scale", edit("q8", lambda d: _retag(d, Q, "q8_0", inf_scale)), "NaN or Inf"),
        ("sidecar_bf16_for_u8", side_entry(dtype="BF16", shape=[48, 34]), "a q8_0 weight is U8"),
        ("sidecar_logical_shape", side_entry(shape=[48, 48]), "spans"),
        ("sidecar_unknown_dtype", side_entry(dtype="I8"), "F32, BF16 or U8"),
    ]


def test_both_readers_refuse_the_same_planted_files(original, standalone_binary, tmp_path):
    good, bad = [], []
    for fmt in FORMATS:
        for sidecar in (False, True):
            folder = tmp_path / f"good_{fmt}_{sidecar}"
            folder.mkdir()
            original.as_format(fmt).save(folder / "m.json", sidecar=sidecar)
            good.append(folder / "m.json")
    for name, build, fragment in _planted(original):
        folder = tmp_path / name
        folder.mkdir()
        path = build(folder)
        with pytest.raises(ModelFileError) as err:
            load_model(path)
        assert fragment in str(err.value), (name, str(err.value))
        bad.append(path)
    verdicts = cpp_verdicts(standalone_binary, good + bad)
    assert [verdicts[str(p)] for p in good] == [("ok", f"weights {p.parent.name.split('_')[1]}") for p in good]
    wrong = {p.parent.name: verdicts[str(p)] for p in bad if verdicts[str(p)][0] != "refused"}
    assert not wrong, wrong
    assert len(bad) >= 12


def test_a_sidecar_entry_with_the_logical_shape_is_refused(original, tmp_path):
    path = tmp_path / "m.json"
    original.as_format("q8").save(path, sidecar=True)
    header, data = read_sidecar(sidecar_of(path))
    header[Q]["shape"] = [48, 48]  # the logical shape: 48 * 48 bytes, not the 48 * 68 the entry spans
    write_sidecar(path, header, data)
    with pytest.raises(SidecarError, match="spans 3264 bytes"):
        load_model(path)


def test_nonfinite_scales_load_when_allowed(original, tmp_path):
    path = tmp_path / "m.json"
    original.as_format("q8").save(path)
    doc = load_doc(path)
    q = to_q8(original.weights[Q])
    q[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    _retag(doc, Q, "q8_0", q)
    save_doc(path, doc)
    assert not np.isfinite(load_model(path, allow_nonfinite=True).weights[Q][0, :32]).any()


def test_weight_format_is_refused_in_the_original_layout(v0_dir, tmp_path):
    doc = json.loads((v0_dir / "minimind.json").read_text())
    doc["weight_format"] = "f32"
    save_doc(tmp_path / "m.json", doc)
    with pytest.raises(ModelFileError, match="only this project's format"):
        load_model(tmp_path / "m.json")


# ---- the command line -------------------------------------------------------------------------------
def test_quantize_command(original, tmp_path, capsys):
    original.save(tmp_path / "f.json")
    assert main(["quantize", str(tmp_path / "f.json"), "--to", "q8", "-o", str(tmp_path / "q.json")]) == 0
    q = load_model(tmp_path / "q.json")
    np.testing.assert_array_equal(q.stored[Q], original.as_format("q8").stored[Q])
    assert "f32 -> q8" in capsys.readouterr().out
    args = ["quantize", str(tmp_path / "q.json"), "--to", "bf16", "-o", str(tmp_path / "b.json"), "--sidecar"]
    assert main(args) == 0
    assert "re-quantized from the q8 file's decoded values" in capsys.readouterr().out
    assert load_model(tmp_path / "b.json").weight_format == "bf16"
    assert main(args) == 2 and "already exist" in capsys.readouterr().err  # no --force
    assert main(["quantize", str(tmp_path / "q.json"), "--to", "f32", "-o", str(tmp_path / "q.json"), "--force"]) == 2
    assert "the model being read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(tmp_path / "f.json"), "--to", "int4", "-o", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "q.json")]) == 0
    assert re.search(r"weights: q8, [\d.]+ [kM]B \([\d.]+ [kM]B in f32\)", capsys.readouterr().out)


def test_generate_weights_flag(tmp_path, capsys):
    out = tmp_path / "g.json"
    flags = ["generate", "--hidden", "32", "--layers", "1", "--heads", "4", "--kvh", "2", "--vocab", "64"]
    assert main([*flags, "--max-pos", "16", "--weights", "bf16", "-o", str(out)]) == 0
    assert "(bf16 weights)" in capsys.readouterr().out
    assert load_model(out).weight_format == "bf16"
    with pytest.raises(SystemExit) as exit_:
        main([*flags, "--weights", "q4", "-o", str(out)])
    assert exit_.value.code == 2 and "invalid choice: 'q4'" in capsys.readouterr().err


def test_write_model_passes_weights(tmp_path):
    path = write_model(tmp_path, weights="q8", hidden_size=48)
    assert load_model(path).weight_format == "q8"


@pytest.mark.parametrize("sidecar", [False, True], ids=["json", "sidecar"])
def test_reduced_files_match_the_json_schema(original, tmp_path, sidecar):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[1] / "docs" / "model-file.schema.json").read_text())
    for fmt in ("bf16", "q8"):
        original.as_format(fmt).save(tmp_path / f"{fmt}.json", sidecar=sidecar)
        jsonschema.validate(load_doc(tmp_path / f"{fmt}.json"), schema)
    doc = load_doc(tmp_path / "q8.json")
    doc["weight_format"] = "q4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_a_stored_weight_of_the_wrong_layout_is_not_written(original, tmp_path):
    model = original.as_format("q8")
    model.save(tmp_path / "good.json")  # the companion: as encoded, it is written
    model.stored[Q] = model.stored[Q][:, :34]  # one block a row where the config needs two
    with pytest.raises(ModelFileError, match=r"must be uint8 of shape \[48, 68\], got uint8 \[48, 34\]"):
        model.save(tmp_path / "bad.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json"]  # nothing left behind


def test_a_list_as_dtype_is_refused_by_name(original, tmp_path):
    path = tmp_path / "m.json"
    original.as_format("bf16").save(path)
    doc = load_doc(path)
    doc["weights"][NORM]["dtype"] = []
    save_doc(path, doc)
    with pytest.raises(ModelFileError, match=r"dtype \[\] is not allowed here"):
        load_model(path)


def test_a_float32_sidecar_tensor_after_an_odd_sized_one_loads_in_both_readers(
    standalone_binary, sanitized_binary, tmp_path
):
    # Tied, so the embedding is reduced: U8 [63, 34] is 2142 bytes, and the float32 norm after it
    # starts at an offset that is not a multiple of 4 (the C++ copies it instead of mapping it).
    model = generate_model(tiny_config(vocab_size=63), 2, 4, 5).as_format("q8")
    model.save(tmp_path / "q.json", sidecar=True)
    header, _ = read_sidecar(sidecar_of(tmp_path / "q.json"))
    assert header["model.layers.0.input_layernorm.weight"]["data_offsets"][0] % 4 == 2
    np.testing.assert_array_equal(load_model(tmp_path / "q.json").weights[NORM], model.weights[NORM])
    # UBSan halts on a misaligned float load: mapped as it lies, reading the norm would be one
    assert cpp_verdicts(sanitized_binary, [tmp_path / "q.json"])[str(tmp_path / "q.json")] == ("ok", "weights q8")
    model.as_format("f32").save(tmp_path / "f.json")
    env = {"THREADS": "1", "KERNELS": "readable"}
    q = run_standalone(standalone_binary, tmp_path / "q.json", tmp_path / "q", 0, 1, env)
    f = run_standalone(standalone_binary, tmp_path / "f.json", tmp_path / "f", 0, 1, env)
    np.testing.assert_array_equal(q.logits, f.logits)
