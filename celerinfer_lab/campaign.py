"""Verification campaigns: many random models, each checked against the float64 oracle on every kernel
set, on this machine or a Dask cluster; every failing model shrunk to the smallest that fails the same way.

A campaign is a list of tasks, each a pure function of (seed, index, fault): ``draw_case(seed,
index)`` is a plain seeded numpy draw (the same case on any worker), the task generates the model,
runs compare (or compare_decode when the case decodes) for each kernel set and returns one row per
kernel set. Dask runs the tasks (``run_campaign``): a LocalCluster of worker processes by default,
or any scheduler; a task lost with its worker runs again elsewhere; rows are written to a parquet
file as they arrive, and a campaign given an existing file skips the rows it holds (resume).

    rows = run_campaign(CampaignSpec(configs=200, kernels=("fast", "readable")), out="results.parquet")
    print(summarize(rows).to_text())

Shrinking (``shrink``): a failing case is reduced greedily, one change at a time (fewer layers,
batch 1, no decode, a shorter sequence, features off, fewer heads, smaller sizes), each change
kept when the model still fails the same way: the same op kind at the culprit (the trace point
name without its layer) in the same phase (prefill or decode). The smallest is written as a model
file with the command that reproduces it (``celerinfer-lab compare FILE --kernels K ...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .config import ConfigError, ModelConfig
from .errors import UsageError
from .faults import CATALOGUE, FAULTS, why_it_cannot_show
from .generate import generate_model, random_inputs
from .metrics import FACTOR, MIN_FLOOR

if TYPE_CHECKING:
    import pandas as pd

    from .modelfile import Model
    from .native import NativeEngine
    from .report import Report

PADDINGS = ("none", "left", "right", "mixed")
# Awkward sizes on purpose: not multiples of the fast kernels' vector width or GEMM blocks.
HIDDEN = (8, 16, 20, 24, 32, 40, 48, 56, 64, 72, 96)
HEAD_DIM = (2, 4, 6, 8, 10, 12, 16, 18, 24, 32, 80)
INTERMEDIATE = (8, 16, 24, 40, 64, 72, 100, 136)
FEATURES = (  # the columns a row describes its model by (the report's pass rate per feature)
    "hidden",
    "layers",
    "heads",
    "kv_heads",
    "head_dim",
    "intermediate",
    "vocab",
    "qk_norm",
    "rope_pairing",
    "yarn",
    "moe",
    "experts",
    "top_k",
    "shared_experts",
    "topk_renorm",
    "tied",
    "batch",
    "seq_len",
    "padding",
    "decode",
    "weights",
)
KEY = ("seed", "index", "kernels", "fault")  # one row per key; a resumed campaign skips the keys it holds
MAX_SHRINK_RUNS = 120  # comparisons one shrink may spend


@dataclass(frozen=True)
class Case:
    """One drawn model, as data (JSON): the config's fields, the inputs, the decode length, the seed."""

    config: dict[str, Any]
    batch: int
    seq_len: int
    padding: str
    pad_lengths: tuple[int, ...]
    decode: int
    weights: str
    seed: int

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.config)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        pads = list(self.pad_lengths) if self.padding != "none" else None
        return random_inputs(self.model_config(), self.batch, self.seq_len, self.seed, self.padding, pads)

    def model(self) -> Model:
        pads = list(self.pad_lengths) if self.padding != "none" else None
        return generate_model(
            self.model_config(), self.batch, self.seq_len, self.seed, self.padding, pads, weights=self.weights
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Case:
        data = json.loads(text)
        data["pad_lengths"] = tuple(data["pad_lengths"])
        return cls(**data)

    def features(self) -> dict[str, Any]:
        c = self.config
        moe = bool(c.get("use_moe"))
        return {
            "hidden": c["hidden_size"],
            "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"],
            "kv_heads": c["num_key_value_heads"],
            "head_dim": c["head_dim"],
            "intermediate": c["intermediate_size"],
            "vocab": c["vocab_size"],
            "qk_norm": bool(c.get("qk_norm")),
            "rope_pairing": c.get("rope_pairing", "half"),
            "yarn": (c.get("rope_scaling") or {}).get("rule", "minimind") if c.get("inference_rope_scaling") else "off",
            "moe": moe,
            "experts": c.get("num_experts", 0) if moe else 0,
            "top_k": c.get("num_experts_per_tok", 0) if moe else 0,
            "shared_experts": c.get("n_shared_experts", 0) if moe else 0,
            "topk_renorm": c.get("topk_renorm", "always") if moe else "-",
            "tied": bool(c.get("tie_word_embeddings", True)),
            "batch": self.batch,
            "seq_len": self.seq_len,
            "padding": self.padding,
            "decode": self.decode,
            "weights": self.weights,
        }


def draw_case(seed: int, index: int, decode: int = 2) -> Case:
    """Case ``index`` of campaign ``seed``: a deterministic numpy draw over the supported space
    (awkward sizes, GQA ratios, head_dim independent of hidden, q/k norm, both RoPE pairings, YaRN under
    both rules, MoE with every renorm rule and shared experts, tied or untied, batch, padding modes,
    decode lengths 0..``decode``, float32/bf16/q8 stored weights)."""
    rng = np.random.default_rng([int(seed), int(index), 0xC0FFEE])

    def pick(options: Iterable[Any]) -> Any:
        options = list(options)
        return options[int(rng.integers(len(options)))]

    kv_heads, n_rep = pick((1, 2, 3, 4)), pick((1, 2, 4))
    head_dim = pick(HEAD_DIM[:-1]) if rng.random() < 0.9 else 80  # a big head now and then
    moe, yarn = bool(rng.random() < 0.35), bool(rng.random() < 0.3)
    experts = pick(range(1, 7))
    steps = int(rng.integers(0, decode + 1)) if decode > 0 and rng.random() < 0.5 else 0
    seq_len = pick(range(1, 34))
    config: dict[str, Any] = dict(
        hidden_size=pick(HIDDEN),
        num_hidden_layers=pick((1, 2, 3)),
        num_attention_heads=kv_heads * n_rep,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=pick(range(8, 161)),
        max_position_embeddings=seq_len + steps + pick((0, 1, 16)),
        intermediate_size=pick(INTERMEDIATE),
        rms_norm_eps=pick((1e-5, 1e-6)),
        rope_theta=pick((1e4, 1e6)),
        qk_norm=bool(rng.random() < 0.4),
        rope_pairing=pick(("half", "interleaved")),
        tie_word_embeddings=bool(rng.random() < 0.5),
    )
    if yarn:
        factor = pick((2.0, 4.0))
        scaling: dict[str, Any] = {"original_max_position_embeddings": pick((4, 8, 16)), "factor": factor}
        if rng.random() < 0.5:
            scaling.update(rule="transformers", attention_factor=pick((1.0, 1.1)))
        config.update(inference_rope_scaling=True, rope_scaling=scaling)
    if moe:
        config.update(
            use_moe=True,
            num_experts=experts,
            num_experts_per_tok=pick(range(1, min(3, experts) + 1)),
            n_shared_experts=pick((0, 0, 1, 2)),
            topk_renorm=pick(("always", "k>1", "never")),
            moe_intermediate_size=pick(INTERMEDIATE),
        )
    batch = pick((1, 1, 2, 3, 4))
    padding = pick(PADDINGS) if seq_len > 1 and rng.random() < 0.6 else "none"
    pads = tuple(int(rng.integers(0, seq_len)) if b else 0 for b in range(batch)) if padding != "none" else ()
    weights = pick(("f32",) * 6 + ("bf16", "q8"))
    return Case(config, batch, seq_len, padding, pads, steps, weights, int(rng.integers(0, 2**31)))


# ---- one task -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One kernel set's verdict on one model."""

    verdict: str  # pass | fail | error
    culprit: str = ""  # the culprit's trace point (else the first divergent one)
    step: int = 0  # the forward it shows in (0: the prefill)
    diagnosis: str = ""
    worst_ratio: float = 0.0  # the largest error / max(floor, MIN_FLOOR): divergent above FACTOR
    error: str = ""

    @property
    def signature(self) -> tuple[str, str, str]:
        """How it fails: verdict, the culprit's op kind (no layer), prefill or decode."""
        return (self.verdict, op_kind(self.culprit), "decode" if self.step else "prefill")


def op_kind(name: str) -> str:
    """``model.layers.3.self_attn.scores`` -> ``self_attn.scores``: the trace point without its layer."""
    return re.sub(r"^model\.layers\.\d+\.", "", name)


def _ratio(report: Report) -> float:
    worst = 0.0
    for p in report.points:
        if p.name.endswith("topk_idx"):
            continue
        for err, floor in ((p.rel_l2, p.floor), (p.own_rel_l2, p.own_floor)):
            if np.isfinite(err):
                worst = max(worst, float(err) / max(float(floor), MIN_FLOOR))
    return worst


def _outcome(reports: list[Report]) -> Outcome:
    worst = max(_ratio(r) for r in reports)
    for step, report in enumerate(reports):
        if not report.agrees:
            point = report.culprit or report.first_divergent
            name = point.name if point is not None else next(p.name for p in report.points if p.own_diverges)
            return Outcome("fail", name, step, report.diagnosis or "", worst)
    return Outcome("pass", worst_ratio=worst)


def judge(model: Model, engine: NativeEngine, kernels: str, decode: int = 0, kv_cache: str = "f32") -> Outcome:
    """One kernel set on one model: compare (the prefill), or compare_decode for ``decode`` steps."""
    from .compare import compare, compare_decode
    from .report import Report

    try:
        if decode:
            return _outcome(compare_decode(model, engine, steps=decode, kernels=kernels, kv_cache=kv_cache))
        report = compare(model, engine, kernels=kernels, precision="off", kv_cache=kv_cache)
        assert isinstance(report, Report)  # one kernel set: one Report
        return _outcome([report])
    except Exception as exc:  # a crash in the C++ or a broken trace is a finding, not the end of the campaign
        return Outcome("error", error=f"{type(exc).__name__}: {exc}"[:500])


_ENGINES: dict[tuple[str, str], NativeEngine] = {}


def engine_for(cpp_dir: str | None, fault: str | None = None, threads: int | None = None) -> NativeEngine:
    """The C++ compiled once per process, per (cpp_dir, fault): a Dask worker compiles each once."""
    from .native import load_native

    key = (str(Path(cpp_dir).resolve()) if cpp_dir else "", fault or "")
    if key not in _ENGINES:
        if threads:
            import torch

            torch.set_num_threads(threads)
        engine = load_native(cpp_dir, fault=fault)
        if threads:
            engine.set_threads(threads)
        _ENGINES[key] = engine
    return _ENGINES[key]


def applicable_faults(case: Case, kernels: Iterable[str], names: Iterable[str] | None = None) -> list[str]:
    """The catalogue faults that can show on ``case`` under ``kernels``: the settings they need (the
    catalogue's why_it_cannot_show), a kernel set they change, and a decode long enough for decode bugs."""
    kernels = set(kernels)
    config, (_, mask) = case.model_config(), case.inputs()
    out = []
    for fault in (FAULTS[n] for n in names) if names is not None else CATALOGUE:
        if not set(fault.kernels) & kernels or case.decode < fault.step:
            continue
        if not why_it_cannot_show(fault, config, mask, fault.kv_cache):
            out.append(fault.name)
    return out


def run_task(
    seed: int,
    index: int,
    kernels: tuple[str, ...],
    fault: str | None = None,
    decode: int = 2,
    cpp_dir: str | None = None,
    shrink: bool = True,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """The rows of one (seed, index, fault): one per kernel set (a fault: the sets it changes)."""
    start = time.perf_counter()
    case = draw_case(seed, index, decode)
    engine = engine_for(cpp_dir, fault, threads)
    compiled = time.perf_counter()
    spec = FAULTS[fault] if fault else None
    sets = [k for k in kernels if spec is None or k in spec.kernels]
    kv_cache = spec.kv_cache if spec else "f32"
    model = case.model()
    rows = []
    for name in sets:
        t0 = time.perf_counter()
        outcome = judge(model, engine, name, case.decode, kv_cache)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {
            "seed": seed,
            "index": index,
            "kernels": name,
            "fault": fault or "",
            "verdict": outcome.verdict,
            "culprit": outcome.culprit,
            "op": op_kind(outcome.culprit),
            "step": outcome.step,
            "diagnosis": outcome.diagnosis,
            "worst_ratio": outcome.worst_ratio,
            "margin": FACTOR / outcome.worst_ratio if outcome.worst_ratio > 0 else float("inf"),
            "error": outcome.error,
            "seconds": seconds,
            "compile_seconds": compiled - start,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            **case.features(),
            "case": case.to_json(),
            "cpp_dir": str(Path(cpp_dir).resolve()) if cpp_dir else "",
            "expected_culprit": spec.culprit if spec else "",
            "localized": None,
            "diagnosed": None,
            "shrunk": "",
            "shrunk_culprit": "",
            "shrink_runs": 0,
        }
        if spec is not None and outcome.verdict == "fail":
            row["localized"] = outcome.culprit == spec.culprit
            if spec.diagnosis:
                row["diagnosed"] = spec.diagnosis in outcome.diagnosis
        elif spec is not None:
            row["localized"] = False
        if shrink and outcome.verdict == "fail":
            small, small_outcome, runs = shrink_case(case, engine, name, outcome, kv_cache)
            row.update(shrunk=small.to_json(), shrunk_culprit=small_outcome.culprit, shrink_runs=runs)
        rows.append(row)
    for row in rows[1:]:  # the compile (once per worker process) is charged to the task's first row only
        row["compile_seconds"] = 0.0
    return rows


# ---- shrinking ------------------------------------------------------------------------------------


def _smaller(values: Iterable[int], now: int) -> list[int]:
    return sorted({v for v in values if v < now})


def _candidates(case: Case) -> Iterable[Case]:
    """Simpler cases, the biggest simplifications first (hypothesis's order: delete, then lower)."""
    c = case.config

    def with_config(**changes: Any) -> Case:
        return dataclasses.replace(case, config={**c, **changes})

    def with_inputs(batch: int, seq_len: int, padding: str, decode: int) -> Case:
        pads = tuple(min(p, seq_len - 1) for p in case.pad_lengths[:batch]) if padding != "none" else ()
        if padding != "none" and not any(pads):
            padding, pads = "none", ()
        return dataclasses.replace(case, batch=batch, seq_len=seq_len, padding=padding, pad_lengths=pads, decode=decode)

    layers = c["num_hidden_layers"]
    for n in range(1, layers):
        yield with_config(num_hidden_layers=n)
    if case.batch > 1:
        yield with_inputs(1, case.seq_len, case.padding, case.decode)
    for d in range(case.decode):
        yield with_inputs(case.batch, case.seq_len, case.padding, d)
    for s in sorted({1, 2, case.seq_len // 2, case.seq_len - 1} - {0}):
        if s < case.seq_len:
            yield with_inputs(case.batch, s, case.padding, case.decode)
    if case.padding != "none":
        yield with_inputs(case.batch, case.seq_len, "none", case.decode)
    if c.get("use_moe"):
        yield with_config(use_moe=False)
        if c.get("n_shared_experts"):
            yield with_config(n_shared_experts=0)
        for e in range(1, c["num_experts"]):
            yield with_config(num_experts=e, num_experts_per_tok=min(c["num_experts_per_tok"], e))
        if c["num_experts_per_tok"] > 1:
            yield with_config(num_experts_per_tok=1)
        for m in _smaller(INTERMEDIATE, c["moe_intermediate_size"]):
            yield with_config(moe_intermediate_size=m)
    if c.get("inference_rope_scaling"):
        yield with_config(inference_rope_scaling=False, rope_scaling=None)
    if c.get("qk_norm"):
        yield with_config(qk_norm=False)
    if not c.get("tie_word_embeddings", True):
        yield with_config(tie_word_embeddings=True)
    if c.get("rope_pairing", "half") != "half":
        yield with_config(rope_pairing="half")
    if case.weights != "f32":
        yield dataclasses.replace(case, weights="f32")
    kv, heads = c["num_key_value_heads"], c["num_attention_heads"]
    rep = heads // kv
    for k in range(1, kv):
        yield with_config(num_key_value_heads=k, num_attention_heads=k * rep)
    for r in range(1, rep):
        yield with_config(num_attention_heads=kv * r)
    for h in _smaller(HIDDEN, c["hidden_size"]):
        yield with_config(hidden_size=h)
    for i in _smaller(INTERMEDIATE, c["intermediate_size"]):
        yield with_config(intermediate_size=i)
    for d in _smaller(HEAD_DIM, c["head_dim"]):
        yield with_config(head_dim=d)
    for v in sorted({8, 16, c["vocab_size"] // 2}):
        if 8 <= v < c["vocab_size"]:
            yield with_config(vocab_size=v)
    max_pos = case.seq_len + case.decode
    if c["max_position_embeddings"] > max_pos:
        yield with_config(max_position_embeddings=max_pos)


def _valid(case: Case) -> bool:
    try:
        case.model_config().validate(seq_len=case.seq_len + case.decode)
        case.inputs()
    except ConfigError:
        return False
    return True


def shrink_case(
    case: Case, engine: NativeEngine, kernels: str, outcome: Outcome, kv_cache: str = "f32"
) -> tuple[Case, Outcome, int]:
    """The smallest case found that still fails as ``outcome`` does (same op kind, same phase): greedy,
    restarting from the first simplification kept. Returns it, its outcome and the comparisons spent."""
    runs = 0
    best, best_outcome = case, outcome
    progress = True
    while progress and runs < MAX_SHRINK_RUNS:
        progress = False
        for candidate in _candidates(best):
            if runs >= MAX_SHRINK_RUNS:
                break
            if not _valid(candidate):  # every candidate simplifies one thing: the loop ends
                continue
            runs += 1
            got = judge(candidate.model(), engine, kernels, candidate.decode, kv_cache)
            if got.signature == outcome.signature:
                best, best_outcome, progress = candidate, got, True
                break
    return best, best_outcome, runs


def repro_command(path: str | Path, kernels: str, cpp_dir: str = "", fault: str = "", decode: int = 0) -> str:
    """The command that reproduces a shrunk failure from its model file."""
    words = ["celerinfer-lab", "compare", str(path), "--kernels", kernels]
    if cpp_dir:
        words += ["--cpp-dir", cpp_dir]
    if fault:
        words += ["--fault", fault]
        kv = FAULTS[fault].kv_cache
        if kv != "f32":
            words += ["--kv-cache", kv]
    if decode:
        words += ["--decode", str(decode)]
    return shlex.join(words)


def write_reproduction(row: dict[str, Any], folder: str | Path) -> tuple[Path, str]:
    """The shrunk case of a failing row as a model file in ``folder``, and the command that reproduces it."""
    from .modelfile import save_model

    case = Case.from_json(row["shrunk"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"seed{row['seed']}-case{row['index']}-{row['kernels']}" + (f"-{row['fault']}" if row["fault"] else "")
    path = folder / f"{name}.json"
    save_model(case.model(), path)
    return path, repro_command(path, row["kernels"], row["cpp_dir"], row["fault"], case.decode)


# ---- the campaign ---------------------------------------------------------------------------------


@dataclass
class CampaignSpec:
    configs: int
    kernels: tuple[str, ...] = ("readable", "fast")
    faults: bool = False
    fault_names: tuple[str, ...] | None = None  # with faults: these (default: the whole catalogue)
    decode: int = 2
    seed: int = 0
    cpp_dir: str | None = None
    shrink: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.configs, int) and self.configs >= 1):
            raise UsageError(f"--configs {self.configs}: need at least 1 config")
        if not (isinstance(self.decode, int) and 0 <= self.decode <= 16):
            raise UsageError(f"--decode {self.decode}: the longest decode drawn, 0 to 16 steps")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UsageError(f"--seed {self.seed}: must be an integer >= 0")
        if not self.kernels:
            raise UsageError("--kernels is empty: name at least one kernel set")
        for name in self.fault_names or ():
            if name not in FAULTS:
                raise UsageError(f"unknown fault {name!r}; `celerinfer-lab compare --list-faults` lists them")
        if self.cpp_dir is not None and not Path(self.cpp_dir, "include", "celerinfer").is_dir():
            raise UsageError(f"--cpp-dir {self.cpp_dir}: no include/celerinfer folder there (a copy of cpp/)")

    def tasks(self) -> list[tuple[int, str | None]]:
        """(index, fault) pairs: every config; with faults, every catalogue fault on every config it applies to."""
        if not self.faults:
            return [(i, None) for i in range(self.configs)]
        out: list[tuple[int, str | None]] = []
        for i in range(self.configs):
            case = draw_case(self.seed, i, self.decode)
            out += [(i, name) for name in applicable_faults(case, self.kernels, self.fault_names)]
        return out

    def expected_rows(self, index: int, fault: str | None) -> list[tuple[int, int, str, str]]:
        sets = [k for k in self.kernels if fault is None or k in FAULTS[fault].kernels]
        return [(self.seed, index, k, fault or "") for k in sets]


def read_rows(path: str | Path) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such results file")
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise UsageError(f"{path}: not a campaign results file ({type(exc).__name__}: {exc})") from None


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Rewrite the results file atomically (a campaign killed mid-write leaves the previous file)."""
    import pandas as pd

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _done(rows: list[dict[str, Any]]) -> set[tuple[int, int, str, str]]:
    return {(int(r["seed"]), int(r["index"]), str(r["kernels"]), str(r["fault"] or "")) for r in rows}


@dataclass
class CampaignResult:
    rows: list[dict[str, Any]]
    ran: int  # tasks run now
    skipped: int  # tasks whose rows the output file already held
    seconds: float
    workers: int
    dashboard: str = ""
    reproductions: list[tuple[str, str]] = field(default_factory=list)  # (model file, command)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["verdict"] != "pass" and not r["fault"]]


def nanny_environment_keys() -> set[str]:
    """The environment variables Dask's nanny writes into the process that spawns its workers: the
    ``distributed.nanny.pre-spawn-environ`` settings, and PYTHONHASHSEED (distributed's nanny.py)."""
    import dask

    return set(dask.config.get("distributed.nanny.pre-spawn-environ") or {}) | {"PYTHONHASHSEED"}


def restore_environment(before: dict[str, str], keys: Iterable[str]) -> None:
    """Put ``keys`` of this process's environment back as ``before`` (a copy of os.environ) had them."""
    for key in keys:
        if key not in before:
            os.environ.pop(key, None)
        elif os.environ.get(key) != before[key]:
            os.environ[key] = before[key]


class LocalDask:
    """A Dask LocalCluster of ``workers`` single-threaded worker processes and a Client on it. close()
    (or leaving a ``with`` block) closes both and puts back what Dask wrote into this process's environment:
    Dask's nanny writes its ``distributed.nanny.pre-spawn-environ`` (OMP_NUM_THREADS=1,
    MKL_NUM_THREADS=1, ...) into the *calling* process's os.environ before it spawns a worker, and
    leaves it there (by design: dask/distributed#6681, #6749). Left, it ran every later subprocess of
    the session (a bench, a CLI training) with torch on one thread."""

    def __init__(self, workers: int, dashboard_address: str | None = ":0"):
        from dask.distributed import Client, LocalCluster

        self._environment = dict(os.environ)
        self.cluster: Any = None
        self.client: Any = None
        try:
            self.cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=dashboard_address
            )
            self.client = Client(self.cluster)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            restore_environment(self._environment, nanny_environment_keys())

    def __enter__(self) -> LocalDask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_campaign(
    spec: CampaignSpec,
    out: str | Path | None = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = print,
    connect_timeout: float = 10.0,
) -> CampaignResult:
    """Run ``spec``'s tasks on Dask: ``client`` (an existing distributed Client), else ``scheduler``
    (an address such as tcp://host:8786), else a LocalCluster of ``workers`` processes (default: one
    per core); ``workers=0`` runs in this process, without Dask. Rows already in ``out`` are kept and
    their tasks skipped; ``out`` is rewritten as rows arrive. ``on_result`` sees each task's rows.
    A scheduler that does not answer within ``connect_timeout`` seconds is a UsageError."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if out is not None and Path(out).exists():
        rows = read_rows(out).to_dict("records")
    done = _done(rows)
    todo = [t for t in spec.tasks() if not set(spec.expected_rows(*t)) <= done]
    skipped = len(spec.tasks()) - len(todo)
    if skipped:
        log(f"resuming from {out}: {skipped} tasks already there, {len(todo)} to run")
    folder = Path(out).with_name(Path(out).stem + "_failures") if out else Path("campaign_failures")
    result = CampaignResult(rows, len(todo), skipped, 0.0, 0)
    last_write = time.monotonic()

    def accept(new: list[dict[str, Any]]) -> None:
        nonlocal last_write
        for row in new:
            if row["shrunk"]:
                path, command = write_reproduction(row, folder)
                row["repro_file"], row["repro"] = str(path), command
                result.reproductions.append((str(path), command))
            else:
                row["repro_file"], row["repro"] = "", ""
        rows.extend(new)
        if on_result is not None:
            on_result(new)
        # at most every 2 s; the write after the loop completes the file
        if out is not None and time.monotonic() - last_write > 2.0:
            write_rows(rows, out)
            last_write = time.monotonic()

    args = dict(decode=spec.decode, cpp_dir=spec.cpp_dir, shrink=spec.shrink)
    if workers == 0 and client is None and scheduler is None:
        result.workers = 1
        bar = _bar(len(todo), progress)
        for index, fault in todo:
            accept(run_task(spec.seed, index, spec.kernels, fault, **args))  # type: ignore[arg-type]
            bar.update(1)
    else:
        from dask.distributed import Client, as_completed

        with contextlib.ExitStack() as stack:
            if client is None and scheduler:
                try:
                    client = Client(scheduler, timeout=connect_timeout)
                except (OSError, TimeoutError) as exc:
                    raise UsageError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc})") from None
                stack.callback(client.close)
            elif client is None:
                client = stack.enter_context(LocalDask(workers or os.cpu_count() or 1)).client
            result.workers = len(client.scheduler_info().get("workers", {})) or (workers or 0)
            result.dashboard = str(client.dashboard_link or "")
            log(f"dask: {result.workers} workers; dashboard {result.dashboard or '(none: install bokeh)'}")
            threads = 1  # tiny models: one worker per core, each single-threaded (torch and the fast kernels' pool)
            bar = _bar(len(todo), progress)  # after the dashboard line, which it would overwrite
            futures = [
                client.submit(
                    run_task,
                    spec.seed,
                    index,
                    spec.kernels,
                    fault,
                    threads=threads,
                    key=f"campaign-{spec.seed}-{index}-{fault or 'none'}-{'+'.join(spec.kernels)}",
                    retries=2,
                    pure=False,
                    **args,
                )
                for index, fault in todo
            ]
            for future in as_completed(futures):
                accept(future.result())
                bar.update(1)
                future.release()
    bar.close()
    if out is not None:
        write_rows(rows, out)
    result.seconds = time.perf_counter() - start
    return result


def _bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="campaign", unit="task", disable=not enabled)


# ---- the summary ----------------------------------------------------------------------------------


@dataclass
class CampaignSummary:
    by_kernels: pd.DataFrame  # pass rate per kernel set
    by_feature: pd.DataFrame  # pass rate per (feature, value), the failing values first
    margins: pd.DataFrame  # worst_ratio percentiles per kernel set
    slowest: pd.DataFrame
    failures: pd.DataFrame  # failing rows (no fault) with their shrunk case and command
    faults: pd.DataFrame | None  # per fault: runs, found, localized and diagnosed rates
    rows: pd.DataFrame

    def to_text(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_colwidth", 90):
            parts = [
                f"{len(self.rows)} rows, {self.rows['index'].nunique()} configs",
                "== pass rate per kernel set\n" + self.by_kernels.to_string(),
                "== tolerance margin (worst error / floor; divergent above "
                f"{FACTOR:g}) per kernel set\n" + self.margins.to_string(),
                "== pass rate per feature (lowest first)\n" + self.by_feature.head(15).to_string(index=False),
                "== slowest configs\n" + self.slowest.to_string(index=False),
            ]
            if len(self.failures):
                parts.append("== failures, shrunk\n" + self.failures.to_string(index=False))
            else:
                parts.append("== failures: none")
            if self.faults is not None:
                parts.append("== the debugger on the fault catalogue\n" + self.faults.to_string())
        return "\n\n".join(parts)


def summarize(rows: pd.DataFrame | list[dict[str, Any]]) -> CampaignSummary:
    import pandas as pd

    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    if not len(df):
        raise UsageError("the results file holds no rows")
    plain = df[df["fault"] == ""]
    passed = plain.assign(passed=plain["verdict"] == "pass")
    by_kernels = passed.groupby("kernels").agg(
        rows=("passed", "size"), passed=("passed", "sum"), pass_rate=("passed", "mean"), seconds=("seconds", "mean")
    )
    parts = []
    for feature in FEATURES:
        if feature in passed:
            g = passed.groupby(feature)["passed"].agg(["size", "mean"]).reset_index()
            parts.append(
                g.rename(columns={feature: "value", "size": "rows", "mean": "pass_rate"}).assign(feature=feature)
            )
    by_feature = (
        pd.concat(parts)[["feature", "value", "rows", "pass_rate"]].astype({"value": str})
        if parts
        else pd.DataFrame(columns=["feature", "value", "rows", "pass_rate"])
    )
    by_feature = by_feature.sort_values(["pass_rate", "rows"], ascending=[True, False])
    qs = [0.5, 0.9, 0.99, 1.0]
    names = [f"p{int(q * 100)}" for q in qs]
    margins = pd.DataFrame(
        {n: passed.groupby("kernels")["worst_ratio"].quantile(q) for n, q in zip(names, qs)}, columns=names
    )
    totals = plain.groupby(["seed", "index"]).agg(
        seconds=("seconds", "sum"),
        **{f: (f, "first") for f in ("hidden", "layers", "seq_len", "batch", "decode", "weights")},
    )
    slowest = totals.sort_values("seconds", ascending=False).head(5).reset_index()
    cols = [c for c in ("index", "kernels", "verdict", "culprit", "shrunk_culprit", "repro", "error") if c in plain]
    failures = plain[plain["verdict"] != "pass"][cols]
    faults = None
    faulty = df[df["fault"] != ""]
    if len(faulty):
        found = faulty.assign(
            found=faulty["verdict"] == "fail",
            localized=faulty["localized"].fillna(False).astype(bool),
            diagnosed=faulty["diagnosed"].map(lambda v: float(v) if v is not None and v == v else np.nan),
        )
        faults = found.groupby("fault").agg(
            runs=("found", "size"),
            found=("found", "mean"),
            localized=("localized", "mean"),
            diagnosed=("diagnosed", "mean"),
        )
        total = pd.DataFrame(
            {
                "runs": [len(found)],
                "found": [found["found"].mean()],
                "localized": [found["localized"].mean()],
                "diagnosed": [found["diagnosed"].mean()],
            },
            index=["ALL"],
        )
        faults = pd.concat([faults, total])
    return CampaignSummary(by_kernels, by_feature, margins, slowest, failures, faults, df)
