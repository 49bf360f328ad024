"""Which machine a number was measured on: the CPU model, a hash of its feature flags, the cores and
the memory, and a short id over the four. Two timings are comparable only on the same id (the
benchmark history refuses the rest). Read from /proc (Linux); "unknown" where it says nothing."""

from __future__ import annotations

import hashlib
import json
import os
import platform


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor only: the others repeat it
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _memory_gib() -> int:
    """MemTotal in GiB, rounded (a few MB reserved by the kernel must not change the id); 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it does not)."""
    return set(_cpuinfo().get("flags", "").split())


def fingerprint_id(fields: dict) -> str:
    """12 hex digits of the SHA-256 of a fingerprint's fields (its "id" left out)."""
    rest = {key: value for key, value in fields.items() if key != "id"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:12]


def machine_fingerprint() -> dict:
    """{"id", "cpu", "flags_sha256", "cores", "memory_gib", "arch"}: ``id`` is fingerprint_id of the
    other fields (the flags enter as their hash: the list is long). The benchmark history compares
    results only on the same id; the machine's measured limits are cached under it (machine.py)."""
    info = _cpuinfo()
    flags = " ".join(sorted(info.get("flags", "").split()))
    fields = {
        "cpu": info.get("model name") or platform.processor() or "unknown",
        "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "cores": os.cpu_count() or 0,
        "memory_gib": _memory_gib(),
        "arch": platform.machine() or "unknown",
    }
    return {"id": fingerprint_id(fields), **fields}
