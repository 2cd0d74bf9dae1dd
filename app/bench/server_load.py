"""A real ``midserve serve`` in a subprocess, under closed-loop HTTP load."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class HttpRound:
    views: int
    latencies: list[float]
    errors: int
    elapsed: float


def http_load(base: str, model: str, images: list[bytes], params: dict[str, Any],
              concurrency: int, duration_s: float, warmup_s: float = 1.0) -> HttpRound:  # fmt: skip
    """Closed-loop load: ``concurrency`` clients each sending one request after another."""
    latencies: list[float] = []
    views = 0
    errors = 0

    async def client(worker: int, stop_at: float, http: httpx.AsyncClient) -> None:
        nonlocal views, errors
        i = worker
        while time.perf_counter() < stop_at:
            data = images[i % len(images)]
            i += concurrency
            t0 = time.perf_counter()
            res = await http.post(f"/v1/models/{model}/classify", params=params, content=data,
                                  headers={"content-type": "image/jpeg"})  # fmt: skip
            if res.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            views += res.json()["results"][0]["views"]

    async def run() -> float:
        nonlocal views, errors
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
            warm_until = time.perf_counter() + warmup_s
            await asyncio.gather(*(client(w, warm_until, http) for w in range(concurrency)))
            latencies.clear()
            views, errors = 0, 0
            start = time.perf_counter()
            stop_at = start + duration_s
            await asyncio.gather(*(client(w, stop_at, http) for w in range(concurrency)))
            return time.perf_counter() - start

    elapsed = asyncio.run(run())
    return HttpRound(views, list(latencies), errors, elapsed)


def summarize_rounds(rounds: list[HttpRound]) -> dict[str, float]:
    """Throughput over all rounds; latency percentiles over every request of every round."""
    lat = sorted(x for r in rounds for x in r.latencies) or [float("nan")]
    elapsed = sum(r.elapsed for r in rounds)
    return {
        "views_per_s": sum(r.views for r in rounds) / elapsed,
        "requests_per_s": sum(len(r.latencies) for r in rounds) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "errors": sum(r.errors for r in rounds),
    }


def start_server(models_dir: Path, model: str, env: dict[str, str]) -> tuple[Any, str]:
    """Start ``midserve serve`` in a subprocess; return (process, base URL) once ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--models", model,
           "--models-dir", str(models_dir), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=full_env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("benchmark server did not become ready")
