"""Server CPU per request of the HTTP protocol: h11 (before) against httptools (now).

    PYTHONPATH=. python -m studies.http_protocol_cpu [--requests 5000] [--concurrency 8]

Starts the same app (the tiny model, as studies/soak.py serves it) behind three servers that
differ only in uvicorn's protocol class and event loop: ``h11`` (app/api/http_protocol.py as
of ``--baseline-rev``, the h11 subclass, on asyncio's loop), ``httptools-asyncio`` (today's
class on asyncio's loop) and ``httptools-uvloop`` (today's class on uvloop: what ``midserve
serve`` runs). Loads each with ``hey`` (``apt-get install hey``) at ``--concurrency``
connections for ``--requests`` requests: ``GET /healthz``, and a POST of a small body to an
unknown model (a 404 that reads the body and never reaches a forward). The server's CPU per
request is its utime + stime (/proc/<pid>/stat: every thread) over the run divided by the
responses; rounds interleave the servers and each row reports its median, with the server's
CPU while idle for reference. Writes artifacts/http_protocol_cpu.json. Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType

from app.bench.proc import snapshot
from app.serve_process import HOST, PROJECT_ROOT, free_port, running_process
from studies.soak import server_env, write_tiny_model

ARMS = ("h11", "httptools-asyncio", "httptools-uvloop")
BASELINE_REV = "e599dd5"  # the last commit whose protocol was the h11 subclass
MODEL = "tiny"
POST_PATH = "/v1/models/nope/classify"  # 404 unknown_model


def cpu_s(pid: int) -> float:
    """utime + stime of process ``pid``, all its threads, in seconds."""
    return snapshot(pid).total_s


def _baseline_protocol(rev: str) -> ModuleType:
    """app/api/http_protocol.py as of git ``rev``, imported as its own module."""
    source = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "show", f"{rev}:app/api/http_protocol.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "baseline_http_protocol.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_http_protocol", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(arm: str, port: int, models_dir: Path, rev: str) -> None:
    """One arm's server: the app and uvicorn options of ``midserve serve`` (app/cli.py), with
    this arm's protocol class and loop."""
    import uvicorn

    from app.api import http_protocol
    from app.config import Settings
    from app.main import create_app

    settings = Settings(models_dir=models_dir, models=[MODEL])
    app = create_app(settings)
    module = _baseline_protocol(rev) if arm == "h11" else http_protocol
    protocol = module.protocol_class(
        settings.header_read_timeout_s, settings.max_connections, app.state.metrics
    )
    loop = http_protocol.event_loop() if arm == "httptools-uvloop" else "asyncio"
    if arm == "httptools-uvloop" and loop != "uvloop":
        raise SystemExit("uvloop does not import: the httptools-uvloop arm cannot run")
    uvicorn.run(app, host=HOST, port=port, log_level="warning", loop=loop, http=protocol,
                timeout_keep_alive=5, timeout_graceful_shutdown=30)  # fmt: skip


@contextmanager
def arm_server(arm: str, models_dir: Path, rev: str, log: Path) -> Iterator[tuple[str, int]]:
    """``serve(arm)`` in a subprocess; yields its base URL and pid once /readyz answers."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "studies.http_protocol_cpu", "--serve", arm, "--port", str(port),
           "--models-dir", str(models_dir), "--baseline-rev", rev]  # fmt: skip
    env = {**os.environ, **server_env(), "PYTHONPATH": str(PROJECT_ROOT)}
    with running_process(cmd, base + "/readyz", env=env, log_path=log, name=arm) as proc:
        yield base, proc.pid


def hey(url: str, requests: int, concurrency: int, body: Path | None) -> dict[str, int]:
    """Run ``hey``; the responses it counted by status (``error``: requests that failed)."""
    cmd = ["hey", "-n", str(requests), "-c", str(concurrency)]
    if body is not None:
        cmd += ["-m", "POST", "-T", "image/png", "-D", str(body)]
    out = subprocess.run(cmd + [url], check=True, capture_output=True, text=True).stdout
    statuses = {m[0]: int(m[1]) for m in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = re.search(r"Error distribution:\n((?:\s+\[\d+\].*\n?)+)", out)
    if errors:
        statuses["error"] = sum(int(n) for n in re.findall(r"\[(\d+)\]", errors.group(1)))
    return statuses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000, help="per load, arm and round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--body-bytes", type=int, default=1000, help="the POST's body")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the h11 arm")
    p.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "artifacts" / "http_protocol_cpu.json"
    )
    p.add_argument("--serve", choices=ARMS, help=argparse.SUPPRESS)  # one arm's server
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--models-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.models_dir, args.baseline_rev)
        return
    if shutil.which("hey") is None:
        print("http_protocol_cpu: skipped: hey is not installed (apt-get install hey)")
        return
    loads = {"GET /healthz": "/healthz", f"POST {POST_PATH}": POST_PATH}
    per_request: dict[str, dict[str, list[float]]] = {a: {k: [] for k in loads} for a in ARMS}
    statuses: dict[str, dict[str, dict[str, int]]] = {a: {} for a in ARMS}
    idle_ms_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        write_tiny_model(root, MODEL)
        body = root / "body.bin"
        body.write_bytes(b"x" * args.body_bytes)
        servers = {arm: stack.enter_context(arm_server(arm, root, args.baseline_rev,
                                                       root / f"{arm}.log"))
                   for arm in ARMS}  # fmt: skip
        for arm, (base, pid) in servers.items():
            hey(base + "/healthz", 500, args.concurrency, None)  # warm-up, not counted
            before = cpu_s(pid)
            time.sleep(2.0)
            idle_ms_s[arm] = round((cpu_s(pid) - before) / 2.0 * 1000, 2)
        for r in range(args.rounds):
            order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]  # each arm first once
            for arm in order:
                base, pid = servers[arm]
                for name, path in loads.items():
                    before = cpu_s(pid)
                    got = hey(base + path, args.requests, args.concurrency,
                              body if name.startswith("POST") else None)  # fmt: skip
                    answered = sum(n for status, n in got.items() if status != "error")
                    ms = (cpu_s(pid) - before) * 1000 / max(1, answered)  # hey: n rounded to c
                    per_request[arm][name].append(ms)
                    for status, n in got.items():
                        seen = statuses[arm].setdefault(name, {})
                        seen[status] = seen.get(status, 0) + n
                    print(f"round {r + 1} {arm:18s} {name:34s} {ms:.3f} ms CPU/request {got}")
    medians = {a: {k: round(statistics.median(v), 3) for k, v in per_request[a].items()}
               for a in ARMS}  # fmt: skip
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "baseline_rev": args.baseline_rev,
        "cpu_ms_per_request_median": medians,
        "cpu_ms_per_request_rounds": per_request,
        "statuses": statuses,
        "idle_cpu_ms_per_s": idle_ms_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nserver CPU ms per request, median of {args.rounds} rounds "
          f"({args.requests} requests at -c {args.concurrency}):")  # fmt: skip
    print("| load | " + " | ".join(ARMS) + " | h11 / httptools-uvloop |")
    print("|---|" + "---|" * (len(ARMS) + 1))
    for name in loads:
        row = [medians[a][name] for a in ARMS]
        ratio = row[0] / row[-1] if row[-1] else float("nan")
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {ratio:.1f}x |")
    print(f"server CPU while idle (ms per s): {idle_ms_s}")


if __name__ == "__main__":
    main()
