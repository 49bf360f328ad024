"""The package's imports point down (README "The picture"), and the light commands stay light.

(a) In a fresh interpreter, every module imports on its own, and ``generate --help`` loads none of
    torch, matplotlib, pandas, cppyy (the time it takes is printed, not asserted: the machine is shared).
(b) The import graph read from the source (every ``import``/``from`` of a celerinfer_lab module, at the
    top or inside a function) has no cycle, and every edge goes to the same layer or one below in LAYERS.
    Imports under ``if TYPE_CHECKING:`` are left out: they never run (a view names the Report type that
    imports it), and they may name only classes for annotations, which the runtime graph cannot see.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "celerinfer_lab"
HEAVY = ("torch", "matplotlib", "pandas", "cppyy", "ipywidgets")

# Bottom first. A module may import modules of its own layer (the graph stays acyclic) or of a lower one,
# never of a higher one.
LAYERS = [
    # the ground: errors, limits, the weight table, the weight codecs (bf16, Q8_0), the KV cache's rounding, config, the generate flags, the trace contract (and ForwardResult), where cpp/ is, torch's thread count put back
    [
        "errors",
        "limits",
        "schema",
        "flags",
        "config",
        "trace",
        "paths",
        "quantize",
        "kvcache",
        "fingerprint",
        "torch_threads",
    ],
    # model files and inputs: format, strict JSON, sidecar, writer, Model, reader, RoPE cache, random models,
    # checkpoints imported and exported (HF folders, MiniMind .pth);
    # the fault catalogue (source edits to a copy of cpp/); the C++ headers generated from Python tables
    [
        "modelformat",
        "strict_json",
        "sidecar",
        "writer",
        "modelfile",
        "reader",
        "rope",
        "generate",
        "checkpoint",
        "gguf_export",
        "faults",
        "cpp_tables",
        "tokenizer",
    ],
    # the engines: PyTorch reference, C++ through cppyy, the standalone C++ binary, llama.cpp (a GGUF
    # through llama-cpp-python); the machine's measured limits
    ["reference", "native", "standalone", "llama_cpp_engine", "machine"],
    # the comparison's numbers: the metrics and the tolerance rule as a value
    ["metrics", "tolerances"],
    # the views of a Report (text/table/HTML, figures): Report's methods call them, so they name the
    # Report type only for annotations (under TYPE_CHECKING, which never runs)
    ["rendering", "plots"],
    # the Report and how it is built from runs; the runs themselves (engines passed in)
    ["report", "runs"],
    # what reads a Report: the diagnosis; beside it, what a weight format costs (two reference runs, no Report)
    ["diagnose", "precision"],
    # compare: runs both forwards, builds the Report, diagnoses it
    ["compare"],
    # timing, the benchmark history (the store; judging two saved results), the per-op profile; text
    # generation on both sides with the first divergence compared; verification campaigns (many random
    # models, on Dask, failures shrunk)
    ["history", "regression", "bench", "complete", "train", "profile", "campaign"],
    # entry points: the command line, the notebook explorer, the package's lazy names; the hypothesis
    # strategies the tests and scripts/tolerance_margin.py share
    ["cli", "widgets", "text_panel", "__init__", "testing"],
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) without an else: code for the type checker only."""
    if not isinstance(node, ast.If) or node.orelse:
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, tree: ast.AST) -> set[str]:
    """The celerinfer_lab modules ``module`` imports, anywhere in its source ("__init__" for names
    taken from the package itself)."""
    modules = set(_modules())
    found: set[str] = set()

    def add(dotted: str, names: list[str]) -> None:
        parts = dotted.split(".") if dotted else []
        if parts and parts[0] == "celerinfer_lab":
            parts = parts[1:]
        if parts:
            found.add(parts[0])
        else:  # from the package: a submodule by name, or a name __init__ exports
            for name in names:
                found.add(name if name in modules else "__init__")

    type_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "celerinfer_lab" or alias.name.startswith("celerinfer_lab."):
                    add(alias.name, [])
                    if alias.name == "celerinfer_lab":
                        found.add("__init__")
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1:
                add(node.module or "", names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "celerinfer_lab":
                add(node.module, names)
            elif node.level > 1:
                pytest.fail(
                    f"{module}.py: `from {'.' * node.level}{node.module or ''} import ...` reaches outside the package"
                )
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {m: _imported(m, ast.parse((PACKAGE / f"{m}.py").read_text(), f"{m}.py")) for m in _modules()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m not in LAYER]
    assert not missing, (
        f"celerinfer_lab/{missing[0]}.py is in no layer: add it to LAYERS in tests/test_imports.py "
        f"(bottom first; a module may import only its own layer and those below)"
    )
    stale = [m for m in LAYER if m not in _modules()]
    assert not stale, f"LAYERS in tests/test_imports.py names modules that no longer exist: {stale}"


def test_imports_point_down_and_have_no_cycle():
    graph = import_graph()
    up = [
        f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if a in LAYER and b in LAYER and LAYER[b] > LAYER[a]
    ]
    assert not up, "imports that point up (move the thing imported down, or the importer up):\n" + "\n".join(up)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_reader_sees_imports_inside_functions():
    tree = ast.parse(
        textwrap.dedent("""
        from .config import ModelConfig
        def f():
            from . import plots
            import celerinfer_lab.native
            from celerinfer_lab import load_model
    """)
    )
    assert _imported("x", tree) == {"config", "plots", "native", "__init__"}
    typed = ast.parse(
        textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from .report import Report
        if TYPE_CHECKING:
            from .compare import Comparison
        else:
            from .runs import run_all
        def f():
            from .plots import plot
    """)
    )
    assert _imported("x", typed) == {"compare", "runs", "plots"}  # an if with an else runs: counted
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("module", _modules())
def test_each_module_imports_alone(module):
    name = "celerinfer_lab" if module == "__init__" else f"celerinfer_lab.{module}"
    _fresh(f"import {name}")


def test_generate_help_loads_no_heavy_library():
    out = _fresh(
        textwrap.dedent(f"""
        import contextlib, io, sys, time
        start = time.perf_counter()
        from celerinfer_lab import cli
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main(["generate", "--help"])
            except SystemExit:
                pass
        print(f"{{time.perf_counter() - start:.3f}}")
        print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    )
    elapsed, loaded = (out.splitlines() + [""])[:2]
    print(f"generate --help: {elapsed} s in-process (import + parse); heavy modules loaded: {loaded or 'none'}")
    assert not loaded, f"generate --help imported {loaded}"


def test_package_import_is_light_and_names_resolve():
    out = _fresh(
        textwrap.dedent(f"""
        import sys
        import celerinfer_lab as cl
        light = " ".join(m for m in {HEAVY!r} if m in sys.modules)
        from celerinfer_lab.compare import compare_decode  # the submodule first: cl.compare stays the function
        assert callable(cl.compare) and cl.compare is sys.modules["celerinfer_lab.compare"].compare
        for name in cl.__all__:
            assert getattr(cl, name) is not None, name
        assert set(cl.__all__) <= set(dir(cl))
        print(light)
    """)
    )
    assert not out.strip(), f"import celerinfer_lab loaded {out.strip()}"
