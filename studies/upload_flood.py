"""Upload flood: many concurrent large uploads at once, with the bound on request-body
bytes in flight (MIDSERVE_MAX_INFLIGHT_BODY_BYTES) and without it (0), one run each.

Reports for each run: how many uploads were answered 200, refused 503 (and how fast: the
client's time from its first byte to the answer's status line) or got something else
(another status, a reset connection), and the server's resident memory before the flood and
at its peak (sampled every 5 ms while the flood runs). Not a test: the numbers depend on
the machine.

    PYTHONPATH=. python -m studies.upload_flood --uploads 64 --size-mb 5 --bound-mb 64
    PYTHONPATH=. python -m studies.upload_flood --client httpx   # body first, then the answer

The default client reads while it sends (as curl does) and hangs up on a refusal; with
``--client httpx`` each upload sends its whole body before it reads, so a refusal reaches
it only once its body is through (the server reads and drops the rest of a refused body).

The server serves a tiny real model (studies/soak.py's) on the CPU, float32, untuned; the
uploads are one noise PNG of about ``--size-mb`` MB, classified with one view each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from app.serve_process import PROJECT_ROOT, serve_process
from studies.soak import noise_image, server_env, write_tiny_model

CLASSIFY = "/v1/models/tiny/classify?crops=1"


@dataclass
class FloodResult:
    bound_bytes: int  # 0: no bound
    client: str  # raw: reads while it sends; httpx: sends the whole body, then reads
    uploads: int
    upload_bytes: int
    wall_s: float
    outcomes: dict[str, int]  # status code, or the exception's name
    refused_ms: dict[str, float]  # client time to the 503, p50 / max
    answered_ms: dict[str, float]  # client time to the 200, p50 / max
    rss_mb: dict[str, float]  # before the flood, its peak, after it
    refused_total: float  # midserve_body_bytes_refused_requests_total after the flood
    in_flight_after: float  # midserve_body_bytes_in_flight after the flood (0 expected)


class PeakRss:
    """The process's resident memory sampled every ``every_s`` on a thread; ``peak``."""

    def __init__(self, pid: int, every_s: float = 0.005) -> None:
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"p50": round(1000 * s[len(s) // 2], 1), "max": round(1000 * s[-1], 1)}


async def _raw_upload(host: str, port: int, body: bytes) -> tuple[str, float]:
    """One upload that reads while it sends (as curl does): the time to the answer's
    status line; on a refusal it stops sending and hangs up."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return type(exc).__name__, time.perf_counter() - t0
    head = (f"POST {CLASSIFY} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip

    async def send_body() -> None:
        writer.write(head)
        for i in range(0, len(body), 1 << 18):
            writer.write(body[i : i + (1 << 18)])
            await writer.drain()

    sender = asyncio.create_task(send_body())
    try:
        status_line = await reader.readline()
        elapsed = time.perf_counter() - t0
        outcome = status_line.split()[1].decode() if status_line else "closed"
        if outcome == "200":
            await sender
            await reader.readuntil(b"\r\n\r\n")
    except (OSError, asyncio.IncompleteReadError) as exc:
        outcome, elapsed = type(exc).__name__, time.perf_counter() - t0
    finally:
        sender.cancel()
        writer.close()
    return outcome, elapsed


async def _httpx_upload(client: httpx.AsyncClient, body: bytes) -> tuple[str, float]:
    """One upload as most clients send it: the whole body first, then the answer."""
    t0 = time.perf_counter()
    try:
        res = await client.post(CLASSIFY, content=body, headers={"content-type": "image/png"})
        outcome = str(res.status_code)
    except httpx.HTTPError as exc:
        outcome = type(exc).__name__
    return outcome, time.perf_counter() - t0


async def _flood(base: str, body: bytes, uploads: int, client: str) -> list[tuple[str, float]]:
    """``uploads`` POSTs of ``body`` at once, each on its own connection."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    limits = httpx.Limits(max_connections=uploads, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        calls = [_raw_upload(host, port, body) if client == "raw" else _httpx_upload(http, body)
                 for _ in range(uploads)]  # fmt: skip
        return list(await asyncio.gather(*calls))


def _metric(base: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=30).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def run_flood(
    models_dir: Path, bound: int, uploads: int, body: bytes, client: str = "raw"
) -> FloodResult:
    env = server_env({"MIDSERVE_MAX_INFLIGHT_BODY_BYTES": str(bound)})
    with serve_process(models_dir, "tiny", env=env) as (base, proc):
        warm = httpx.post(base + CLASSIFY, content=body, headers={"content-type": "image/png"},
                          timeout=120)  # fmt: skip
        warm.raise_for_status()  # one upload first: the first decode and forward are paid
        before = psutil.Process(proc.pid).memory_info().rss
        t0 = time.perf_counter()
        with PeakRss(proc.pid) as rss:
            results = asyncio.run(_flood(base, body, uploads, client))
        wall = time.perf_counter() - t0
        after = psutil.Process(proc.pid).memory_info().rss
        refused_total = _metric(base, "midserve_body_bytes_refused_requests_total")
        in_flight_after = _metric(base, "midserve_body_bytes_in_flight")
    return FloodResult(
        bound_bytes=bound,
        client=client,
        uploads=uploads,
        upload_bytes=len(body),
        wall_s=round(wall, 2),
        outcomes=dict(Counter(outcome for outcome, _ in results)),
        refused_ms=_ms([t for outcome, t in results if outcome == "503"]),
        answered_ms=_ms([t for outcome, t in results if outcome == "200"]),
        rss_mb={
            k: round(v / 2**20, 1)
            for k, v in {"before": before, "peak": rss.peak, "after": after}.items()
        },  # fmt: skip
        refused_total=refused_total,
        in_flight_after=in_flight_after,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=64)
    p.add_argument("--size-mb", type=float, default=5.0, help="upload size, MB (10**6 bytes)")
    p.add_argument("--bound-mb", type=float, default=64.0, help="the bound, MiB")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="raw: reads while it sends, hangs up on a refusal; httpx: sends the "
                   "whole body, then reads")  # fmt: skip
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "artifacts" / "upload_flood.json")
    args = p.parse_args()
    side = math.isqrt(int(args.size_mb * 1e6 / 3))  # noise PNG: ~3 bytes a pixel
    body = noise_image(side, side, "PNG", seed=0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp), "tiny")
        for bound in (int(args.bound_mb * 2**20), 0):
            result = run_flood(Path(tmp), bound, args.uploads, body, args.client)
            results.append(result)
            print(f"bound {bound or 'off'}: {args.uploads} uploads of {len(body)} bytes in "
                  f"{result.wall_s} s: {result.outcomes}; 503 in ms {result.refused_ms}, "
                  f"200 in ms {result.answered_ms}; server RSS MB {result.rss_mb}; refused "
                  f"(server) {result.refused_total:g}; bytes in flight after "
                  f"{result.in_flight_after:g}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
