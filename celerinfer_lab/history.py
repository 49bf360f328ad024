"""The benchmark history: each ``bench --save`` appends one result to a SQLite file (stdlib sqlite3),
with what it ran on and every timed sample per figure, so ``bench-compare`` can test a change
against yesterday's numbers and ``bench-history`` can print the README's table from saved runs.

    meta     key -> value: "app" (this file is ours) and "schema_version" (SCHEMA_VERSION)
    results  one row per saved bench: id, UTC time, git commit and dirty flag, the machine's
             fingerprint id and fields (fingerprint.py), library versions, the parameters that
             make two results comparable (``params``; see bench_params), and the bench JSON itself
    samples  one row per (result, figure): every timed sample in milliseconds, as a JSON list

Comparing (regression.py) is kept apart from storing: this module reads and writes, never judges.
A file that is not SQLite, a SQLite file of some other program, or a store of another schema
version is a HistoryError naming the file; nothing here raises sqlite3's own exceptions."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Iterator

from .errors import HistoryError
from .fingerprint import machine_fingerprint
from .paths import REPO_ROOT, data_dir

if TYPE_CHECKING:  # the store reads and writes plain data; pandas loads only in table()
    import pandas as pd

APP = "celerinfer-lab bench history"
SCHEMA_VERSION = 1
STORE_ENV = "CELERINFER_LAB_BENCH_STORE"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL,
    git_commit TEXT,
    dirty INTEGER,
    fingerprint TEXT NOT NULL,
    machine TEXT NOT NULL,
    versions TEXT NOT NULL,
    params TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE samples (
    result_id INTEGER NOT NULL REFERENCES results(id),
    figure TEXT NOT NULL,
    samples_ms TEXT NOT NULL,
    PRIMARY KEY (result_id, figure)
);
"""


def default_store() -> Path:
    """$CELERINFER_LAB_BENCH_STORE, else bench_history.sqlite in the data folder (paths.data_dir)."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else data_dir() / "bench_history.sqlite"


def bench_params(record: dict) -> dict:
    """What must be equal for two results to be compared: the model's shape (its whole config), the
    batch, sequence length, kernel sets, KV cache format, decode length and both sides' threads."""
    machine = record.get("machine", {})
    return {
        "config": record["config"],
        "batch": record["batch"],
        "seq_len": record["seq_len"],
        "kernels": record["kernels"],
        "kv_cache": record.get("kv_cache", "f32"),
        "decode_tokens": record.get("decode_tokens", 0),
        "torch_threads": machine.get("torch_threads"),
        "cpp_threads": machine.get("cpp_threads"),
    }


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """A command's first line of output, or None when it cannot run or fails."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(repo: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the package runs from; (None, None) outside a git checkout."""
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if commit is None:
        return None, None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    return commit, bool(status)


def library_versions() -> dict[str, str | None]:
    """torch, numpy, cppyy (and its cling) and the C++ compiler base_line_micro is built with."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("torch", "numpy", "cppyy", "cppyy-cling", "scipy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    line = _run(["c++", "--version"])
    versions["compiler"] = line.splitlines()[0] if line else None
    return versions


@dataclass
class SavedResult:
    """One saved bench: its id, provenance, parameters, the bench JSON and every sample per figure."""

    id: int
    timestamp: str  # ISO 8601, UTC
    commit: str | None
    dirty: bool | None
    fingerprint: str  # the machine's id (fingerprint.py)
    machine: dict  # the fingerprint's fields
    versions: dict
    params: dict
    record: dict
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def short_commit(self) -> str:
        if self.commit is None:
            return "no git"
        return self.commit[:9] + ("+dirty" if self.dirty else "")

    @property
    def workload(self) -> str:
        """The parameters in a few words: "127,296 params h64 L2, batch 2 x seq 5, decode 8, threads 1"."""
        p, c = self.params, self.params["config"]
        text = (
            f"{self.record.get('parameters', 0):,} params h{c.get('hidden_size')} L{c.get('num_hidden_layers')}, "
            f"batch {p['batch']} x seq {p['seq_len']}"
        )
        if p.get("decode_tokens"):
            text += f", decode {p['decode_tokens']}"
        if p.get("kv_cache", "f32") != "f32":
            text += f", {p['kv_cache']} KV cache"
        return text + f", threads {p.get('cpp_threads')}"


class BenchStore:
    """The SQLite file of saved benches. ``BenchStore(path)`` opens an existing store (HistoryError
    when the file is missing, not SQLite, not ours or of another schema); ``create=True`` also makes
    a new one (and its folder). Every call opens and closes its own connection."""

    def __init__(self, path: str | Path | None = None, create: bool = False):
        self.path = Path(path) if path is not None else default_store()
        if not self.path.exists():
            if not create:
                raise HistoryError(f"{self.path}: no benchmark store here (save one with `bench --save`)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("app", APP), ("schema_version", str(SCHEMA_VERSION))]
                )
        self._check()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success; any sqlite3 error becomes a HistoryError naming the file."""
        try:
            db = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise HistoryError(f"{self.path}: cannot open the benchmark store ({exc})") from None
        try:
            with db:
                yield db
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"{self.path}: not a readable benchmark store ({exc})") from None
        finally:
            db.close()

    def _check(self) -> None:
        """The file is SQLite, ours, and of this schema version."""
        with self._connect() as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" not in tables:
                raise HistoryError(
                    f"{self.path}: an SQLite file but not a celerinfer-lab benchmark store (no meta table)"
                )
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("app") != APP:
            raise HistoryError(
                f"{self.path}: not a celerinfer-lab benchmark store (its meta says app={meta.get('app')!r})"
            )
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise HistoryError(
                f"{self.path}: benchmark store schema version {meta.get('schema_version')!r}; this celerinfer-lab "
                f"reads version {SCHEMA_VERSION} (save to a new store with --store)"
            )
        missing = {"results", "samples"} - tables
        if missing:
            raise HistoryError(f"{self.path}: benchmark store without its table(s) {', '.join(sorted(missing))}")

    def save(
        self,
        record: dict,
        samples: dict[str, list[float]],
        commit: str | None = None,
        dirty: bool | None = None,
        versions: dict | None = None,
        machine: dict | None = None,
        timestamp: str | None = None,
    ) -> int:
        """Append one result; its id. The provenance not given is read here (git_state of this
        checkout, library_versions, machine_fingerprint, the current UTC time)."""
        if not samples or any(not values for values in samples.values()):
            raise HistoryError("a result to save needs at least one sample for every figure")
        if commit is None and dirty is None:
            commit, dirty = git_state()
        machine = machine if machine is not None else machine_fingerprint()
        row = (
            timestamp or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            commit,
            None if dirty is None else int(dirty),
            machine["id"],
            json.dumps(machine),
            json.dumps(versions if versions is not None else library_versions()),
            json.dumps(bench_params(record), sort_keys=True),
            json.dumps(record, default=str),
        )
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO results (timestamp, git_commit, dirty, fingerprint, machine, versions, params, record) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            result_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO samples VALUES (?, ?, ?)",
                [(result_id, figure, json.dumps([float(v) for v in values])) for figure, values in samples.items()],
            )
        return result_id

    def _result(self, db: sqlite3.Connection, row: tuple, stored: list[tuple[str, str]] | None = None) -> SavedResult:
        """The result of a results row; ``stored``: its (figure, samples JSON) rows, when already read."""
        rid, timestamp, commit, dirty, fingerprint, machine, versions, params, record = row
        try:
            if stored is None:
                stored = db.execute(
                    "SELECT figure, samples_ms FROM samples WHERE result_id = ? ORDER BY rowid", (rid,)
                ).fetchall()
            samples = {figure: json.loads(values) for figure, values in stored}
            return SavedResult(
                rid,
                timestamp,
                commit,
                None if dirty is None else bool(dirty),
                fingerprint,
                json.loads(machine),
                json.loads(versions),
                json.loads(params),
                json.loads(record),
                samples,
            )
        except (json.JSONDecodeError, TypeError) as exc:
            raise HistoryError(f"{self.path}: result {rid} is damaged ({exc})") from None

    _COLUMNS = "id, timestamp, git_commit, dirty, fingerprint, machine, versions, params, record"

    def get(self, result_id: int) -> SavedResult:
        """The saved result ``result_id`` (HistoryError naming the ids there are when it is not)."""
        with self._connect() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM results WHERE id = ?", (result_id,)).fetchone()
            if row is None:
                ids = [r[0] for r in db.execute("SELECT id FROM results ORDER BY id")]
                there = f"ids {ids[0]}–{ids[-1]}" if ids else "no results yet"
                raise HistoryError(f"{self.path}: no result {result_id} ({there})")
            return self._result(db, row)

    def results(self) -> list[SavedResult]:
        """Every saved result, oldest first."""
        with self._connect() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM results ORDER BY id").fetchall()
            stored: dict[int, list[tuple[str, str]]] = {row[0]: [] for row in rows}
            for rid, figure, values in db.execute("SELECT result_id, figure, samples_ms FROM samples ORDER BY rowid"):
                stored.setdefault(rid, []).append((figure, values))  # every sample in one query, not one per result
            return [self._result(db, row, stored[row[0]]) for row in rows]

    def latest(self) -> SavedResult:
        """The newest saved result."""
        with self._connect() as db:
            row = db.execute(f"SELECT {self._COLUMNS} FROM results ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                raise HistoryError(f"{self.path}: no saved results yet (save one with `bench --save`)")
            return self._result(db, row)

    def table(self, figure: str | None = None) -> pd.DataFrame:
        """One row per (result, figure): id, time, commit, machine, workload, figure, the median,
        quartiles, min and max of its samples in ms, and their count (for plots.plot_history)."""
        import numpy as np
        import pandas as pd

        rows = []
        for r in self.results():
            for name, values in r.samples.items():
                if figure is not None and name != figure:
                    continue
                q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
                rows.append(
                    {
                        "id": r.id,
                        "timestamp": pd.Timestamp(r.timestamp),
                        "commit": r.short_commit,
                        "machine": r.fingerprint,
                        "workload": r.workload,
                        "figure": name,
                        "median_ms": median,
                        "q1_ms": q1,
                        "q3_ms": q3,
                        "min_ms": float(min(values)),
                        "max_ms": float(max(values)),
                        "runs": len(values),
                    }
                )
        return pd.DataFrame(rows)


def history_lines(results: list[SavedResult]) -> list[str]:
    """``bench-history``'s listing: one line per saved result."""
    lines = []
    for r in results:
        figures = ", ".join(f"{name} {median(values):.3g} ms" for name, values in r.samples.items())
        lines.append(
            f"#{r.id:<4d} {r.timestamp}  {r.short_commit:15s} machine {r.fingerprint} ({r.machine.get('cpu', '?')}, "
            f"{r.machine.get('cores', '?')} cores)\n      {r.workload}\n      {figures}"
        )
    return lines


def speed_table(results: list[SavedResult], latest_only: bool = True) -> str:
    """The README's speed table as markdown, from saved results: per workload (the newest result of
    each machine and parameters when ``latest_only``) one row per figure with its median, IQR, the
    rate (tokens/s), the number of samples, the commit and the machine."""
    import numpy as np

    chosen: dict[tuple[str, str], SavedResult] = {}
    for r in results:  # oldest first: a later result replaces an earlier one of the same group
        key = (r.fingerprint, json.dumps(r.params, sort_keys=True)) if latest_only else (str(r.id), "")
        chosen[key] = r
    lines = [
        "| workload | figure | median | IQR | rate | runs | commit | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in chosen.values():
        machine = f"{r.machine.get('cpu', '?')}, {r.machine.get('cores', '?')} cores ({r.fingerprint})"
        for name, values in r.samples.items():
            q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
            tokens = r.params["batch"] * (1 if "decode" in name else r.params["seq_len"])
            lines.append(
                f"| {r.workload} | {name} | {median:.4g} ms | {q1:.4g}–{q3:.4g} ms | {tokens * 1e3 / median:,.0f} tok/s "
                f"| {len(values)} | {r.short_commit} | {machine} |"
            )
    return "\n".join(lines)
