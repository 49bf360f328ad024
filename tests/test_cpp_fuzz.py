"""The C++ model-file reader (cpp/tools/model_file.hpp) against hostile files.

* a libFuzzer target (cpp/tests/fuzz_model_file.cpp, clang + ASan + UBSan) runs ~60 s on a seed
  corpus of real model files (the long run is marked fuzz_long: FUZZ_SECONDS, default 1800);
* every input in tests/fuzz_regressions/cpp/ replays through the fuzz target and through a
  sanitizer-built ``base_line_micro --check`` without a crash;
* each bug measured on the old reader (issue 11) is a refusal naming the field, with bounded
  memory and time;
* the C++ limits equal celerinfer_lab/limits.py.

A fuzz input is the JSON text, then optionally b"\\n#SIDECAR#\\n" and the sidecar's bytes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, fixtures_dir, start_sanitized_build
from readers import differential

from celerinfer_lab import ModelConfig
from celerinfer_lab.generate import generate_model
from celerinfer_lab.schema import v0_layer_names

CPP = REPO / "cpp"
REGRESSIONS = REPO / "tests" / "fuzz_regressions" / "cpp"
SEP = b"\n#SIDECAR#\n"
TINY = dict(
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=16,
    max_position_embeddings=8,
)
JOBS = "2"  # the machine is shared: never more

needs_clang = pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed (scripts/setup.sh)")


def _build(src: Path, build: Path, target: str, *options: str) -> Path:
    for cmd in (
        ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_CXX_COMPILER=clang++", *options],
        ["cmake", "--build", str(build), "--target", target, "-j", JOBS],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return build / target


@pytest.fixture(scope="session")
def fuzz_binary(tmp_path_factory):
    start_sanitized_build(tmp_path_factory)  # on the other core meanwhile (every fuzz test wants both)
    return _build(CPP, tmp_path_factory.mktemp("fuzz-build"), "fuzz_model_file", "-DCELERINFER_FUZZ=ON")


@pytest.fixture(scope="session")
def asan_binary(sanitized_binary):
    """base_line_micro under AddressSanitizer + UBSan (conftest.py builds it once)."""
    return sanitized_binary


@pytest.fixture(scope="session")
def plain_binary(standalone_binary):
    """base_line_micro without sanitizers (for memory limits: ASan reserves terabytes of address space)."""
    return standalone_binary


# ---- seeds -----------------------------------------------------------------------------------------
def _tiny(path: Path, sidecar: bool = False, weights: str = "f32", **overrides) -> Path:
    config = ModelConfig(**{**TINY, **overrides})
    generate_model(config, batch_size=1, seq_len=3, output=path, sidecar=sidecar, weights=weights)
    return path


def _sidecar_of(path: Path) -> Path:
    return path.parent / json.loads(path.read_text())["sidecar"]["file"]


V0_NAMES = v0_layer_names()  # original name -> name within model.layers.{i}, from the weight table


def _tiny_v0(path: Path) -> Path:
    """A small file in the original CelerInfer layout (the fixture is 750 KB)."""
    d = json.loads(_tiny(path).read_text())
    w = d["weights"]
    layers = [
        {old: w[f"model.layers.{i}.{new}"] for old, new in V0_NAMES.items()}
        for i in range(d["config"]["num_hidden_layers"])
    ]
    config = {k: v for k, v in d["config"].items() if k not in ("head_dim", "tie_word_embeddings")}
    doc = {
        "meta": {"seed": 1, "B": 1, "S": 3, "head_dim": d["config"]["head_dim"]},
        "config": config,
        "inputs": d["inputs"],
        "rope": d["rope"],
        "weights": {
            "tok_embedding": w["model.embed_tokens.weight"],
            "final_rms": w["model.norm.weight"],
            "lm_head": w["model.embed_tokens.weight"],
            "layers": layers,
        },
    }
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="session")
def seed_corpus(tmp_path_factory) -> Path:
    models, corpus = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("seeds")
    for name, overrides in {
        "dense": {},
        "qknorm_moe": dict(
            qk_norm=True, use_moe=True, num_experts=2, num_experts_per_tok=1, n_shared_experts=1, intermediate_size=16
        ),
        "untied": dict(tie_word_embeddings=False, rope_pairing="interleaved"),
    }.items():
        shutil.copy(_tiny(models / f"{name}.json", **overrides), corpus / name)
    side = _tiny(models / "side.json", sidecar=True)
    (corpus / "sidecar").write_bytes(side.read_bytes() + SEP + _sidecar_of(side).read_bytes())
    shutil.copy(_tiny(models / "bf16.json", weights="bf16"), corpus / "bf16")  # the weight formats (issue 14)
    q8 = _tiny(models / "q8.json", sidecar=True, weights="q8", tie_word_embeddings=False)
    (corpus / "q8_sidecar").write_bytes(q8.read_bytes() + SEP + _sidecar_of(q8).read_bytes())
    shutil.copy(_tiny_v0(models / "v0.json"), corpus / "v0_small")

    def minimind2(d):  # MiniMind2's MoE names, a float16 weight, a float64 RoPE cache, uint8 inputs
        d["config"].update(n_routed_experts=d["config"].pop("num_experts"), norm_topk_prob=True)
        d["config"].pop("topk_renorm")
        for t, dtype in (
            (d["weights"][W], np.float16),
            (d["rope"]["cos"], np.float64),
            (d["inputs"]["input_ids"], np.uint8),
        ):
            values = np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(t["dtype"]))
            t.update(dtype=np.dtype(dtype).name, data=base64.b64encode(values.astype(dtype).tobytes()).decode())

    moe = dict(use_moe=True, num_experts=2, num_experts_per_tok=2, intermediate_size=16)
    shutil.copy(_edit(_tiny(models / "mm2.json", **moe), minimind2), corpus / "minimind2_f16")
    shutil.copy(fixtures_dir() / "celerinfer-v0" / "minimind.json", corpus / "minimind_v0")
    return corpus


# ---- fuzzing -------------------------------------------------------------------------------------------
def _fuzz(binary: Path, seeds: Path, work: Path, seconds: int) -> str:
    corpus, artifacts = work / "corpus", work / "artifacts"
    shutil.copytree(seeds, corpus)
    artifacts.mkdir()
    cmd = [
        str(binary),
        f"-max_total_time={seconds}",
        "-timeout=20",
        "-malloc_limit_mb=512",
        "-rss_limit_mb=4096",
        f"-dict={CPP / 'tests' / 'fuzz_model_file.dict'}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600, cwd=work)
    found = sorted(p.name for p in artifacts.iterdir())
    assert r.returncode == 0 and not found, f"fuzzer exit {r.returncode}, artifacts {found}:\n{r.stderr[-6000:]}"
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
    print(f"fuzz_model_file: {runs.group(1) if runs else '?'} executions in {seconds} s, no crash")
    return r.stderr


def _corpus_differential(binary: Path, work: Path) -> None:
    """The inputs libFuzzer kept (each reached new code in the C++ reader), as files: Python's
    load_model must give each the verdict the C++ reader gives."""
    files = [_unpack(p.read_bytes(), work / "unpacked" / p.name) for p in sorted((work / "corpus").iterdir())]
    refused = differential(binary, files)
    print(f"corpus differential: {len(files)} files, {refused} refused by both, the rest accepted by both")


@needs_clang
def test_fuzz_model_file(fuzz_binary, seed_corpus, tmp_path, sanitized_binary):
    _fuzz(fuzz_binary, seed_corpus, tmp_path, 60)
    _corpus_differential(sanitized_binary, tmp_path)


@needs_clang
@pytest.mark.fuzz_long
def test_fuzz_model_file_long(fuzz_binary, seed_corpus, tmp_path, sanitized_binary):
    _fuzz(fuzz_binary, seed_corpus, tmp_path, int(os.environ.get("FUZZ_SECONDS", "1800")))
    _corpus_differential(sanitized_binary, tmp_path)


def test_seed_files_load(plain_binary, seed_corpus, tmp_path):
    """Every seed is a model file both readers accept (so the fuzzer starts from valid files)."""
    files = []
    for seed in sorted(seed_corpus.iterdir()):
        files.append(_unpack(seed.read_bytes(), tmp_path / seed.name))
    r = subprocess.run([str(plain_binary), "--check", *map(str, files)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok\t") == len(files)


# ---- regressions ----------------------------------------------------------------------------------------
def _unpack(data: bytes, folder: Path) -> Path:
    """A fuzz input as files: model.json and, after the separator, the sidecar it names."""
    folder.mkdir(parents=True, exist_ok=True)
    text, sep, side = data.partition(SEP)
    model = folder / "model.json"
    model.write_bytes(text)
    if sep:
        name = "model.safetensors"
        try:
            info = json.loads(text).get("sidecar")
            if isinstance(info, dict) and isinstance(info.get("file"), str):
                name = info["file"]
        except (ValueError, RecursionError, AttributeError):
            pass
        if name and name not in (".", "..") and "/" not in name and "\0" not in name and name != "model.json":
            (folder / name).write_bytes(side)
    return model


def _assert_no_crash(r: subprocess.CompletedProcess) -> None:
    report = r.stderr
    assert r.returncode in (0, 2), f"exit {r.returncode}:\n{report[-4000:]}"
    assert "Sanitizer" not in report and "runtime error" not in report, report[-4000:]


def _regression_inputs() -> list[Path]:
    return (
        sorted(p for p in REGRESSIONS.iterdir() if p.is_file() and p.name != "README.md")
        if REGRESSIONS.is_dir()
        else []
    )


@needs_clang
@pytest.mark.parametrize("case", _regression_inputs(), ids=lambda p: p.name)
def test_regression_replays(asan_binary, fuzz_binary, case, tmp_path):
    r = subprocess.run([str(fuzz_binary), str(case)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    model = _unpack(case.read_bytes(), tmp_path)
    for flags in ([], ["--allow-nonfinite"]):
        r = subprocess.run(
            [str(asan_binary), *flags, "--check", str(model)], capture_output=True, text=True, timeout=300
        )
        _assert_no_crash(r)


def test_regressions_are_documented():
    readme = (REGRESSIONS / "README.md").read_text()
    for case in _regression_inputs():
        assert case.name in readme, f"{case.name} has no line in {REGRESSIONS / 'README.md'}"


# ---- the bugs measured on the old reader (issue 11) -------------------------------------------------------------
def _edit(path: Path, edit) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def _edit_header(side: Path, edit) -> None:
    """Rewrite a safetensors header (padded to a multiple of 8), keeping the data section."""
    raw = side.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    side.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _set_floats(tensor: dict, values: np.ndarray) -> None:
    tensor["data"] = base64.b64encode(np.ascontiguousarray(values, dtype=np.float32).tobytes()).decode()


def _check(binary: Path, path: Path, *flags: str, limit_mb: int | None = None):
    def limit():
        if limit_mb:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    start = time.monotonic()
    r = subprocess.run(
        [str(binary), *flags, "--check", str(path)], capture_output=True, text=True, timeout=120, preexec_fn=limit
    )
    return r, time.monotonic() - start


def _refused(binary: Path, path: Path, *expected: str, limit_mb: int | None = None) -> str:
    r, _ = _check(binary, path, limit_mb=limit_mb)
    _assert_no_crash(r)
    assert r.returncode == 2 and r.stdout.startswith("refused\t"), r.stdout + r.stderr
    for text in expected:
        assert text in r.stdout, f"{text!r} not in {r.stdout!r}"
    return r.stdout


W = "model.layers.0.self_attn.q_proj.weight"


def _first_entry(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


@pytest.mark.parametrize("case", ["wrapping", "negative", "overlap"])
@needs_clang
def test_sidecar_offsets(asan_binary, tmp_path, case):
    path = _tiny(tmp_path / "m.json", sidecar=True)

    def edit(header):
        first = _first_entry(header)
        start, end = header[first]["data_offsets"]
        if case == "wrapping":  # start + length wraps 2^64: the old bounds check passed modulo 2^64
            header[first]["data_offsets"] = [2**64 - 8, 2**64 - 8 + end - start]
        elif case == "negative":  # the old reader read header bytes as weights
            header[first]["data_offsets"] = [-8, -8 + end - start]
        else:  # the second tensor over the first
            second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
            s2, e2 = header[second]["data_offsets"]
            header[second]["data_offsets"] = [start, start + e2 - s2]

    _edit_header(_sidecar_of(path), edit)
    _edit(path, lambda d: d["sidecar"].pop("bytes"))  # the header changed size
    expected = {"wrapping": "data_offsets", "negative": "data_offsets", "overlap": "overlapping"}[case]
    _refused(asan_binary, path, "sidecar", expected)


@needs_clang
def test_deep_nesting_refused_while_parsing(asan_binary, tmp_path):
    path = tmp_path / "deep.json"
    depth = 130_000
    path.write_text('{"format":"celerinfer-lab","format_version":1,"meta":' + "[" * depth + "]" * depth + "}")
    _refused(asan_binary, path, "nested deeper than 32")
    side = _tiny(tmp_path / "s.json", sidecar=True)  # the sidecar header is parsed the same way
    raw = _sidecar_of(side).read_bytes()
    header = b'{"__metadata__":' + b"[" * depth + b"]" * depth + b"}"
    header += b" " * (-len(header) % 8)
    _sidecar_of(side).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + struct.unpack("<Q", raw[:8])[0] :])
    _edit(side, lambda d: d["sidecar"].pop("bytes"))
    _refused(asan_binary, side, "sidecar", "nested deeper than 32")


@pytest.mark.parametrize(
    "config,field",
    [
        (dict(num_hidden_layers=10**9), "num_hidden_layers=1000000000: above 1,024"),
        (dict(num_experts=10**6, use_moe=True), "num_experts=1000000: above 1,024"),
        # within every limit, but far more than a 5 KB file holds: refused by arithmetic, never enumerated
        (
            dict(
                num_hidden_layers=1024,
                hidden_size=65536,
                num_attention_heads=16,
                num_key_value_heads=16,
                use_moe=True,
                num_experts=1024,
                n_shared_experts=64,
                intermediate_size=1048576,
            ),
            "more than the file can hold",
        ),
    ],
)
def test_huge_config_refused_fast_in_bounded_memory(plain_binary, tmp_path, config, field):
    path = _tiny(tmp_path / "m.json")
    _edit(path, lambda d: (d["config"].update(config), d["weights"].clear(), d["rope"].clear()))
    assert path.stat().st_size < 5000
    r, seconds = _check(plain_binary, path, limit_mb=256)
    assert r.returncode == 2 and field in r.stdout, r.stdout + r.stderr
    assert seconds < 10


def _nan_in(section: str, key: str):
    def edit(d):
        t = d[section][key]
        values = np.frombuffer(base64.b64decode(t["data"]), dtype=np.float32).copy()
        values[1] = np.nan
        _set_floats(t, values)

    return edit


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: d["config"].update(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda d: d["config"].update(rms_norm_eps=-1e-5), "rms_norm_eps=-1e-05: must be a number > 0"),
        (lambda d: d["config"].update(hidden_size=2**32 + 8), "hidden_size=4294967304: above 65,536"),
        (lambda d: d["config"].update(qk_norm="yes"), "qk_norm='yes': must be true or false"),
        (lambda d: d["config"].update(num_hidden_layers=1.0), "num_hidden_layers=1.0: must be an integer"),
        (lambda d: d["config"].update(num_hidden_layers=True), "num_hidden_layers=true: must be an integer"),
        (_nan_in("weights", W), f"tensor '{W}': contains NaN or Inf"),
        (_nan_in("rope", "cos"), "tensor 'rope.cos': contains NaN or Inf"),
        (lambda d: d["inputs"]["input_ids"].update(dtype="float32"), "input_ids': has dtype float32"),
        (lambda d: d.update(format="something-else"), "format is 'something-else'"),
        (lambda d: d.update(format_version=1.0), "format_version 1.0 is not supported"),
        (
            lambda d: d["weights"][W].update(shape=[4, 8], dtype="float64"),
            "has shape [4, 8], the config implies [8, 8]",
        ),
        (lambda d: d["weights"][W].update(data=d["weights"][W]["data"][:-4] + "AA=A"), "not valid base64"),
        (lambda d: d["weights"].pop(W), f"missing tensor '{W}'"),
        (lambda d: d["weights"].update(extra=d["weights"][W]), "unexpected tensor 'extra'"),
        (
            lambda d: d["inputs"]["input_ids"].update(
                data=base64.b64encode(np.array([[0, 1, 99]], np.int32).tobytes()).decode()
            ),
            "input_ids[0,2] = 99 is outside the vocabulary [0, 16)",
        ),
    ],
)
@needs_clang
def test_refused_naming_the_field(asan_binary, tmp_path, edit, expected):
    _refused(asan_binary, _edit(_tiny(tmp_path / "m.json"), edit), expected)


@needs_clang
def test_duplicate_key_refused(asan_binary, tmp_path):
    path = _tiny(tmp_path / "m.json")
    text = path.read_text()
    path.write_text(text.replace('"hidden_size":8', '"hidden_size":8,"hidden_size":8', 1))
    _refused(asan_binary, path, "the key 'hidden_size' appears twice")


@needs_clang
def test_allow_nonfinite(asan_binary, tmp_path):
    path = _edit(_tiny(tmp_path / "m.json"), _nan_in("weights", W))
    _edit(path, _nan_in("rope", "sin"))
    r, _ = _check(asan_binary, path)
    assert r.returncode == 2 and "NaN" in r.stdout
    r, _ = _check(asan_binary, path, "--allow-nonfinite")
    _assert_no_crash(r)
    assert r.returncode == 0 and r.stdout == f"ok\t{path}\tweights f32\n", r.stdout + r.stderr


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["meta"].update(head_dim=2),  # meta.head_dim: only the original layout
        lambda d: d["config"].pop("intermediate_size"),  # derived from sizing_rule
        lambda d: d["config"].update(n_routed_experts=2, norm_topk_prob=True),  # MiniMind2 names (dense: unused)
        lambda d: d["weights"][W].update(
            dtype="float16",
            data=base64.b64encode(
                np.frombuffer(base64.b64decode(d["weights"][W]["data"]), np.float32).astype(np.float16).tobytes()
            ).decode(),
        ),
        lambda d: d["weights"][W].update(
            dtype="float64",
            data=base64.b64encode(
                np.frombuffer(base64.b64decode(d["weights"][W]["data"]), np.float32).astype(np.float64).tobytes()
            ).decode(),
        ),
    ],
)
@needs_clang
def test_accepted_variants(asan_binary, tmp_path, edit):
    path = _edit(_tiny(tmp_path / "m.json"), edit)
    r, _ = _check(asan_binary, path)
    _assert_no_crash(r)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_clang
def test_minimind2_moe_names(asan_binary, tmp_path):
    moe = dict(use_moe=True, num_experts=2, num_experts_per_tok=1, intermediate_size=16)
    path = _tiny(tmp_path / "m.json", **moe)
    _edit(
        path,
        lambda d: (
            d["config"].pop("num_experts"),
            d["config"].pop("topk_renorm"),
            d["config"].update(n_routed_experts=2, norm_topk_prob=True),
        ),
    )
    r, _ = _check(asan_binary, path)
    assert r.returncode == 0, r.stdout + r.stderr
    _edit(path, lambda d: d["config"].update(n_routed_experts=3))  # 3 experts: the file holds 2
    _refused(asan_binary, path, "mlp.experts.2")


@needs_clang
def test_original_layout(asan_binary, tmp_path):
    path = _tiny_v0(tmp_path / "v0.json")
    r, _ = _check(asan_binary, path)
    assert r.returncode == 0, r.stdout + r.stderr
    _edit(path, lambda d: d["weights"].update(lm_head=5))  # the old reader indexed it as an object
    _refused(asan_binary, path, "lm_head")
    path = _edit(_tiny_v0(tmp_path / "v0.json"), lambda d: d["weights"]["layers"].append({}))
    _refused(asan_binary, path, "weights.layers has 2 entries")


@needs_clang
def test_sidecar_layout(asan_binary, tmp_path):
    path = _tiny(tmp_path / "m.json", sidecar=True)
    r, _ = _check(asan_binary, path)
    assert r.returncode == 0, r.stdout + r.stderr
    for edit, expected in [
        (lambda d: d["sidecar"].update(file="../m.safetensors"), "plain file name"),
        (lambda d: d["sidecar"].update(bytes=d["sidecar"]["bytes"] + 1), "replaced or truncated"),
        (lambda d: d["sidecar"].update(format="npz"), "sidecar must be"),
        (lambda d: d["weights"][W].update(shape=[4, 16]), "has shape [4, 16], the config implies [8, 8]"),
        (lambda d: d["weights"][W].update(dtype="float16"), "needs dtype float32"),
    ]:
        p = _edit(_tiny(tmp_path / "e.json", sidecar=True), edit)
        _refused(asan_binary, p, expected)
    p = _tiny(tmp_path / "h.json", sidecar=True)  # the header's shape disagrees with the JSON's
    _edit_header(_sidecar_of(p), lambda h: h[W].update(shape=[4, 16]))
    _edit(p, lambda d: d["sidecar"].pop("bytes"))
    _refused(asan_binary, p, "the JSON says shape [8, 8], the sidecar holds [4, 16]")


# ---- limits ------------------------------------------------------------------------------------------------------
def test_limits_equal_python():
    text = (CPP / "tools" / "model_file_limits.hpp").read_text()
    cpp = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr int64_t (MAX_\w+) = (\d+);", text)}
    from celerinfer_lab import limits

    python = {name: getattr(limits, name) for name in dir(limits) if name.startswith("MAX_")}
    assert cpp == python
    assert len(cpp) == 10


# ---- exit codes ----------------------------------------------------------------------------------------------------
def test_exit_codes(plain_binary, tmp_path):
    good = _tiny(tmp_path / "good.json")
    bad = _edit(_tiny(tmp_path / "bad.json"), lambda d: d["config"].update(hidden_act="gelu"))
    r = subprocess.run([str(plain_binary), "--check", str(good), str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stdout.splitlines()
    assert lines[0] == f"ok\t{good}\tweights f32" and lines[1].startswith(
        f"refused\t{bad}\t{bad}: config: hidden_act='gelu'"
    )
    r = subprocess.run([str(plain_binary), str(bad), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "hidden_act='gelu'" in r.stderr
    r = subprocess.run(
        [str(plain_binary), str(tmp_path / "missing.json"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "no such file" in r.stderr
    for args in ([], ["--check"], ["--bogus", str(good), "out"], [str(good)]):
        r = subprocess.run([str(plain_binary), *args], capture_output=True, text=True)
        assert r.returncode == 2 and "usage" in r.stderr, args
    r = subprocess.run(
        [str(plain_binary), str(good), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "REPEAT": "1", "WARMUP": "0", "THREADS": "1"},
    )
    assert r.returncode == 0 and "forward: median" in r.stdout and (tmp_path / "out" / "logits_cpp.npy").exists()
    if os.path.exists("/dev/full"):  # cannot write the output: 1, not 2
        r = subprocess.run(
            f"{plain_binary} {good} {tmp_path / 'out'} > /dev/full",
            shell=True,
            capture_output=True,
            text=True,
            env={**os.environ, "REPEAT": "1", "WARMUP": "0", "THREADS": "1"},
        )
        assert r.returncode == 1, r.stderr
