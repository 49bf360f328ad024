"""Fuzzing the two model-file readers against each other (issue 11).

hypothesis mutates real model files (this project's format with and without a sidecar, MoE,
untied, and the original CelerInfer layout): JSON values replaced by awkward ones, keys dropped,
base64 cut, bytes of the text flipped or cut, sidecar headers edited. Every mutant must be either
loaded or refused with a ModelFileError by ``load_model`` (any other exception is a bug), and the
sanitizer-built C++ reader (``base_line_micro --check``) must reach the same verdict on every one:
the readers accept exactly the same files. The default run takes about a minute; ``-m fuzz_long``
runs for FUZZ_SECONDS (default 1800). Every disagreement or crash found becomes a folder in
tests/fuzz_regressions/python/ (the model file, its sidecar, and EXPECT: "ok" or "refused").
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from conftest import fixtures_dir
from hostile import write_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from readers import differential, python_verdict

REGRESSIONS = Path(__file__).parent / "fuzz_regressions" / "python"
AWKWARD = [
    0,
    -1,
    1,
    2,
    3,
    8,
    1024,
    1025,
    65536,
    65537,
    2**31 - 1,
    2**31,
    2**32 + 8,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    2**64 + 1,
    -(2**63),
    10**30,
    0.5,
    1.0,
    64.0,
    -0.0,
    1e308,
    True,
    False,
    None,
    "",
    "silu",
    "gelu",
    "float32",
    "float16",
    "float64",
    "int32",
    "int64",
    "uint8",
    "F32",
    "F16",
    "BF16",
    "U8",
    "bfloat16",
    "q8_0",
    "bf16",
    "q8",
    "f32",
    "sidecar",
    "base64",
    "safetensors",
    "always",
    "k>1",
    "half",
    "interleaved",
    "celerinfer-lab",
    [],
    {},
    [1],
    [64, 32],
    [2, 4],
    {"a": 1},
    "../m.json",
    "AAAA",
]


# ---- the seed corpus -------------------------------------------------------------------------------
def seed_models(folder: Path) -> list[Path]:
    """The files the mutations start from: every layout the readers know."""
    seeds = [
        write_model(folder / "dense", "m.json"),
        write_model(folder / "dense_side", "m.json", sidecar=True),
        write_model(
            folder / "moe",
            "m.json",
            qk_norm=True,
            use_moe=True,
            num_experts=3,
            num_experts_per_tok=2,
            n_shared_experts=1,
            tie_word_embeddings=False,
        ),
        write_model(folder / "moe_side", "m.json", sidecar=True, use_moe=True, num_experts=2),
        # the weight formats: bf16; q8 with rows of 48 (a padded Q8_0 block), untied; q8 in a sidecar (U8)
        write_model(folder / "bf16", "m.json", weights="bf16"),
        write_model(folder / "q8", "m.json", weights="q8", hidden_size=48, tie_word_embeddings=False),
        write_model(folder / "q8_side", "m.json", sidecar=True, weights="q8", use_moe=True, num_experts=2),
    ]
    v0 = folder / "v0" / "m.json"
    v0.parent.mkdir()
    shutil.copy(fixtures_dir() / "celerinfer-v0" / "minimind.json", v0)
    return seeds + [v0]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[tuple[Path, dict, bytes | None]]:
    out = []
    for path in seed_models(tmp_path_factory.mktemp("seeds")):
        doc = json.loads(path.read_text())
        side = (path.parent / doc["sidecar"]["file"]).read_bytes() if "sidecar" in doc else None
        out.append((path, doc, side))
    return out


# ---- mutations -------------------------------------------------------------------------------------
def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list) and len(node) <= 16:  # not into long lists (a v0 file's layers are few)
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _mutate_doc(data, doc: dict) -> None:
    # An area first, so the few config fields are hit as often as the hundreds of tensor fields.
    areas = [key for key in doc if isinstance(doc[key], (dict, list))] + ["(top)"]
    area = data.draw(st.sampled_from(sorted(areas) + ["config"] * 3 if "config" in doc else areas), label="area")
    paths = [p for p in _paths(doc) if p and (area == "(top)" or p[0] == area)]
    path = data.draw(st.sampled_from(paths), label="path")
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    kind = data.draw(st.sampled_from(["replace", "delete", "add", "string"]), label="kind")
    if kind == "add" and area == "(top)":  # a key beside the sections: format, a sidecar in the v0 layout, ...
        parent, key, value = {"": doc}, "", doc
    if kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "add" and isinstance(value, dict):
        value[
            data.draw(
                st.sampled_from(
                    [
                        "x",
                        "bytes",
                        "encoding",
                        "dtype",
                        "head_dim",
                        "lm_head",
                        "sidecar",
                        "format",
                        "format_version",
                        "meta",
                        "n_routed_experts",
                        "norm_topk_prob",
                        "weight_format",
                    ]
                )
            )
        ] = data.draw(st.sampled_from(AWKWARD))
    elif kind == "string" and isinstance(value, str) and value:
        i = data.draw(st.integers(0, len(value) - 1), label="at")
        op = data.draw(st.sampled_from(["cut", "char", "extend"]))
        parent[key] = (
            value[:i]
            if op == "cut"
            else value[:i] + data.draw(st.sampled_from("A=!/+\u00e9 ")) + value[i + (op == "char") :]
        )
    else:
        parent[key] = data.draw(st.sampled_from(AWKWARD), label="value")


def _mutate_text(data, raw: bytes) -> bytes:
    op = data.draw(st.sampled_from(["cut", "flip", "insert", "deep", "literal", "bom"]), label="text op")
    i = data.draw(st.integers(0, len(raw) - 1), label="at")
    if op == "cut":
        return raw[:i]
    if op == "flip":
        return raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    if op == "insert":
        return (
            raw[:i] + data.draw(st.sampled_from([b",", b"{", b"[", b'"', b"\\", b"\x00", b"\xff", b"1e999"])) + raw[i:]
        )
    if op == "deep":
        depth = data.draw(st.sampled_from([31, 32, 33, 1000, 100_000]))
        return b'{"deep":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"," + raw.lstrip()[1:]
    if op == "literal":
        return raw.replace(
            b'"meta":{',
            b'"meta":{"x":%s,'
            % data.draw(st.sampled_from([b"NaN", b"-Infinity", b"1e400", b'"\\udc00"', b"18446744073709551616"])),
            1,
        )
    return b"\xef\xbb\xbf" + raw


def _mutate_sidecar(data, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names), label="tensor")
    field = data.draw(st.sampled_from(["start", "end", "dtype", "shape", "drop", "truncate", "append", "n"]))
    body = raw[8 + n :]
    if field in ("start", "end"):
        header[name]["data_offsets"][field == "end"] += data.draw(
            st.sampled_from([-(2**64), -64, -4, 4, 64, 2**64 - 4])
        )
    elif field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F16", "F64", "BF16", "U8", "F32", "f32", 1]))
    elif field == "shape":
        header[name]["shape"] = data.draw(st.sampled_from([[], [0], [1], [2**62, 4], [-1, 4]]))
    elif field == "drop":
        del header[name]
    elif field == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif field == "append":
        return raw + b"\0" * 8
    else:
        return struct.pack("<Q", data.draw(st.sampled_from([n + 1, n + 8, 2**63, 2**64 - 1]))) + raw[8:]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def write_mutant(data, seeds, folder: Path) -> Path:
    path, doc, side = data.draw(st.sampled_from(seeds), label="seed")
    doc = json.loads(json.dumps(doc))
    target = data.draw(st.sampled_from(["doc", "text", "sidecar"] if side else ["doc", "text"]), label="target")
    if target == "doc":
        _mutate_doc(data, doc)
    sidecar_bytes = side
    if target == "sidecar":
        sidecar_bytes = _mutate_sidecar(data, side)
        if data.draw(st.booleans(), label="keep bytes in step"):  # else the size check alone refuses it
            doc["sidecar"]["bytes"] = len(sidecar_bytes)
    raw = json.dumps(doc).encode()
    if target == "text":
        raw = _mutate_text(data, raw)
    folder.mkdir(parents=True)
    out = folder / "m.json"
    out.write_bytes(raw)
    if side is not None:  # the sidecar under its seed's name, whether or not the mutation kept the link
        (folder / doc_sidecar_name(path)).write_bytes(sidecar_bytes)
    return out


def doc_sidecar_name(path: Path) -> str:
    return json.loads(path.read_text())["sidecar"]["file"]


def fuzz(seeds, folder: Path, examples: int) -> dict[str, tuple[str, str]]:
    """Write ``examples`` mutants under ``folder``; return each one's Python verdict."""
    verdicts: dict[str, tuple[str, str]] = {}

    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck)
    )
    @given(st.data())
    def one(data):
        path = write_mutant(data, seeds, folder / f"{len(verdicts):06d}")
        verdicts[str(path)] = python_verdict(path)

    one()
    return verdicts


def test_mutants_get_a_verdict_and_both_readers_agree(seeds, sanitized_binary, tmp_path):
    verdicts = fuzz(seeds, tmp_path, examples=int(os.environ.get("FUZZ_EXAMPLES", 600)))
    refused = sum(v == "refused" for v, _ in verdicts.values())
    assert 0 < refused < len(verdicts), "the mutations should make some files invalid and leave some valid"
    differential(sanitized_binary, [Path(f) for f in verdicts], verdicts)


CONFIG_VALUES = [
    0,
    -1,
    1,
    2,
    4,
    8,
    16,
    64,
    1024,
    1025,
    65537,
    2**32 + 8,
    2**63,
    4.0,
    0.5,
    -1e-6,
    1e-30,
    True,
    False,
    None,
    "",
    "gelu",
    "silu",
    "minimind2",
    "minimind3",
    "k>1",
    "never",
    "interleaved",
    "yarn",
    [],
    {},
    {"factor": 4, "type": "yarn"},
    {"factor": True},
    {"x": 1},
]
TENSOR_VALUES = [
    None,
    "",
    "float32",
    "float16",
    "float64",
    "int32",
    "int64",
    "uint8",
    "sidecar",
    "base64",
    "bfloat16",
    "q8_0",
    [],
    [0],
    [2, 4],
    [64, 32],
    [4, 2],
    [-1, 4],
    [2**62, 4],
    [2.0, 4],
    [True, 4],
    1,
    {},
]


def _systematic_mutants(seeds, folder: Path) -> list[Path]:
    """Every config field, and every field of one tensor per section, set to every awkward value:
    the targeted half of the differential (random mutation rarely hits one field with one value)."""
    out = []
    for path, doc, side in seeds:
        edits = [
            ("config", key, value)
            for key in list(doc["config"]) + ["n_routed_experts", "norm_topk_prob"]
            for value in CONFIG_VALUES
        ]
        tensors = [("inputs", "input_ids"), ("rope", "cos")]
        if "format_version" in doc:  # the first weight (reduced in a bf16/q8 file when tied) and a norm (never)
            tensors += [("weights", next(iter(doc["weights"]))), ("weights", "model.norm.weight")]
        else:
            tensors.append(("weights", "final_rms"))
        edits += [
            (section, name, field, value)
            for section, name in tensors
            for field in ("shape", "dtype", "encoding")
            for value in TENSOR_VALUES
        ]
        if side is not None:
            edits += [("sidecar", key, value) for key in ("file", "format", "bytes", "x") for value in CONFIG_VALUES]
        edits += [(None, "weight_format", value) for value in CONFIG_VALUES + ["f32", "bf16", "q8", "BF16", "q8_0"]]
        for edit in edits:
            mutant = json.loads(json.dumps(doc))
            target = mutant if edit[0] is None else mutant[edit[0]] if len(edit) == 3 else mutant[edit[0]][edit[1]]
            target[edit[-2]] = edit[-1]
            case = folder / f"{len(out):06d}"
            case.mkdir(parents=True)
            (case / "m.json").write_text(json.dumps(mutant))
            if side is not None:
                (case / doc_sidecar_name(path)).write_bytes(side)
            out.append(case / "m.json")
    return out


def test_every_field_with_every_awkward_value_agrees(seeds, sanitized_binary, tmp_path):
    files = _systematic_mutants(seeds, tmp_path)
    verdicts = {str(f): python_verdict(f) for f in files}
    differential(sanitized_binary, files, verdicts)


def test_the_seed_corpus_loads_in_both_readers(seeds, sanitized_binary):
    files = [path for path, _, _ in seeds]
    differential(sanitized_binary, files, {str(f): ("ok", "") for f in files})


def test_regressions_keep_their_verdict(sanitized_binary):
    cases = sorted(p for p in REGRESSIONS.iterdir() if p.is_dir()) if REGRESSIONS.is_dir() else []
    for case in cases:
        expect = (case / "EXPECT").read_text().strip()
        assert python_verdict(case / "m.json")[0] == expect, case.name
    if cases:
        differential(
            sanitized_binary,
            [c / "m.json" for c in cases],
            {str(c / "m.json"): ((c / "EXPECT").read_text().strip(), "") for c in cases},
        )


@pytest.mark.fuzz_long
def test_long_fuzz(seeds, sanitized_binary, tmp_path):
    """FUZZ_SECONDS (default 1800) of mutants in rounds of 500, each round checked against C++."""
    end = time.monotonic() + float(os.environ.get("FUZZ_SECONDS", 1800))
    total = 0
    while time.monotonic() < end:
        folder = tmp_path / f"round{total // 500}"
        verdicts = fuzz(seeds, folder, examples=500)
        differential(sanitized_binary, [Path(f) for f in verdicts], verdicts)
        total += len(verdicts)
        shutil.rmtree(folder)
    print(f"{total} mutants, both readers agreed on every one")
