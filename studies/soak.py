"""Soak: many requests with mixed image sizes, formats and view counts against a real server.

Reports the server's resident memory (start, after the first thousand, end), errors, and
latency percentiles of the first and last thousand requests. Not part of ``make test``
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


async def _drive(
    base: str, model: str, n: int, concurrency: int, pid: int, window: int
) -> tuple[list[float], list[int], dict[str, float]]:
    payloads = _payloads()
    rng = np.random.default_rng(1)
    plan = [(int(rng.integers(len(payloads))), CROPS[int(rng.integers(len(CROPS)))])
            for _ in range(n)]  # fmt: skip
    latencies = [0.0] * n
    statuses = [0] * n
    proc = psutil.Process(pid)
    rss = {"start": proc.memory_info().rss / 2**20}
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

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    rss["end"] = proc.memory_info().rss / 2**20
    rss.setdefault("after_first_window", rss["end"])
    return latencies, statuses, rss


def run_soak(
    requests: int = 10_000,
    concurrency: int = 8,
    model: str = "tiny",
    models_dir: Path | None = None,
    window: int = 1000,
    env: dict[str, str] | None = None,
) -> SoakResult:
    with tempfile.TemporaryDirectory() as tmp:
        if models_dir is None:
            models_dir = Path(tmp)
            write_tiny_model(models_dir, model)
        window = min(window, max(1, requests // 2))
        with serve_process(models_dir, model, env=server_env(env)) as (base, proc):
            t0 = time.perf_counter()
            lat, statuses, rss = asyncio.run(
                _drive(base, model, requests, concurrency, proc.pid, window)
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
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", default="tiny", help="'tiny' builds a tiny model in a temp dir")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--window", type=int, default=1000, help="requests in 'first' and 'last'")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "artifacts" / "soak.json")
    args = p.parse_args()
    result = run_soak(args.requests, args.concurrency, args.model, args.models_dir, args.window)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(result), indent=2))
    first, last = result.latency_ms["first"], result.latency_ms["last"]
    print(f"{result.requests} requests, concurrency {result.concurrency}, model {result.model}, "
          f"{result.wall_s} s ({result.requests / result.wall_s:.0f} req/s)")  # fmt: skip
    print(f"statuses {result.statuses}; errors {result.errors}")
    print(f"RSS MB {result.rss_mb}; growth after warm-up {result.rss_growth_mb} MB")
    print(f"latency ms first {first}\nlatency ms last  {last}")
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
