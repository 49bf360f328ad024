"""The Python reader on each measured class of hostile file (issue 11): a named ModelFileError,
exit 2 from the command line, bounded memory, and a sidecar changed under a loaded model reported
before a forward touches it. The C++ reader's side is tests/test_cpp_fuzz.py; the two readers'
agreement is tests/test_fuzz.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hostile import load_doc, read_sidecar, save_doc, sidecar_of, write_model, write_sidecar

from celerinfer_lab import ModelFileError, load_model
from celerinfer_lab.errors import SidecarError
from celerinfer_lab.modelfile import encode_tensor
from celerinfer_lab.reference import ReferenceModel

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


@pytest.fixture
def plain(tmp_path):
    return write_model(tmp_path)


@pytest.fixture
def side(tmp_path):
    return write_model(tmp_path, "s.json", sidecar=True)


def _edit_doc(path, edit):
    doc = load_doc(path)
    edit(doc)
    save_doc(path, doc)


def _refused(path, *fragments, **kwargs):
    with pytest.raises(ModelFileError) as err:
        load_model(path, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


# ---- the sidecar header ------------------------------------------------------------------------
def _edit_entry(path, name, **changes):
    header, data = read_sidecar(sidecar_of(path))
    header[name].update(changes)
    write_sidecar(path, header, data)


def test_sidecar_offsets_that_wrap_64_bits_are_refused(side):
    header, data = read_sidecar(sidecar_of(side))
    start, end = header[NORM]["data_offsets"]
    _edit_entry(side, NORM, data_offsets=[start + 2**64 - 64, end])  # end - start wraps to a small number
    _refused(side, "data_offsets", "must be two integers 0 <= start <= end")


def test_negative_sidecar_offsets_are_refused(side):
    header, _ = read_sidecar(sidecar_of(side))
    first = next(name for name, info in header.items() if info["data_offsets"][0] == 0)
    start, end = header[first]["data_offsets"]
    _edit_entry(side, first, data_offsets=[start - 64, end - 64])  # would read the header as weights
    _refused(side, "data_offsets")


def test_overlapping_and_gapped_sidecar_tensors_are_refused(side):
    header, data = read_sidecar(sidecar_of(side))
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    first, second = names[0], names[1]
    header[second]["data_offsets"] = (
        header[first]["data_offsets"]
        if header[first]["shape"] == header[second]["shape"]
        else header[second]["data_offsets"]
    )
    if header[first]["shape"] != header[second]["shape"]:  # shift the second back by 4 bytes: overlap
        s, e = header[second]["data_offsets"]
        header[second]["data_offsets"] = [s - 4, e - 4]
    write_sidecar(side, header, data)
    _refused(side, "overlaps the tensor before it")
    header, data = read_sidecar(sidecar_of(side))
    write_sidecar(side, header, data + b"\0" * 8)  # trailing bytes no tensor owns
    _refused(side)


def test_sidecar_dtype_shape_and_length_must_agree_with_the_json(side):
    _edit_entry(side, NORM, dtype="F16")
    _refused(side, "dtype 'F16'")
    header, data = read_sidecar(sidecar_of(side))
    header[NORM]["dtype"] = "F32"
    write_sidecar(side, header, data, header_bytes=json.dumps(header).encode() + b" ")  # N not a multiple of 8
    _refused(side, "not a multiple of 8")


def test_a_truncated_or_foreign_sidecar_is_refused_by_size(side):
    path = sidecar_of(side)
    path.write_bytes(path.read_bytes()[:-4])
    _refused(side, "the model file says")


@pytest.mark.parametrize("name", ["../s.json", "/etc/passwd", "..", ""])
def test_the_sidecar_must_be_a_plain_name_beside_the_model(side, name):
    _edit_doc(side, lambda d: d["sidecar"].update(file=name))
    _refused(side, "plain file name")


def test_a_sidecar_that_is_a_folder_or_missing_is_named(side):
    path = sidecar_of(side)
    path.unlink()
    _refused(side, "is missing")
    path.mkdir()
    _refused(side, "not a regular file")


# ---- the JSON text -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"meta": ' + "[" * 130_000 + "]" * 130_000 + "}", "nested deeper than 32"),
        ('{"format_version": 1, "format_version": 1}', "appears twice"),
        ('{"meta": {"x": NaN}}', "NaN is not JSON"),
        ('{"meta": {"x": 1e400}}', "overflows a double"),
        ('{"meta": {"x": "\\ud800"}}', "lone UTF-16 surrogate"),
    ],
)
def test_json_text_that_either_parser_would_misread_is_refused(tmp_path, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    _refused(path, fragment)


def test_a_byte_order_mark_is_accepted(plain):
    plain.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    load_model(plain)


# ---- the config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("num_hidden_layers", 10**8, "num_hidden_layers=100000000: above 1,024"),
        ("hidden_size", 2**32 + 8, "hidden_size=4294967304: above 65,536"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("rms_norm_eps", -1e-6, "rms_norm_eps=-1e-06"),
        ("qk_norm", 1, "qk_norm=1: must be true or false"),
        ("num_attention_heads", 4.0, "num_attention_heads=4.0: must be an integer"),
    ],
)
def test_config_fields_are_refused_by_name(plain, field, value, fragment):
    _edit_doc(plain, lambda d: d["config"].update({field: value}))
    _refused(plain, "config: " + fragment)


def test_huge_experts_in_a_tiny_file_are_refused_before_any_allocation(plain):
    _edit_doc(plain, lambda d: d["config"].update(use_moe=True, num_experts=10**6, num_experts_per_tok=1))
    _refused(plain, "num_experts=1000000: above 1,024")


def test_a_config_the_file_does_not_hold_fails_fast_with_bounded_memory(plain):
    """Within every limit, but 1024 layers x 1024 experts: the reader looks names up one at a time
    and stops at the first missing one, instead of building three million names first."""
    _edit_doc(
        plain,
        lambda d: d["config"].update(num_hidden_layers=1024, use_moe=True, num_experts=1024, num_experts_per_tok=1),
    )
    # VmHWM, this process's own peak: ru_maxrss would also count the pytest parent's pages at fork.
    code = (
        "from celerinfer_lab.reader import load_model\n"
        "from celerinfer_lab.errors import ModelFileError\n"
        f"try:\n    load_model({str(plain)!r})\nexcept ModelFileError as e:\n    print(e)\n"
        "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "print('peak_mb', int(peak.split()[1]) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "missing tensor 'model.layers.0.mlp.gate.weight'" in out.stdout, out.stdout + out.stderr
    peak = int(out.stdout.split("peak_mb")[1])
    assert peak < 300, f"loading a tiny file grew to {peak} MB (building every implied name takes ~700 MB)"


# ---- the values ----------------------------------------------------------------------------------
def test_nonfinite_weights_and_rope_are_refused_unless_allowed(plain):
    _edit_doc(plain, lambda d: d["weights"].update({NORM: encode_tensor(NORM, np.full(32, np.nan), "float32")}))
    _refused(plain, f"tensor '{NORM}' contains NaN or Inf", "allow_nonfinite")
    assert np.isnan(load_model(plain, allow_nonfinite=True).weights[NORM]).all()
    cos = load_model(plain, allow_nonfinite=True).rope_cos.copy()
    cos[3, 1] = np.inf
    _edit_doc(plain, lambda d: d["rope"].update(cos=encode_tensor("rope_cos", cos, "float32")))
    _edit_doc(plain, lambda d: d["weights"].update({NORM: encode_tensor(NORM, np.ones(32), "float32")}))
    _refused(plain, "rope cos contains NaN or Inf")
    assert np.isinf(load_model(plain, allow_nonfinite=True).rope_cos[3, 1])


def test_a_float64_weight_past_float32_range_is_refused(plain):
    """Finite as stored, Inf once in float32 (what both forwards compute in): refused like Inf."""
    big = np.ones(32)
    big[5] = 1e300
    _edit_doc(plain, lambda d: d["weights"].update({NORM: encode_tensor(NORM, big, "float64")}))
    _refused(plain, f"tensor '{NORM}' contains NaN or Inf in float32", "[5]")


def test_input_ids_stored_as_floats_are_refused(plain):
    ids = load_model(plain).input_ids
    _edit_doc(plain, lambda d: d["inputs"].update(input_ids=encode_tensor("input_ids", ids + 0.5, "float32")))
    _refused(plain, "input_ids", "dtype 'float32' is not allowed here")


def test_data_length_is_checked_before_decoding(plain):
    _edit_doc(plain, lambda d: d["weights"][EMBED].update(shape=[2**40, 2**20]))
    _refused(plain, f"tensor '{EMBED}' has shape [1099511627776, 1048576], the config implies [64, 32]")


# ---- every path: exit 2 and one line ---------------------------------------------------------------
def test_the_command_line_names_the_problem_and_exits_2(plain):
    _edit_doc(plain, lambda d: d["config"].update(hidden_act="gelu"))
    for command in (["info", str(plain)], ["compare", str(plain), "--kernels", "readable"]):
        out = subprocess.run(
            [sys.executable, "-m", "celerinfer_lab.cli", *command], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: ") and "hidden_act='gelu'" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_allow_nonfinite_on_the_command_line(plain):
    _edit_doc(plain, lambda d: d["weights"].update({NORM: encode_tensor(NORM, np.full(32, np.nan), "float32")}))
    cli = [sys.executable, "-m", "celerinfer_lab.cli", "info", str(plain)]
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 2
    out = subprocess.run(cli + ["--allow-nonfinite"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---- a sidecar changed under a loaded model ----------------------------------------------------------
def test_a_sidecar_truncated_under_a_loaded_model_is_an_error_not_sigbus(side, native):
    model = load_model(side)
    bound = native.prepare(model, "readable")
    os.truncate(sidecar_of(side), 64)  # the map's pages past 64 bytes now raise SIGBUS when read
    with pytest.raises(SidecarError, match="was truncated on disk after the model was loaded"):
        ReferenceModel(model)
    with pytest.raises(SidecarError, match="reload the model"):
        bound.forward()
    with pytest.raises(SidecarError):
        native.forward(model)


def test_a_sidecar_rewritten_in_place_is_an_error(side):
    model = load_model(side)
    path = sidecar_of(side)
    info = path.stat()
    with open(path, "r+b") as f:  # same size, new bytes: the model's weights would change under it
        f.seek(info.st_size - 4)
        f.write(b"\0\0\0\0")
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    with pytest.raises(SidecarError, match="was rewritten on disk"):
        ReferenceModel(model)


def test_a_sidecar_replaced_by_a_new_file_leaves_the_loaded_model_intact(side, tmp_path):
    """A replacement by rename (what generate does) never touches the mapped inode: no error, the
    loaded weights are the old ones."""
    model = load_model(side)
    before = np.array(model.weights[NORM])
    path = sidecar_of(side)
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"\0" * path.stat().st_size)
    os.replace(fresh, path)
    ReferenceModel(model)
    np.testing.assert_array_equal(model.weights[NORM], before)


def test_compare_on_a_model_that_is_all_padding_is_a_named_error(plain):
    """Only real tokens are compared; a mask of zeros leaves nothing (was a ValueError from numpy)."""
    from celerinfer_lab import compare
    from celerinfer_lab.errors import UsageError

    model = load_model(plain)
    model.attention_mask[:] = 0
    with pytest.raises(UsageError, match="every token is padding"):
        compare(model)
