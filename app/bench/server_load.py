"""A real ``midserve serve`` (started by app/serve_process.py) under closed-loop HTTP load."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from app.api.v2.tensors import HEADER_LENGTH, join_bytes_elements


def v2_infer_body(data: bytes, params: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """One image as an Open Inference Protocol request, binary as the official clients send
    it: probabilities back in binary, the views run in the JSON header."""
    raw = join_bytes_elements([data])
    head = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                    {"name": "views", "parameters": {"binary_data": False}}],
        "parameters": params,
    }  # fmt: skip
    header = json.dumps(head).encode()
    return header + raw, {HEADER_LENGTH: str(len(header))}


def _v2_views(res: httpx.Response) -> int:
    header = res.content[: int(res.headers.get(HEADER_LENGTH, len(res.content)))]
    outputs = json.loads(header)["outputs"]
    return int(next(o for o in outputs if o["name"] == "views")["data"][0])


@dataclass
class HttpRound:
    views: int
    latencies: list[float]
    errors: int
    elapsed: float


def http_load(base: str, model: str, images: list[bytes], params: dict[str, Any],
              concurrency: int, duration_s: float, warmup_s: float = 1.0,
              protocol: str = "v1") -> HttpRound:  # fmt: skip
    """Closed-loop load: ``concurrency`` clients each sending one request after another,
    to /v1's classify or (``protocol="v2"``) the Open Inference Protocol's infer."""
    v2_bodies = [v2_infer_body(data, params) for data in images] if protocol == "v2" else []
    latencies: list[float] = []
    views = 0
    errors = 0

    async def client(worker: int, stop_at: float, http: httpx.AsyncClient) -> None:
        nonlocal views, errors
        i = worker
        while time.perf_counter() < stop_at:
            index = i % len(images)
            i += concurrency
            t0 = time.perf_counter()
            if v2_bodies:
                body, headers = v2_bodies[index]
                res = await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            else:
                res = await http.post(f"/v1/models/{model}/classify", params=params,
                                      content=images[index],
                                      headers={"content-type": "image/jpeg"})  # fmt: skip
            if res.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            views += _v2_views(res) if v2_bodies else res.json()["results"][0]["views"]

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
