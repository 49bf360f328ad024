"""The fused attention stays inside its buffers (cpp/tests/attention_bounds.cpp, AddressSanitizer).

Both attention paths read a value row's partial last vector whole, up to 15 floats past the value
cache's end (the workspace's guard tail is that room). Python-side tests cannot see a read past a
buffer: the workspace's buffers come from a huge-page arena and the guard check sees only writes.
So the C++ runs the kernel on exact-size heap buffers over a grid of shapes (both attention paths,
head_dim 1 to 130, 1 to 40 new tokens after 0 to 40 cached, GQA, padding) under ASan, against a
float64 oracle: clean with 15 floats of slack, stopped by ASan with 14 (the documented bound is
tight, and the test can fail).
"""

import os
import subprocess

import pytest

from celerinfer_lab.native import DEFAULT_CPP_DIR


@pytest.fixture(scope="module")
def attention_bounds(tmp_path_factory):
    build = tmp_path_factory.mktemp("attention_bounds_build")
    for cmd in (
        ["cmake", "-S", str(DEFAULT_CPP_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build), "--target", "attention_bounds", "-j", str(os.cpu_count() or 1)],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return build / "attention_bounds"


def test_the_fused_attention_reads_and_writes_inside_its_buffers(attention_bounds):
    result = subprocess.run([str(attention_bounds), "15"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1920 cases, 0 failures" in result.stdout


def test_one_float_less_of_slack_is_an_out_of_bounds_read(attention_bounds):
    result = subprocess.run([str(attention_bounds), "14"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "AddressSanitizer" in result.stderr and "READ of size" in result.stderr, result.stderr[-3000:]
