"""`celerinfer-lab machine`: the measured limits (machine.py, cpp/tools/machine_limits.cpp) and their cache.

The numbers are checked for sanity, never against a time bound (the machine is shared); the features
against what the kernel reports in /proc/cpuinfo; the cache by what is measured again and what is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celerinfer_lab import machine
from celerinfer_lab.errors import MachineError
from celerinfer_lab.fingerprint import cpu_flags

REPO = Path(__file__).resolve().parents[1]
# cpuid feature -> the /proc/cpuinfo flag Linux shows for it
LINUX_FLAGS = {
    "fma": "fma",
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_bf16": "avx512_bf16",
    "avx512_vnni": "avx512_vnni",
    "amx_tile": "amx_tile",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
}


def features_disagree(features: dict[str, bool], flags: set[str]) -> list[str]:
    """The features where cpuid (the tool's report) and the kernel's flags differ."""
    return [name for name, flag in LINUX_FLAGS.items() if features.get(name) != (flag in flags)]


def test_quick_measurement_is_sane(quick_limits):
    lim = quick_limits
    assert lim.quick and lim.cores == (os.cpu_count() or 1) and lim.threads == lim.cores
    assert lim.fma_gflops_1 > 1 and lim.fma_gflops_all > 1
    for figure in (lim.read_gbs_dram_1, lim.read_gbs_dram_all, lim.read_gbs_cache_1, lim.read_gbs_cache_all):
        assert 0.1 < figure < 10_000  # GB/s: a re-read the compiler hoisted out of the loop would give far more
    assert lim.read_gbs_cache_1 > lim.read_gbs_dram_1  # L2 against a buffer larger than L3
    assert "BLAS" in lim.blas and "ATen CPU capability" in lim.blas
    text = str(lim)
    assert "FMA peak" in text and "quick measurement" in text and lim.key in text


def test_features_are_cpuid_and_agree_with_the_kernel(quick_limits):
    assert set(quick_limits.features) == set(LINUX_FLAGS)
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert features_disagree(quick_limits.features, flags) == []
    # the companion: a CPU reported with one feature flipped is caught
    flipped = {**quick_limits.features, "avx2": not quick_limits.features["avx2"]}
    assert features_disagree(flipped, flags) == ["avx2"]


def test_cached_per_machine_and_refreshed_on_request(quick_limits, monkeypatch):
    calls = []

    def fake_measure(quick=False, threads=None, cpp_dir=None):
        calls.append(quick)
        return machine.MachineLimits.from_dict({**quick_limits.to_dict(), "quick": quick, "measured_at": "now"})

    monkeypatch.setattr(machine, "measure", fake_measure)
    assert machine.machine_limits(quick=True).measured_at == quick_limits.measured_at  # the cache, not a new run
    assert calls == []
    assert machine.machine_limits(quick=True, refresh=True).measured_at == "now"  # --refresh measures
    assert calls == [True]
    # a quick measurement never serves a full request
    assert machine.machine_limits().quick is False and calls == [True, False]
    assert machine.machine_limits().measured_at == "now" and calls == [True, False]  # now cached in full
    # another machine (another fingerprint) has another key, so it measures
    fp = {**machine.machine_fingerprint(), "memory_gib": 12345}
    monkeypatch.setattr(machine, "machine_fingerprint", lambda: fp)
    assert machine.cache_path() != machine.cache_path(quick_limits.key)
    machine.machine_limits()
    assert calls == [True, False, False]
    monkeypatch.undo()
    machine.machine_limits(refresh=True, quick=True)  # the session's cache: a real quick measurement again


def test_peak_between_one_and_all_threads(quick_limits):
    lim = machine.MachineLimits.from_dict(
        {**quick_limits.to_dict(), "threads": 4, "fma_gflops_1": 10.0, "fma_gflops_all": 40.0}
    )
    assert [lim.peak_gflops(t) for t in (1, 2, 4, 8)] == [10.0, 20.0, 40.0, 40.0]


def test_corrupt_cache_is_named(lab_data, quick_limits, tmp_path):
    path = machine.cache_path()
    good = path.read_text()
    try:
        path.write_text(json.dumps({"version": 1, "tool": machine.tool_digest(), "limits": {"cpu": 3}}))
        with pytest.raises(MachineError, match="unreadable cached machine limits.*--refresh"):
            machine.machine_limits()
        env = {**os.environ, "CELERINFER_LAB_DATA": str(lab_data)}
        cli = [sys.executable, "-m", "celerinfer_lab.cli", "machine"]
        result = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=REPO)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and str(path) in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        path.write_text(good)


def test_limits_of_another_tool_version_are_measured_again(lab_data, quick_limits, monkeypatch):
    path = machine.cache_path()
    good = path.read_text()
    try:
        stale = json.loads(good) | {"tool": "0123456789ab"}  # measured by another machine_limits.cpp
        path.write_text(json.dumps(stale))
        assert machine.read_cached(path) is None
        calls: list[bool] = []
        monkeypatch.setattr(machine, "measure", lambda quick=False: calls.append(quick) or quick_limits)
        machine.machine_limits(quick=True)
        assert calls == [True]  # measured again, not served from the stale file
        assert machine.read_cached(path) is not None  # and cached with this version's digest
    finally:
        path.write_text(good)


def test_cli_json(lab_data, quick_limits):
    env = {**os.environ, "CELERINFER_LAB_DATA": str(lab_data)}
    result = subprocess.run(
        [sys.executable, "-m", "celerinfer_lab.cli", "machine", "--quick", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    cached = machine.read_cached(machine.cache_path())
    assert data["key"] == quick_limits.key and data["measured_at"] == cached.measured_at  # from the cache


def test_no_compiler_is_named(lab_data, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(MachineError, match="no C\\+\\+ compiler: 'no-such-compiler-here'"):
        machine.build_tool()
