"""tests/parallel.py: the suite's rules on two workers, checked on a small session of its own."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from parallel import LAST, LONG_FIRST, SHARED, unit_of

CONFTEST = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from parallel import (
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_protocol,
    pytest_unconfigure,
    pytest_xdist_make_scheduler,
)
"""

# Each test logs its worker and when it ran; test_b's exclusive test sleeps longest.
TEST_FILE = """
import os, time, pytest

def log(name, start):
    with open(os.environ["LOG"], "a") as f:
        f.write(f"{{name}} {{os.environ['PYTEST_XDIST_WORKER']}} {{start}} {{time.time()}}\\n")

@pytest.mark.parametrize("i", range(8))
def test_short(i):
    start = time.time()
    time.sleep(0.2)
    log("{name}", start)
{extra}
"""
EXCLUSIVE = """
@pytest.mark.exclusive
def test_alone():
    start = time.time()
    time.sleep(1.0)
    log("alone", start)
"""


def test_files_stay_whole_and_an_exclusive_test_runs_alone(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_a.py").write_text(TEST_FILE.format(name="a", extra=""))
    (tmp_path / "test_b.py").write_text(TEST_FILE.format(name="b", extra=EXCLUSIVE))
    (tmp_path / "test_c.py").write_text(TEST_FILE.format(name="c", extra=""))
    log = tmp_path / "log"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "LOG": str(log)},
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) == 25
    workers = {name: {w for n, w, *_ in rows if n == name} for name in ("a", "b", "c")}
    assert all(len(w) == 1 for w in workers.values()), workers  # each file on one worker
    assert len({w for _, w, *_ in rows}) == 2, "both workers ran tests"
    (alone,) = [row for row in rows if row[0] == "alone"]
    start, end = float(alone[2]), float(alone[3])
    overlapping = [row[0] for row in rows if row is not alone and float(row[2]) < end and float(row[3]) > start]
    assert overlapping == [], f"ran beside the exclusive test: {overlapping}"


def test_files_with_exclusive_tests_run_last():
    """An exclusive test anywhere else would wait for whatever the other worker runs (minutes, for the README's blocks)."""
    files = [p for p in (REPO / "tests").glob("test_*.py") if p.name != "test_parallel.py"]  # not its own sample
    marked = {p.name for p in files if "pytest.mark.exclusive" in p.read_text()}
    assert marked and marked <= set(LAST), marked - set(LAST)
    assert not set(LONG_FIRST) & set(LAST)


def test_units_of_work():
    assert unit_of("tests/test_fuzz.py::test_x[1]") == unit_of("tests/test_cpp_fuzz.py::test_y") == "builds"
    assert unit_of("tests/test_native.py::test_x") == "tests/test_native.py"
    assert all(len(set(files)) == len(files) for files in SHARED.values())
