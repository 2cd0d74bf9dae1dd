"""The floor under the work around the network: the smallest prototype doing the same work
as the served edge and preparation, on this machine.

    PYTHONPATH=. .venv/bin/python -m studies.edge_floor [--photos ../shared/data/imagenet-samples]

1. Edge: a bare Starlette app on uvicorn + httptools + uvloop (the served HTTP stack) that
   reads a raw JPEG body and answers a 5-entry JSON (orjson), loaded by ``hey -c 8``; the
   server process's CPU per request from /proc (app/bench/proc.py).
2. Preparation: simplejpeg's decode, torch's antialiased bicubic resize to a 256 shorter
   side and a 224 center crop, one thread, every photo of the folder; CPU per photo.

Compare with ``midserve bench --cpu-budget``: its ``edge_only_ms`` against (1), its center
crop's ``prep`` against (2). ``studies/request_floor.py`` prototypes the whole request.
docs/benchmarks.md has one run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import orjson
import simplejpeg
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.bench.load_client import run_hey
from app.bench.proc import snapshot
from app.serve_process import HOST, free_port, running_process


async def _classify(request: Request) -> Response:
    body = await request.body()
    answer = {"model": "floor", "bytes": len(body), "top": [1, 2, 3], "prob": 0.5, "ok": True}
    return Response(orjson.dumps(answer), media_type="application/json")


async def _live(_: Request) -> Response:
    return Response(b"ok")


app = Starlette(routes=[Route("/classify", _classify, methods=["POST"]), Route("/healthz", _live)])


def edge_floor(photo: Path, seconds: float) -> float:
    """ms of server CPU per request of the bare app, loaded by hey at c8 for ``seconds``."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "studies.edge_floor:app", "--host", HOST,
           "--port", str(port), "--http", "httptools", "--loop", "uvloop",
           "--log-level", "warning", "--no-access-log"]  # fmt: skip
    url = f"http://{HOST}:{port}/classify"
    with running_process(cmd, f"http://{HOST}:{port}/healthz", name="floor app",
                         ready_timeout_s=30) as proc:  # fmt: skip
        run_hey(url, photo, 8, 1.0)  # warm-up, not counted
        before = snapshot(proc.pid).total_s
        run = run_hey(url, photo, 8, seconds)
        return 1000 * (snapshot(proc.pid).total_s - before) / max(1, run.ok + run.errors)


def prepare(data: bytes) -> torch.Tensor:
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    h, w = pixels.shape[:2]
    k = 256 / min(h, w)
    chw = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)  # channels_last
    resized = torch.nn.functional.interpolate(
        chw, size=(round(h * k), round(w * k)), mode="bicubic", antialias=True
    )
    y, x = (resized.shape[2] - 224) // 2, (resized.shape[3] - 224) // 2
    return resized[0, :, y : y + 224, x : x + 224].permute(1, 2, 0).contiguous()


def preparation_floor(photos: list[bytes], rounds: int = 3) -> tuple[float, float]:
    """(ms per photo prepared, ms per photo decoded), thread CPU, the best round."""
    torch.set_num_threads(1)
    for data in photos:
        prepare(data)
    best_prep = best_decode = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        for data in photos:
            prepare(data)
        t1 = time.thread_time()
        for data in photos:
            simplejpeg.decode_jpeg(data, colorspace="RGB")
        t2 = time.thread_time()
        best_prep = min(best_prep, (t1 - t0) / len(photos))
        best_decode = min(best_decode, (t2 - t1) / len(photos))
    return 1000 * best_prep, 1000 * best_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/imagenet-samples"))
    parser.add_argument("--seconds", type=float, default=10.0, help="of load for the edge")
    args = parser.parse_args()
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise SystemExit(f"no JPEG photos in {args.photos}")
    prep_ms, decode_ms = preparation_floor([f.read_bytes() for f in files])
    print(f"preparation floor: {prep_ms:.3f} ms a photo (decode alone {decode_ms:.3f} ms), "
          f"{len(files)} photos, one thread")  # fmt: skip
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed (apt-get install hey): no edge floor")
    edge_ms = edge_floor(files[0], args.seconds)
    print(f"edge floor: {edge_ms:.3f} ms of server CPU a request ({files[0].name}, c8)")


if __name__ == "__main__":
    main()
