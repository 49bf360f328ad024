"""Every notebook runs top to bottom, is committed without outputs, and shows what it promises."""

import json
import shutil

import nbformat
import pytest
from conftest import REPO
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {  # words each notebook's outputs must contain
    "01_quickstart.ipynb": [
        "trace points:",
        "all 37 trace points agree",
        "PyTorch: median",
        "C++    : median",
        "application/vnd.jupyter.widget-view+json",
    ],
    "02_layer_debugging.ipynb": [
        "culprit (own error): model.layers.0.self_attn.scores",
        "GQA mapping wrong",
        "culprit (own error): model.layers.0.self_attn.rope_q",
        "image/png",
    ],
    "03_edit_and_reload.ipynb": [
        "agrees: True",
        "celerinfer_jit_",
        "culprit (own error): model.layers.0.input_layernorm",
        "did not compile",
        "still running",
    ],
    "04_benchmarks.ipynb": [
        "hidden 512",
        "speedup",
        "image/png",
        "Mann-Whitney U",
        "cpp prefill (fast)",
        "FMA peak",
        "sum of C++ per-op times",
        "decode: 8 steps",
    ],
    "05_your_own_kernels.ipynb": [
        "kernel sets: ['readable', 'fast', 'readable-bf16', 'readable-q8', 'bf16', 'q8', 'blocked']",
        "blocked agrees: True",
        "blocked   median",
        "culprit: model.layers.0.self_attn.q_proj",
        "16 rows, buggy blocked agrees: True",
        "image/png",
        "application/vnd.jupyter.widget-view+json",
    ],
    "06_real_model.ipynb": [
        "935,296 parameters",
        "round trip bit for bit: True",
        "trace points agree",
        "identical: True",
        "culprit: model.layers.0.attn_residual",
        "image/png",
        "935,296 parameters; fast kernels agree",  # the explorer on the model file
        "text row identical: True",
        "application/vnd.jupyter.widget-view+json",
    ],
    "07_precision.ipynb": [
        "precision cost (float32 model vs its q8 weights, both in the float64 reference)",
        "precision cost (float32 model vs its bf16 weights, both in the float64 reference)",
        "model.layers.3.mlp.down_proj",
        "image/png",
        "kernel correctness (weights: q8 (Q8_0), oracle: float64 on the decoded q8 weights)",
        "trace points agree",
        "culprit (own error): model.layers.0.self_attn.q_proj",  # the q8 fault, localized
    ],
    "08_campaign.ipynb": [
        "dashboard: http",
        "6 configs in",
        "failures: 0",
        "resumed: 6 skipped, 0 run",
        "image/png",
        "culprit model.layers.0.input_layernorm; shrunk from",
        "to 1 layer, hidden 8, batch 1 x 1",
        "reproduce: celerinfer-lab compare $WORK/buggy_failures/",
        "the written reproduction exits 1",
        "fast_attention_scale",
    ],
}


def test_there_are_eight_notebooks():
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "CELERINFER_LAB_DATA", str(tmp_path / "lab-data")
    )  # 04 measures the machine: not into the user's folder
    shutil.copy(path, tmp_path / path.name)
    book = nbformat.read(tmp_path / path.name, as_version=4)
    # The kernel's five channels over Unix sockets in tmp_path, not TCP ports picked free and bound a moment
    # later: on two test workers another test's kernel, Dask cluster or JupyterLab may bind one in between.
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    NotebookClient(book, timeout=300, km=kernel, resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = json.dumps([cell.get("outputs", []) for cell in book.cells])
    assert '"output_type": "error"' not in text
    for words in EXPECTED[path.name]:
        assert words in text, f"{path.name}: no {words!r} in the outputs"
