"""CPU time of a process and of each of its threads, read from /proc (Linux): what a server
spends per request, and in which of its threads.

The process's own line (``/proc/PID/stat``: utime + stime of every thread, ended ones
included) is the total. Per thread, ``/proc/PID/task/TID/schedstat`` gives nanoseconds on
a CPU where the kernel has it (a thread's ``stat`` only counts 10 ms ticks), grouped by the
thread's OS name (app/threads.py names the server's threads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# The server's threads by OS name (app/threads.py): its event loop is the main thread
# (tid == pid); app/serving/service.py's preparation pool "preprocess_N";
# app/serving/forward_workers.py's "forward-<model>-<n>" and the threads they start
# (torch's OpenMP teams); "net-<model>" (app/serving/models.py) for the thread that loads a
# model and every thread born while it does (OpenVINO's inference streams, which run the
# network when OpenVINO serves it). Names are cut to 15 bytes; unnamed threads: "other".
EDGE, PREP, FORWARD, OTHER = "edge+loop", "prep", "forward", "other"
PREFIXES = ((PREP, "preprocess"), (FORWARD, "forward"), (FORWARD, "net-"))
GROUPS = (EDGE, PREP, FORWARD, OTHER)


def parse_stat(text: str) -> tuple[str, float]:
    """(comm, utime + stime in seconds) of one ``/proc/.../stat`` line. The name sits in
    parentheses and may itself hold spaces and parentheses: the last ')' ends it."""
    start, end = text.index("("), text.rindex(")")
    fields = text[end + 2 :].split()  # fields[0] is the state, the 3rd field of the line
    utime, stime = int(fields[11]), int(fields[12])  # the 14th and 15th fields
    return text[start + 1 : end], (utime + stime) / CLOCK_TICKS


def parse_schedstat(text: str) -> float:
    """Seconds on a CPU from ``/proc/.../schedstat`` (its first field, nanoseconds)."""
    return int(text.split()[0]) / 1e9


def thread_group(pid: int, tid: int, comm: str) -> str:
    if tid == pid:
        return EDGE
    return next((group for group, prefix in PREFIXES if comm.startswith(prefix)), OTHER)


@dataclass(frozen=True)
class CpuSnapshot:
    """One reading of a process: its total CPU seconds and each live thread's
    (tid -> (OS name, CPU seconds))."""

    pid: int
    total_s: float
    threads: Mapping[int, tuple[str, float]]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # the thread ended between listing and reading
        return None


def snapshot(pid: int, proc: Path = Path("/proc")) -> CpuSnapshot:
    """The process's CPU now (raises OSError when it is gone or this is not Linux)."""
    base = proc / str(pid)
    _, total = parse_stat((base / "stat").read_text())
    threads: dict[int, tuple[str, float]] = {}
    for task in (base / "task").iterdir():
        stat = _read(task / "stat")
        if stat is None:
            continue
        comm, seconds = parse_stat(stat)
        sched = _read(task / "schedstat")
        threads[int(task.name)] = (comm, parse_schedstat(sched) if sched else seconds)
    return CpuSnapshot(pid, total, threads)


def cpu_between(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds between two readings: ``total`` and one entry per thread group; a thread
    born in between counts from zero. ``unattributed`` is the total less the groups: threads
    that ended in between, and the coarser clock of the total (10 ms ticks)."""
    spent = {group: 0.0 for group in GROUPS}
    for tid, (comm, seconds) in after.threads.items():
        start = before.threads.get(tid, (comm, 0.0))[1]
        spent[thread_group(after.pid, tid, comm)] += max(0.0, seconds - start)
    total = after.total_s - before.total_s
    return {"total": total, **spent, "unattributed": total - sum(spent.values())}


def add_cpu(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Several windows' ``cpu_between`` summed key by key."""
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out
