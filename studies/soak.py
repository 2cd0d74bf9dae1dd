"""Soak: many requests with mixed image sizes, formats and view counts against a real server.

Reports the server's resident memory (start, after the first thousand, end), errors, and
latency percentiles of the first and last thousand requests; and, per window of requests,
what could make the later windows slower: the window's mix (each latency divided by the
median of its own image and crop count over the run, so a window that drew more large
images is not read as a slower server), the server's memory and /metrics size, and the
share of the CPU that other processes took while it ran (a shared host). Not part of ``make test``
(tests/reliability/test_soak.py runs it with 300 requests).

    PYTHONPATH=. python -m studies.soak --requests 10000 --concurrency 8
    PYTHONPATH=. python -m studies.soak --model tf_efficientnet_lite0 --models-dir models

The server runs on the CPU with one thread per forward, float32 and no load-time tuning
unless the environment sets MIDSERVE_DEVICE, MIDSERVE_THREADS, MIDSERVE_DTYPE or
MIDSERVE_TUNE; every other MIDSERVE_* variable of the environment reaches it as well.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from app.serve_process import PROJECT_ROOT, serve_process

# the server's settings unless the environment sets them
SERVER_DEFAULTS = {
    "MIDSERVE_DEVICE": "cpu",
    "MIDSERVE_THREADS": "1",
    "MIDSERVE_DTYPE": "float32",
    "MIDSERVE_TUNE": "false",
}
SIZES = [(32, 32), (64, 48), (120, 90), (200, 300), (320, 240), (640, 480), (1024, 768)]
FORMATS = ["PNG", "JPEG"]
CROPS = [1, 2, 3, 5, 10, 20]
CPUS = psutil.cpu_count() or 1


@dataclass
class SoakResult:
    requests: int
    concurrency: int
    model: str
    wall_s: float
    statuses: dict[str, int]
    errors: int
    rss_mb: dict[str, float]
    rss_growth_mb: float  # end minus after the first thousand (warm-up excluded)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    windows: list[dict[str, float]] = field(default_factory=list)


def _percentiles(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 2)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(s[-1], 2),
            "mean": round(statistics.fmean(s), 2)}  # fmt: skip


def noise_image(width: int, height: int, fmt: str, seed: int) -> bytes:
    """A random-noise RGB image encoded in ``fmt``."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def write_tiny_model(root: Path, name: str) -> None:
    """A tiny real network (timm's test_efficientnet, 10 classes, 64 px views) with seeded
    random weights, as a model-repository entry under ``root``."""
    import timm
    import torch

    from app.jobs.model_writer import write_model_entry
    from app.model_config import ModelConfig, WeightsSource

    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    cfg = ModelConfig(
        name=name,
        arch="test_efficientnet",
        weights=WeightsSource(kind="file", path="weights.safetensors"),
        num_classes=10,
        input_size=64,
        crop_pct=0.8,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        labels="none",
        default_views="fixed:5,mfixed:5",
    )
    write_model_entry(net, cfg, cfg, root / name)


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    defaults = {k: os.environ.get(k, v) for k, v in SERVER_DEFAULTS.items()}
    return {**defaults, **(env or {})}


def _payloads(count: int = 42, seed: int = 0) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        fmt = FORMATS[(i // len(SIZES)) % len(FORMATS)]
        out.append((noise_image(w, h, fmt, seed=int(rng.integers(1 << 30))), fmt.lower()))
    return out


@dataclass
class _Sample:
    """What the host and the server looked like when a window of requests ended."""

    done: int
    wall_s: float
    host_busy_s: float  # CPU time of every process on the host
    server_s: float  # CPU time of the server
    client_s: float  # CPU time of this load generator
    rss_mb: float
    metrics_lines: int


def _host_busy_s() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def _sample(
    client: httpx.AsyncClient, done: int, server: psutil.Process, me: psutil.Process
) -> _Sample:
    metrics = await client.get("/metrics")
    return _Sample(
        done=done,
        wall_s=time.perf_counter(),
        host_busy_s=_host_busy_s(),
        server_s=_cpu_s(server),
        client_s=_cpu_s(me),
        rss_mb=server.memory_info().rss / 2**20,
        metrics_lines=metrics.text.count("\n"),
    )


def _plan(n: int, payloads: int, reverse: bool) -> list[tuple[int, int]]:
    """(payload, crops) of each request; ``reverse``: the same requests, last first (a
    drift that follows the plan, not the clock, is the mix of requests)."""
    rng = np.random.default_rng(1)
    plan = [(int(rng.integers(payloads)), CROPS[int(rng.integers(len(CROPS)))])
            for _ in range(n)]  # fmt: skip
    return plan[::-1] if reverse else plan


async def _drive(
    base: str,
    model: str,
    n: int,
    concurrency: int,
    pid: int,
    window: int,
    reverse: bool = False,
) -> tuple[list[float], list[int], dict[str, float], list[tuple[int, int]], list[_Sample]]:
    payloads = _payloads()
    plan = _plan(n, len(payloads), reverse)
    latencies = [0.0] * n
    statuses = [0] * n
    proc = psutil.Process(pid)
    me = psutil.Process()
    rss = {"start": proc.memory_info().rss / 2**20}
    samples: list[_Sample] = []
    next_index = 0
    done = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, done
        while next_index < n:
            i = next_index
            next_index += 1
            data, fmt = payloads[plan[i][0]]
            t0 = time.perf_counter()
            try:
                res = await client.post(
                    f"/v1/models/{model}/classify",
                    params={"crops": plan[i][1], "seed": i},
                    content=data,
                    headers={"content-type": f"image/{fmt}"},
                )
                statuses[i] = res.status_code
                if res.status_code == 200 and "error" in res.json()["results"][0]:
                    statuses[i] = 299  # a per-image error inside a 200: count it as an error
            except httpx.HTTPError:
                statuses[i] = -1
            latencies[i] = (time.perf_counter() - t0) * 1000.0
            done += 1
            if done == window:
                rss["after_first_window"] = proc.memory_info().rss / 2**20
            if done % window == 0:
                samples.append(await _sample(probe, done, proc, me))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client, \
            httpx.AsyncClient(base_url=base, timeout=120) as probe:  # fmt: skip
        samples.append(await _sample(probe, 0, proc, me))
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    rss["end"] = proc.memory_info().rss / 2**20
    rss.setdefault("after_first_window", rss["end"])
    return latencies, statuses, rss, plan, samples


def window_report(
    latencies: list[float], plan: list[tuple[int, int]], samples: list[_Sample], window: int
) -> list[dict[str, float]]:
    """Per window of ``window`` requests (in the order sent): p50 and p99 as measured, p99
    of each latency over the median of its own (image, crops) over the run, and what the
    host and server did while the window ran."""
    by_kind: dict[tuple[int, int], list[float]] = {}
    for ms, kind in zip(latencies, plan, strict=True):
        by_kind.setdefault(kind, []).append(ms)
    typical = {k: statistics.median(v) for k, v in by_kind.items()}
    relative = [ms / typical[k] for ms, k in zip(latencies, plan, strict=True)]
    out = []
    for a, b in itertools.pairwise(samples):
        lo, hi = a.done, b.done
        wall = b.wall_s - a.wall_s
        server, client = b.server_s - a.server_s, b.client_s - a.client_s
        others = (b.host_busy_s - a.host_busy_s) - server - client
        measured = _percentiles(latencies[lo:hi])
        out.append({
            "requests": hi,
            "p50_ms": measured["p50"],
            "p99_ms": measured["p99"],
            "p99_of_typical": round(_percentiles(relative[lo:hi])["p99"], 3),
            "typical_ms_of_mix": round(statistics.fmean(typical[k] for k in plan[lo:hi]), 2),
            "server_cpu_ms_per_request": round(1000 * server / (hi - lo), 2),
            "client_cpu_ms_per_request": round(1000 * client / (hi - lo), 2),
            "other_processes_cpu_share": round(max(0.0, others) / (wall * CPUS), 3),
            "rss_mb": round(b.rss_mb, 1),
            "metrics_lines": b.metrics_lines,
        })  # fmt: skip
    return out


def run_soak(
    requests: int = 10_000,
    concurrency: int = 8,
    model: str = "tiny",
    models_dir: Path | None = None,
    window: int = 1000,
    env: dict[str, str] | None = None,
    reverse: bool = False,
) -> SoakResult:
    with tempfile.TemporaryDirectory() as tmp:
        if models_dir is None:
            models_dir = Path(tmp)
            write_tiny_model(models_dir, model)
        window = min(window, max(1, requests // 2))
        with serve_process(models_dir, model, env=server_env(env)) as (base, proc):
            t0 = time.perf_counter()
            lat, statuses, rss, plan, samples = asyncio.run(
                _drive(base, model, requests, concurrency, proc.pid, window, reverse)
            )
            wall = time.perf_counter() - t0
    counts = Counter(str(s) for s in statuses)
    return SoakResult(
        requests=requests,
        concurrency=concurrency,
        model=model,
        wall_s=round(wall, 1),
        statuses=dict(counts),
        errors=requests - counts.get("200", 0),
        rss_mb={k: round(v, 1) for k, v in rss.items()},
        rss_growth_mb=round(rss["end"] - rss["after_first_window"], 1),
        latency_ms={
            "first": _percentiles(lat[:window]),
            "last": _percentiles(lat[-window:]),
            "all": _percentiles(lat),
        },  # fmt: skip
        windows=window_report(lat, plan, samples, window),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", default="tiny", help="'tiny' builds a tiny model in a temp dir")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--window", type=int, default=1000, help="requests in 'first' and 'last'")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="send the same requests in reverse order (a control for the mix)",
    )
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "artifacts" / "soak.json")
    args = p.parse_args()
    result = run_soak(args.requests, args.concurrency, args.model, args.models_dir, args.window,
                      reverse=args.reverse)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(result), indent=2))
    first, last = result.latency_ms["first"], result.latency_ms["last"]
    print(f"{result.requests} requests, concurrency {result.concurrency}, model {result.model}, "
          f"{result.wall_s} s ({result.requests / result.wall_s:.0f} req/s)")  # fmt: skip
    print(f"statuses {result.statuses}; errors {result.errors}")
    print(f"RSS MB {result.rss_mb}; growth after warm-up {result.rss_growth_mb} MB")
    print(f"latency ms first {first}\nlatency ms last  {last}")
    keys = list(result.windows[0]) if result.windows else []
    print(" ".join(f"{k:>14}" for k in keys))
    for w in result.windows:
        print(" ".join(f"{w[k]:>14}" for k in keys))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
