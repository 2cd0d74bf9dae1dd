"""The one probe of the machine a plan is chosen for: usable cores, the CPU's name and its
instruction-set flags. The default plan, the tuner's candidates and the tuning cache's key
all read these, so they cannot disagree (e.g. under a cpuset). No torch in here."""

from __future__ import annotations

import os
import platform
from functools import lru_cache


def cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def cpu_name() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    return _cpuinfo()[1]


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bfloat16 convolutions run natively (oneDNN), not emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_int8() -> bool:
    """VNNI (AVX-512 or AVX) or AMX: int8 matrix products run natively, not emulated."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
