"""What this machine can do, measured once and kept: the float32 FMA peak and the read bandwidth
from DRAM and from cache, on one thread and on all, the CPU's features, and the BLAS PyTorch uses.

The measuring program is ``cpp/tools/machine_limits.cpp``, built with g++ ``-O2 -march=native``
(as base_line_micro is) into the data folder and run as a subprocess: a register-blocked FMA loop
reaches the hardware's limit under any compiler, and a subprocess keeps the measurement out of
the cppyy process (no JIT state, its own threads, a timeout) and runs without cppyy. Its CPU
features come from ``cpu.hpp``, the cpuid reader the bf16/q8 kernels use.

The result is cached as JSON in ``paths.data_dir()/machine/``, keyed by the CPU's model name and a
fingerprint (fingerprint.py: its flags, cores, memory; the benchmark history's machine id): a
different machine (or VM size) measures again;
``refresh=True`` (``celerinfer-lab machine --refresh``) always does. The profile (profile.py)
reads it for its roofs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MachineError
from .fingerprint import fingerprint_id, machine_fingerprint
from .paths import DEFAULT_CPP_DIR, data_dir

TOOL = "tools/machine_limits.cpp"
TOOL_SOURCES = (TOOL, "include/celerinfer/cpu.hpp", "include/celerinfer/packing.hpp", "include/celerinfer/check.hpp")
CACHE_VERSION = 1
# (seconds per run, runs per figure (the best is kept), DRAM buffer MB at least). Many short runs: on a
# shared machine the best of them catches a quiet moment.
FULL = (0.04, 12, 256)
QUICK = (0.01, 1, 64)


def _cache_bytes(level: int) -> int:
    """Size of cpu0's level-``level`` data/unified cache from sysfs, 0 when unknown."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if int((index / "level").read_text()) != level or (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", size)
        if m:
            return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
    return 0


def machine_key(fp: dict[str, object] | None = None) -> str:
    """The cache key: the CPU model as a slug, then the fingerprint's 12 hex (the benchmark history's
    machine id, so both name a machine the same way)."""
    fp = fp or machine_fingerprint()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(fp["cpu"])).strip("-").lower() or "cpu"
    return f"{slug}-{fingerprint_id(fp)}"


@dataclass
class MachineLimits:
    """The measured limits. Throughputs are the best of a few runs (a shared machine only slows them)."""

    cpu: str
    key: str
    cores: int
    threads: int  # the "all threads" figures ran on this many
    isa: str  # the vectors the FMA loop used: avx512 or avx2+fma
    fma_gflops_1: float
    fma_gflops_all: float
    read_gbs_dram_1: float
    read_gbs_dram_all: float
    read_gbs_cache_1: float
    read_gbs_cache_all: float
    dram_buffer_mb: int
    cache_buffer_kb: int
    l2_bytes: int
    l3_bytes: int
    features: dict[str, bool]
    blas: str  # which BLAS / oneDNN path PyTorch takes on this CPU
    quick: bool = False  # measured with tiny sizes and times (tests): not a figure to quote
    measured_at: str = ""
    fingerprint: dict[str, object] = field(default_factory=dict)

    def peak_gflops(self, threads: int) -> float:
        """The FMA peak for ``threads`` threads (1, all, or in between: linear between the two)."""
        return _between(self.fma_gflops_1, self.fma_gflops_all, threads, self.threads)

    def bandwidth_gbs(self, threads: int, in_cache: bool = False) -> float:
        """Read bandwidth for ``threads`` threads, from DRAM or (``in_cache``) from L2."""
        if in_cache:
            return _between(self.read_gbs_cache_1, self.read_gbs_cache_all, threads, self.threads)
        return _between(self.read_gbs_dram_1, self.read_gbs_dram_all, threads, self.threads)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "MachineLimits":
        return cls(**data)  # type: ignore[arg-type]

    def lines(self) -> list[str]:
        yes = [name for name, on in self.features.items() if on]
        no = [name for name, on in self.features.items() if not on]
        return [
            f"machine: {self.cpu}, {self.cores} cores, {self.fingerprint.get('memory_gib', '?')} GiB"
            + (" (quick measurement: tiny sizes, not a figure to quote)" if self.quick else ""),
            f"float32 FMA peak ({self.isa}): {self.fma_gflops_1:.1f} GFLOP/s on 1 thread, "
            f"{self.fma_gflops_all:.1f} on {self.threads}",
            f"read bandwidth from DRAM ({self.dram_buffer_mb} MB buffer): {self.read_gbs_dram_1:.1f} GB/s on 1 thread, "
            f"{self.read_gbs_dram_all:.1f} on {self.threads}",
            f"read bandwidth from cache ({self.cache_buffer_kb} KB per thread): {self.read_gbs_cache_1:.1f} GB/s "
            f"on 1 thread, {self.read_gbs_cache_all:.1f} on {self.threads}",
            f"ridge point (all threads): {self.fma_gflops_all / self.read_gbs_dram_all:.1f} FLOP/byte from DRAM, "
            f"{self.fma_gflops_all / self.read_gbs_cache_all:.1f} from cache",
            f"features (cpuid): {', '.join(yes) or 'none'}" + (f"; not: {', '.join(no)}" if no else ""),
            f"PyTorch: {self.blas}",
            f"measured {self.measured_at}; cache key {self.key}",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _between(one: float, all_: float, threads: int, max_threads: int) -> float:
    if threads <= 1 or max_threads <= 1:
        return one
    if threads >= max_threads:
        return all_
    return one + (all_ - one) * (threads - 1) / (max_threads - 1)


def blas_info() -> str:
    """The BLAS and oneDNN PyTorch was built with and the CPU path it takes here (torch imported lazily)."""
    import torch

    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    dnn = re.search(r"MKL-DNN (v[\d.]+)", config)
    parts = [f"torch {torch.__version__}", f"BLAS {blas.group(1) if blas else 'unknown'}"]
    if mkl:
        parts[-1] += f" (MKL {mkl.group(1)})"
    parts.append(
        f"oneDNN {dnn.group(1) if dnn else ''} {'available' if torch.backends.mkldnn.is_available() else 'absent'}"
    )
    parts.append(f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS"):
        parts.append(f"MKL_ENABLE_INSTRUCTIONS={os.environ['MKL_ENABLE_INSTRUCTIONS']}")
    parts.append(f"{torch.get_num_threads()} threads")
    return ", ".join(parts)


def tool_digest(cpp_dir: Path | None = None, compiler: str = "") -> str:
    """12 hex over the measuring program's sources (and the compiler's name): its binary is built once
    per digest, and limits cached by another version of it are measured again (the DRAM figure moved
    from 26 to 36 GB/s when it took 2 MB pages)."""
    cpp_dir = cpp_dir or DEFAULT_CPP_DIR
    text = b"".join((cpp_dir / name).read_bytes() for name in TOOL_SOURCES)
    return hashlib.sha256(text + compiler.encode()).hexdigest()[:12]


def build_tool(cpp_dir: Path | None = None) -> Path:
    """Compile machine_limits.cpp (once per source text and compiler) into the data folder."""
    cpp_dir = cpp_dir or DEFAULT_CPP_DIR
    source = cpp_dir / TOOL
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise MachineError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX)")
    binary = data_dir() / "bin" / f"machine_limits-{tool_digest(cpp_dir, cxx)}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
    cmd = [cxx, "-O2", "-march=native", "-std=c++17", "-pthread", f"-I{cpp_dir / 'include'}", str(source), "-o"]
    result = subprocess.run([*cmd, str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        raise MachineError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    os.replace(partial, binary)
    return binary


def measure(quick: bool = False, threads: int | None = None, cpp_dir: Path | None = None) -> MachineLimits:
    """Measure now (a few seconds; ``quick``: well under one, tiny sizes, for tests)."""
    seconds, repeats, dram_mb = QUICK if quick else FULL
    threads = threads or os.cpu_count() or 1
    l2, l3 = _cache_bytes(2), _cache_bytes(3)
    if not quick:  # >> L3: eight times it, at least 256 MB
        dram_mb = max(dram_mb, 8 * l3 // 2**20)
    cache_kb = max(16, (l2 or 2**20) // 2 // 1024)  # half of L2: sure to stay in it
    if quick:
        cache_kb = min(cache_kb, 256)
    binary = build_tool(cpp_dir)
    cmd = [str(binary), str(threads), str(seconds), str(repeats), str(dram_mb), str(cache_kb)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise MachineError(f"{' '.join(cmd)} ran for more than 300 s") from None
    if result.returncode != 0:
        raise MachineError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    try:
        raw = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise MachineError(f"{' '.join(cmd)} printed no JSON:\n{result.stdout[:2000]}") from None
    fp = machine_fingerprint()
    return MachineLimits(
        cpu=str(fp["cpu"]),
        key=machine_key(fp),
        cores=int(fp["cores"]),
        threads=int(raw["threads"]),
        isa=str(raw["isa"]),
        fma_gflops_1=float(raw["fma_gflops_1"]),
        fma_gflops_all=float(raw["fma_gflops_all"]),
        read_gbs_dram_1=float(raw["read_gbs_dram_1"]),
        read_gbs_dram_all=float(raw["read_gbs_dram_all"]),
        read_gbs_cache_1=float(raw["read_gbs_cache_1"]),
        read_gbs_cache_all=float(raw["read_gbs_cache_all"]),
        dram_buffer_mb=int(raw["dram_buffer_mb"]),
        cache_buffer_kb=int(raw["cache_buffer_kb"]),
        l2_bytes=l2,
        l3_bytes=l3,
        features={str(k): bool(v) for k, v in raw["features"].items()},
        blas=blas_info(),
        quick=quick,
        measured_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        fingerprint=fp,
    )


def cache_path(key: str | None = None) -> Path:
    return data_dir() / "machine" / f"{key or machine_key()}.json"


def read_cached(path: Path) -> MachineLimits | None:
    """The cached limits at ``path``, None when there are none or another version of the measuring
    program took them; a malformed file is a named error."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            raise ValueError(f"not a version-{CACHE_VERSION} machine file")
        if data.get("tool") != tool_digest():
            return None
        return MachineLimits.from_dict(data["limits"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MachineError(
            f"{path}: unreadable cached machine limits ({exc}); run `celerinfer-lab machine --refresh` to measure again"
        ) from None


def machine_limits(refresh: bool = False, quick: bool = False) -> MachineLimits:
    """This machine's limits: from the cache when measured before on this machine (a quick measurement
    serves only quick requests), else measured now and cached."""
    path = cache_path()
    cached = None if refresh else read_cached(path)
    if cached is not None and (quick or not cached.quick):
        return cached
    limits = measure(quick=quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(
        json.dumps({"version": CACHE_VERSION, "tool": tool_digest(), "limits": limits.to_dict()}, indent=2) + "\n"
    )
    os.replace(partial, path)
    return limits
