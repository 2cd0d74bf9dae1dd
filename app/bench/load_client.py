"""The load client of the CPU budget (app/bench/cpu_budget.py), with its own CPU measured.

``hey`` (Debian package ``hey``, Go) posts one raw JPEG from ``concurrency`` connections
for a fixed time, for a fraction of the CPU a Python client spends per request, so on a
small machine the client takes little from the server it loads. Its CPU is the rusage of
its process, collected when it exits. Without hey the bench's own httpx client loads the
server (app/bench/server_load.py) and its CPU is this process's own.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.bench.server_load import http_load

HEY = "hey"


@dataclass(frozen=True)
class ClientRun:
    """One closed-loop window as the client saw it."""

    ok: int  # 200 answers
    errors: int  # any other status, and requests that got no answer
    elapsed_s: float
    cpu_s: float  # the client's own user + system CPU


def client_name(choice: str) -> str:
    """``hey`` or ``httpx`` for ``--cpu-client`` (auto: hey where it is installed)."""
    if choice == "auto":
        return HEY if shutil.which(HEY) else "httpx"
    if choice == HEY and not shutil.which(HEY):
        raise SystemExit("--cpu-client hey: hey is not installed (apt-get install hey)")
    return choice


def parse_hey(text: str) -> tuple[int, int, float]:
    """(200 answers, other answers and failures, total seconds) from hey's summary."""
    total = re.search(r"^\s*Total:\s+([\d.]+) secs", text, re.MULTILINE)
    if total is None:
        raise ValueError(f"not a hey summary: {text[-500:]!r}")
    ok = errors = 0
    section = ""
    for line in text.splitlines():
        if line.endswith("distribution:"):
            section = line.split()[0].lower()
            continue
        row = re.match(r"^\s+\[(\d+)\]\s+(.*)$", line)
        if row is None:
            continue
        if section == "status":  # "[200]\t950 responses"
            count = int(row.group(2).split()[0])
            ok, errors = (ok + count, errors) if row.group(1) == "200" else (ok, errors + count)
        elif section == "error":  # "[3]\tPost ...: connection refused"
            errors += int(row.group(1))
    return ok, errors, float(total.group(1))


def run_hey(url: str, body: Path, concurrency: int, duration_s: float) -> ClientRun:
    """``hey`` posting ``body`` as image/jpeg to ``url`` for ``duration_s``."""
    cmd = [HEY, "-z", f"{max(1, round(duration_s * 1000))}ms", "-c", str(concurrency),
           "-m", "POST", "-T", "image/jpeg", "-D", str(body), url]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    text = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    # wait4, not wait: the rusage of this one child, whatever else this process runs
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"hey exited with {proc.returncode}: {text[-1000:]}")
    ok, errors, elapsed = parse_hey(text)
    return ClientRun(ok, errors, elapsed, usage.ru_utime + usage.ru_stime)


def run_httpx(base: str, model: str, body: bytes, params: dict[str, Any], concurrency: int,
              duration_s: float) -> ClientRun:  # fmt: skip
    """The bench's httpx client in this process; its CPU is this process's over the run."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    run = http_load(base, model, [body], params, concurrency, duration_s, warmup_s=0.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return ClientRun(len(run.latencies), run.errors, run.elapsed, cpu)
