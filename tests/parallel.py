"""The suite on two workers (pytest-xdist: `bash scripts/test.sh` runs `-n 2 --dist loadfile`).

Most of the suite's time is one core's work: cling compiling the C++ (a third of it, ~200 compiles),
Python starting commands and notebooks. Two workers share the two cores. Four rules keep a
parallel run as trustworthy as a serial one:

- a test file runs whole on one worker, so its module fixtures and caches (test_faults' compiled
  faults, test_history's saved benches) are made once; files that share an expensive session fixture
  (SHARED) run on the same worker, so it is built once (`scheduler`: xdist's loadfile with SHARED's
  files as one unit);
- the longest files start first (LONG_FIRST), so the last file to finish is a short one, and the
  files with exclusive tests come last (LAST);
- OpenMP threads (torch's) wait passively (`prepare_workers`): spinning, they collapse beside the other
  worker's load;
- a test marked `exclusive` (it times something another worker's load would skew) runs while no other
  test runs. Every test holds a shared lock, an exclusive test the exclusive one: flock(2) on files in
  a folder the controller makes for the run. A turnstile lock in front of it stops the other worker
  from starting test after test while an exclusive test waits.

A plain `pytest` (no `-n`) runs the same tests in the same order, one at a time, without the locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

LOCKS_ENV = "CELERINFER_LAB_TEST_LOCKS"  # the run's lock folder, made by the controller for its workers

# Files that run as one unit of work on one worker.
SHARED = {
    # sanitized_binary (AddressSanitizer build, ~50 s) and standalone_binary (the g++ build of the benches)
    "builds": (
        "test_cpp_fuzz.py",
        "test_fuzz.py",
        "test_weight_formats.py",
        "test_config_mapping.py",
        "test_sidecar.py",
        "test_standalone.py",
    ),
    # The files with `exclusive` tests, with those that share their session fixtures (trained_small,
    # quick_limits). Run last: an exclusive test waits for the other worker's test in progress, which by
    # then is a short one (a first version waited up to 7 minutes for the README's blocks).
    "exclusive": (
        "test_threads_under_load.py",
        "test_history.py",
        "test_profile.py",
        "test_browser.py",
        "test_machine.py",
        "test_train.py",
        "test_widgets.py",
    ),
}
# The files that take longest (minutes: the README's blocks, the notebooks, the fuzzers) start first.
LONG_FIRST = ("test_readme.py", "test_notebooks.py", "test_cpp_fuzz.py", "test_faults.py", "test_cli.py")
LAST = SHARED["exclusive"]


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the SHARED group that holds its file."""
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1]
    return next((group for group, files in SHARED.items() if name in files), path)


def long_files_first(items: list[pytest.Item]) -> None:
    """A stable sort: each file keeps its own order. (--no-loadscope-reorder keeps it on the workers.)"""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if name in LONG_FIRST:
            return LONG_FIRST.index(name)
        return len(LONG_FIRST) + (1 + LAST.index(name) if name in LAST else 0)

    items.sort(key=rank)


def scheduler(config: pytest.Config, log):
    """xdist's loadfile, with SHARED's files as one unit. (Its own way to group, --dist loadgroup with
    xdist_group marks, suffixes node ids, which pytest 9.2 no longer lets a plugin do: it grouped nothing.)"""
    from xdist.scheduler import LoadFileScheduling

    class FileUnits(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return FileUnits(config, log)


def prepare_workers(config: pytest.Config) -> None:
    """On the controller of a parallel run, before it starts the workers (they inherit its environment):
    the folder of the run's locks, and OpenMP threads that sleep when they wait. torch's OpenMP threads
    spin at every barrier by default: with the other core busy, a spinning thread holds the core its
    partner needs. Measured: 40 training steps of the small model took 7.1 s alone, 77.5 s beside one
    busy process, 10.1 s with OMP_WAIT_POLICY=PASSIVE; in the first parallel run a notebook's training
    cell ran past nbclient's 300 s limit."""
    if getattr(config, "workerinput", None) is None and config.getoption("numprocesses", None):
        folder = tempfile.mkdtemp(prefix="celerinfer-lab-test-locks-")
        os.environ[LOCKS_ENV] = folder
        config.stash[_folder_key] = folder
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def remove_lock_folder(config: pytest.Config) -> None:
    folder = config.stash.get(_folder_key, None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(LOCKS_ENV, None)


_folder_key = pytest.StashKey[str]()
_files: dict[str, int] = {}  # lock name -> this worker's open descriptor (opened once, never unlinked while in use)


def _fd(name: str) -> int:
    if name not in _files:
        _files[name] = os.open(Path(os.environ[LOCKS_ENV]) / name, os.O_RDWR | os.O_CREAT, 0o600)
    return _files[name]


@contextlib.contextmanager
def machine_share(config: pytest.Config, exclusive: bool) -> Iterator[None]:
    """Hold the run's lock around one test: shared, or exclusive (see the module docstring). Only on a
    worker (config.workerinput): a pytest that a test starts inherits the variables, not the role."""
    if getattr(config, "workerinput", None) is None or LOCKS_ENV not in os.environ:
        yield
        return
    turnstile, tests = _fd("turnstile"), _fd("tests")
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    if not exclusive:
        fcntl.flock(turnstile, fcntl.LOCK_UN)  # only passed through: a waiting exclusive test holds it
    fcntl.flock(tests, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(tests, fcntl.LOCK_UN)
        if exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)


# ---- the hooks: tests/conftest.py imports them (so does test_parallel's own small session) --------
def pytest_configure(config: pytest.Config) -> None:
    prepare_workers(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    remove_lock_folder(config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    long_files_first(items)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    return scheduler(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item):
    with machine_share(item.config, exclusive=item.get_closest_marker("exclusive") is not None):
        return (yield)
