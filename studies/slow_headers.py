"""Slow headers: a normal client's latency while many connections dribble their headers.

Starts a real server, measures a normal client's classify latency (a real photo, sequential
or ``--concurrency`` requests at a time) while nothing else runs (``--quiet`` seconds, half
before and half after), and for ``--duration`` seconds while ``--connections`` connections,
from another process, each send a request's headers one byte a second (reopened when the
server closes them). Reports quiet and loaded p50/p99, the p99 ratio (target: under 2x),
how many slow connections the server ended (408 or a plain close) and the server's open file
descriptors; writes them to artifacts/slow_headers.json. Not a test (docs/reliability.md,
"Slow clients").

    PYTHONPATH=. python -m studies.slow_headers --duration 30 --connections 200
    PYTHONPATH=. python -m studies.slow_headers --model tf_efficientnet_lite0 --models-dir models

The photo is the first of ../shared/data/imagenet-samples (or ``--image``); without one the
study says so and stops. The server runs as in studies/soak.py (CPU, one thread per forward,
float32, no load-time tuning unless the environment sets them); MIDSERVE_* variables of the
environment reach it, MIDSERVE_HEADER_READ_TIMEOUT_S included (default 10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx
import psutil

from app.serve_process import PROJECT_ROOT, serve_process
from studies.soak import server_env, write_tiny_model

SAMPLES = PROJECT_ROOT.parent / "shared" / "data" / "imagenet-samples"
# a request's headers that never end: at a byte a second they outlast any header timeout
SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Pad: " + b"a" * 100_000


@dataclass
class SlowStats:
    opened: int = 0
    answered_408: int = 0  # the server sent 408 request_timeout, then closed
    closed_silently: int = 0  # the server closed without an answer
    other: int = 0  # anything else (an error on connect, another answer)
    bytes_sent: int = 0


@dataclass
class SlowHeadersResult:
    model: str
    image: str
    concurrency: int
    connections: int
    duration_s: float
    header_timeout_s: float
    latency_ms: dict[str, dict[str, float]]
    p50_ratio: float
    p99_ratio: float
    requests: dict[str, int]
    statuses: dict[str, list[int]]
    slow: dict[str, int]
    server_header_timeouts: dict[str, float]
    server_fds: dict[str, int] = field(default_factory=dict)


def _percentiles(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    if not s:
        return {}
    p99 = s[min(len(s) - 1, int(0.99 * len(s)))]
    return {"p50": round(s[len(s) // 2], 2), "p99": round(p99, 2), "max": round(s[-1], 2)}


def _header_timeouts(base: str) -> dict[str, float]:
    """midserve_header_timeouts_total by state, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"partial": 0.0, "idle": 0.0}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for sample in family.samples:
            if sample.name == "midserve_header_timeouts_total":
                out[sample.labels["state"]] = sample.value
    return out


def _measure(
    base: str, path: str, photo: bytes, seconds: float, concurrency: int
) -> tuple[list[float], list[int]]:
    """Classify ``photo`` back to back on ``concurrency`` kept-alive connections."""
    latencies: list[float] = []
    statuses: list[int] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    status = c.post(path, content=photo,
                                    headers={"content-type": "image/jpeg"}).status_code  # fmt: skip
                except httpx.HTTPError:
                    status = -1
                latencies.append((time.perf_counter() - t0) * 1000.0)
                statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses


async def _slow_connection(
    host: str, port: int, every_s: float, stop: asyncio.Event, stats: SlowStats
) -> None:
    await asyncio.sleep(random.uniform(0, every_s))  # spread the connections over a second
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats.other += 1
            await asyncio.sleep(every_s)
            continue
        stats.opened += 1
        answer = asyncio.ensure_future(reader.read(65536))  # data, or b"" when closed
        sent = 0
        try:
            while not answer.done() and not stop.is_set():
                writer.write(SLOW_HEAD[sent : sent + 1])
                await writer.drain()
                sent += 1
                stats.bytes_sent += 1
                await asyncio.wait([answer], timeout=every_s)
        except OSError:
            pass
        if answer.done() and answer.exception() is None:
            data = answer.result()
            if data.startswith(b"HTTP/1.1 408"):
                stats.answered_408 += 1
            elif data == b"":
                stats.closed_silently += 1
            else:
                stats.other += 1
        elif answer.done():
            stats.closed_silently += 1  # reset by the server
        else:
            answer.cancel()
        writer.close()


def _run_slow(
    host: str, port: int, n: int, every_s: float, stop: EventType, out: Connection
) -> None:
    """The slow connections, in their own process (as an attacker would be): the normal
    client's latency is then not also that of sharing an interpreter with them."""
    stats = SlowStats()

    async def main() -> None:
        out.send("started")
        done = asyncio.Event()
        tasks = [asyncio.ensure_future(_slow_connection(host, port, every_s, done, stats))
                 for _ in range(n)]  # fmt: skip
        while not stop.is_set():
            await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    out.send(asdict(stats))


def run_slow_headers(
    photo_path: Path,
    duration_s: float = 30.0,
    connections: int = 200,
    quiet_s: float = 30.0,
    concurrency: int = 1,
    every_s: float = 1.0,
    model: str = "tiny",
    models_dir: Path | None = None,
) -> SlowHeadersResult:
    photo = photo_path.read_bytes()
    from app.config import Settings

    env = server_env()
    header_timeout = Settings().header_read_timeout_s  # the default, or the environment's
    path = f"/v1/models/{model}/classify"
    with tempfile.TemporaryDirectory() as tmp:
        if models_dir is None:
            models_dir = Path(tmp)
            write_tiny_model(models_dir, model)
        with serve_process(models_dir, model, env=env) as (base, proc):
            host, port = base.removeprefix("http://").split(":")
            server = psutil.Process(proc.pid)
            _measure(base, path, photo, 2.0, concurrency)  # warm-up, not counted
            fds = {"quiet": server.num_fds()}
            # the quiet time is split around the loaded one: a machine shared with other work
            # drifts, and the baseline should be measured under the same drift
            quiet_ms, quiet_status = _measure(base, path, photo, quiet_s / 2, concurrency)

            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            receive, send = ctx.Pipe(duplex=False)
            slow = ctx.Process(
                target=_run_slow, args=(host, int(port), connections, every_s, stop, send)
            )
            slow.start()
            receive.recv()  # started
            time.sleep(every_s)  # every slow connection opened
            peak = [0]

            def watch_fds() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], server.num_fds())
                    time.sleep(0.5)

            watcher = threading.Thread(target=watch_fds)
            watcher.start()
            loaded_ms, loaded_status = _measure(base, path, photo, duration_s, concurrency)
            fds["loaded_end"] = server.num_fds()
            stop.set()
            stats = receive.recv()
            slow.join()
            watcher.join()
            fds["loaded_peak"] = peak[0]
            after_ms, after_status = _measure(base, path, photo, quiet_s / 2, concurrency)
            quiet_ms, quiet_status = quiet_ms + after_ms, quiet_status + after_status
            fds["after"] = server.num_fds()
            timeouts = _header_timeouts(base)
    quiet, loaded = _percentiles(quiet_ms), _percentiles(loaded_ms)
    return SlowHeadersResult(
        model=model,
        image=photo_path.name,
        concurrency=concurrency,
        connections=connections,
        duration_s=duration_s,
        header_timeout_s=header_timeout,
        latency_ms={"quiet": quiet, "loaded": loaded},
        p50_ratio=round(loaded["p50"] / quiet["p50"], 2),
        p99_ratio=round(loaded["p99"] / quiet["p99"], 2),
        requests={"quiet": len(quiet_ms), "loaded": len(loaded_ms)},
        statuses={"quiet": sorted(set(quiet_status)), "loaded": sorted(set(loaded_status))},
        slow=stats,
        server_header_timeouts=timeouts,
        server_fds=fds,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds under slow headers")
    p.add_argument("--connections", type=int, default=200, help="slow-header connections")
    p.add_argument("--quiet", type=float, default=30.0,
                   help="seconds measured without them (half before, half after)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=1, help="normal requests at a time")
    p.add_argument("--every", type=float, default=1.0, help="seconds between header bytes")
    p.add_argument("--model", default="tiny", help="'tiny' builds a tiny model in a temp dir")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--image", type=Path, default=None, help="the normal client's photo")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "artifacts" / "slow_headers.json")
    args = p.parse_args()
    photo = args.image
    if photo is None:
        found = sorted(SAMPLES.glob("*.JPEG")) if SAMPLES.is_dir() else []
        if not found:
            print(f"slow_headers: skipped: no photo in {SAMPLES} (give one with --image)")
            return
        photo = found[0]
    r = run_slow_headers(photo, args.duration, args.connections, args.quiet, args.concurrency,
                         args.every, args.model, args.models_dir)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(r), indent=2))
    q, lo = r.latency_ms["quiet"], r.latency_ms["loaded"]
    print(f"model {r.model}, {r.image}, concurrency {r.concurrency}; header timeout "
          f"{r.header_timeout_s:g} s")  # fmt: skip
    print(f"quiet : p50 {q['p50']} ms  p99 {q['p99']} ms  ({r.requests['quiet']} requests, "
          f"statuses {r.statuses['quiet']})")  # fmt: skip
    print(f"loaded: p50 {lo['p50']} ms  p99 {lo['p99']} ms  ({r.requests['loaded']} requests, "
          f"statuses {r.statuses['loaded']}) with {r.connections} slow-header connections "
          f"for {r.duration_s:g} s")  # fmt: skip
    verdict = "met" if r.p99_ratio < 2 else "NOT met"
    print(f"loaded/quiet: p99 {r.p99_ratio}x (target under 2x: {verdict}), p50 {r.p50_ratio}x")
    print(f"slow connections: {r.slow}; server counted {r.server_header_timeouts}")
    print(f"server open fds: {r.server_fds}")
    print(json.dumps(asdict(r)))


if __name__ == "__main__":
    main()
