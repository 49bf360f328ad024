"""Zero cost when not tracing: an untraced forward allocates nothing (cpp/tests/alloc_count.cpp).

alloc_count replaces every global operator new/delete with a counting version, and for each
registered kernel set and model case (dense, q/k norm, MoE with a shared expert) counts the
operator new calls of an untraced prefill and of untraced decode steps over a KV cache, after a
warm-up. A traced forward must allocate (names, shapes, copies): that proves the counter counts.
"""

import os
import re
import subprocess

import pytest

from celerinfer_lab.native import DEFAULT_CPP_DIR

CASES = ("dense", "qk_norm", "moe")


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def alloc_count(tmp_path_factory):
    """Configure and build the alloc_count target (as build_standalone builds base_line_micro)."""
    build = tmp_path_factory.mktemp("alloc_build")
    _run(["cmake", "-S", str(DEFAULT_CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "--target", "alloc_count", "-j", str(os.cpu_count() or 1)])
    return build / "alloc_count"


def test_untraced_forward_allocates_nothing(alloc_count):
    result = subprocess.run([str(alloc_count)], capture_output=True, text=True, timeout=300)
    out = result.stdout
    counts = {
        (s, c, what): int(n)
        for s, c, what, n in re.findall(r"^(\S+) (\S+) (prefill|decode|traced) allocations=(\d+)", out, re.M)
    }
    sets = sorted({s for s, _, _ in counts})
    assert {"readable", "fast"} <= set(sets), out
    for kernel_set in sets:
        for case in CASES:
            assert counts[(kernel_set, case, "prefill")] == 0, f"{kernel_set} {case}: untraced prefill allocates\n{out}"
            assert counts[(kernel_set, case, "decode")] == 0, f"{kernel_set} {case}: untraced decode allocates\n{out}"
            # not vacuous: the same counter sees a traced forward's allocations
            assert counts[(kernel_set, case, "traced")] > 0, f"{kernel_set} {case}: the counter counted nothing\n{out}"
    assert result.returncode == 0 and out.rstrip().endswith("OK"), f"exit {result.returncode}\n{out}\n{result.stderr}"
