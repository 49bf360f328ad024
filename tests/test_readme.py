"""Every ```bash and ```python block of README.md and docs/*.md runs as written.

Map of this file:
- ``blocks(path)`` extracts a document's fenced blocks in order, with their line and marker;
- ``run_document`` runs one document's runnable blocks in order in a scratch folder that holds a
  copy of ``cpp/`` (so ``cmake -S cpp -B cpp/build`` builds there, not in the checkout): python
  blocks in one namespace per document (later blocks use names earlier ones define), bash blocks
  with ``bash -e`` (every command must succeed), both seeing the files earlier blocks wrote;
- the other tests check the markers and that the snippets import only the package's top level.

Markers: an HTML comment (invisible on GitHub) on the line right before the fence.
- ``<!-- long -->``: runs for minutes (benchmarks on presets); not run here.
- ``<!-- not run: REASON -->``: not runnable by nature (the set-up scripts, which tests/test_setup.py
  runs from a fresh clone; a command that starts a server).
Keep them few and honest: ``test_markers_are_few_and_known`` counts them. To add a block, write it
so it runs where it stands, after the blocks above it (generate the model it needs, or reuse one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = ("bash", "python")
MARKER = re.compile(r"^<!--\s*(long|not run:\s*(?P<reason>.+?))\s*-->\s*$")
MAX_MARKED = 7  # the set-up scripts' block, the notebook server twice (lab, jupyter lab), three benchmark blocks,
# building llama.cpp (the `llama` extra) with its bench


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # "long", "not run: ...", or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[i - 1].strip() if i > 0 else ""
        marker = MARKER.match(before)
        out.append(
            Block(
                path, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker.group(1) if marker else None
            )
        )
        i = end + 1
    return out


def scratch_folder(tmp: Path) -> Path:
    """A working folder with a copy of the C++ (builds land here) and nothing else of the checkout."""
    shutil.copytree(REPO / "cpp", tmp / "cpp", ignore=shutil.ignore_patterns("build*"))
    return tmp


def run_document(path: Path, tmp: Path, monkeypatch) -> dict:
    """Run the document's blocks in order; return the python namespace (for the type checks)."""
    folder = scratch_folder(tmp)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CELERINFER_LAB_DATA", str(tmp / "lab-data"))  # `machine` caches there, not in the user's folder
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks(path):
        if block.lang not in RUNNABLE or block.marker:
            continue
        start = time.perf_counter()
        if block.lang == "python":
            try:
                exec(compile(block.code, block.where, "exec"), namespace)  # tracebacks name README.md:LINE
            except Exception as exc:
                raise AssertionError(f"{block.where}: python block failed: {exc!r}\n{block.code}") from exc
        else:
            result = subprocess.run(
                ["bash", "-e", "-c", block.code], cwd=folder, capture_output=True, text=True, timeout=600
            )  # a server started by mistake fails instead of hanging
            assert result.returncode == 0, (
                f"{block.where}: bash block exited {result.returncode}\n{block.code}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        print(f"{block.where} ({block.lang}) ran in {time.perf_counter() - start:.1f} s")
    return namespace


def test_markers_are_few_and_known():
    marked = [b for path in DOCUMENTS for b in blocks(path) if b.marker]
    assert len(marked) <= MAX_MARKED, [b.where for b in marked]
    for b in marked:
        assert b.lang in RUNNABLE, f"{b.where}: a marker on a block that would not run anyway"
    for path in DOCUMENTS:  # a marker not right before a fence is a typo that would silently run the block
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("<!--") and ("long" in line or "not run" in line):
                assert MARKER.match(line.strip()) and i + 1 < len(lines) and lines[i + 1].startswith("```"), (
                    f"{path.name}:{i + 1}: write `<!-- long -->` or `<!-- not run: REASON -->` right before a fence"
                )


def test_snippets_import_only_the_package_top_level():
    """The snippets show the public API: names exported by celerinfer_lab, not its submodules."""
    import celerinfer_lab as cl

    for path in DOCUMENTS:
        for b in blocks(path):
            if b.lang != "python":
                continue
            assert not re.search(r"from celerinfer_lab\.\w+ import|import celerinfer_lab\.", b.code), (
                f"{b.where}: import from celerinfer_lab itself"
            )
            for names in re.findall(r"from celerinfer_lab import ([\w, ]+)", b.code):
                for name in names.split(","):
                    assert name.strip() in cl.__all__, f"{b.where}: {name.strip()} is not exported"
            for name in re.findall(r"\bcl\.(\w+)", b.code):
                assert name in cl.__all__, f"{b.where}: cl.{name} is not exported"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_block_runs_as_written(path, tmp_path, monkeypatch):
    namespace = run_document(path, tmp_path, monkeypatch)
    if path.name == "README.md":  # what the snippets get back is a type the package exports
        import celerinfer_lab as cl

        expected = {
            "native": cl.NativeEngine,
            "fast": cl.NativeModel,
            "result": cl.ForwardResult,
            "report": cl.Report,
            "both": cl.Comparison,
            "ref": cl.ReferenceModel,
            "model": cl.Model,
        }
        for name, kind in expected.items():
            assert isinstance(namespace.get(name), kind), f"README's `{name}` is {type(namespace.get(name))}"
        assert len(repr(namespace["report"])) < 200 and len(repr(namespace["both"])) < 200
