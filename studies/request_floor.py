"""The floor of a whole center-crop request around the network: the smallest server that
does the served work, beside the served one, measured the way ``midserve bench
--cpu-budget`` measures ours.

    PYTHONPATH=. .venv/bin/python -m studies.request_floor [--seconds 8] [--rounds 2]
        [--photos ../shared/data/imagenet-samples] [--model tf_efficientnet_lite0] [--region]
        [--served-env MIDSERVE_PREPROCESS_WORKERS=1]

The prototype, on the served HTTP stack (uvicorn + httptools + uvloop, a bare Starlette
route): the body read whole; one hand-off to a preparation thread that decodes
(simplejpeg), resizes (torch's antialiased resize, the model's interpolation) and cuts the
center crop, then puts the view straight on a forward queue (no hand-off back to the loop
between preparation and forward); forward threads, as many as the served plan's workers,
each take what is queued (up to the plan's views per forward), run the same tuned network
(``Engine.run_views``), rank the top 5 with numpy and hand each answer back to the loop
once; orjson writes a 5-class answer. No batcher deadlines, faults, metrics, view plan,
staged policies or limits: what is left is work no design can drop. ``--region`` adds a
server of the same prototype decoding only the center crop's box (libjpeg-turbo's cropped
decode, ``studies/region_decode.py``): the floor outside simplejpeg's whole decode.
``--layers`` adds two: the prototype inside the served HTTP protocol class, and inside it
and the served ASGI middleware, so what the served event loop spends beyond the floor's
splits into those layers and the served route itself. ``--served-env NAME=VALUE`` (repeatable)
adds a second served server with those settings, so a setting is measured paired with the
served defaults.

The servers run at once, idle in turn: each window loads one of them at c8 with ``hey``
posting one of the bench's three representative photos, the windows interleaved with the
raw forward's own timing (as the bench does), so drift on a shared machine reaches both.
Reported per server as the bench reports it: CPU per request from /proc less its forward
threads (``outside_network_ms``) and less the network's own CPU per view
(``outside_network_ms_by_forward_cost``), by thread group, and images/s over the
forward-only limit. docs/benchmarks.md has one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.api.http_protocol import protocol_class
from app.api.middleware import RequestMiddleware
from app.bench.cpu_budget import forward_cpu, representative
from app.bench.load_client import run_hey
from app.bench.proc import FORWARD, cpu_between, snapshot
from app.config import Settings, default_models_dir
from app.metrics import Metrics
from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions
from app.serve_process import HOST, free_port, running_process, serve_process
from app.threads import name_os_thread
from studies.region_decode import CenterCrop, RegionDecoder, build

MODEL_ENV = "FLOOR_MODEL"
REGION_ENV = "FLOOR_REGION_LIB"  # the cropped-decode helper: only the view's box decoded
LAYERS_ENV = "FLOOR_LAYERS"  # the served HTTP layers around the prototype's route
LAYERS = {"protocol": "floor + served protocol",
          "protocol+middleware": "floor + served protocol and middleware"}  # fmt: skip
Job = tuple[np.ndarray, asyncio.AbstractEventLoop, asyncio.Future[bytes]]


def tuned(model: str) -> Engine:
    """The model as the server runs it: the plan tuned for this machine (its cache)."""
    return load_engine(ModelRepository(default_models_dir()), model, EngineOptions(tune=True))


class FloorServer:
    """Preparation threads feed forward threads directly; one hand-off back per answer."""

    def __init__(self, engine: Engine, region: RegionDecoder | None = None) -> None:
        self.engine = engine
        cfg = engine.cfg
        self.center = CenterCrop(cfg.resize_size, cfg.input_size, cfg.interpolation)
        self.region = region
        self.labels = engine.model.labels.ids
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.prep = ThreadPoolExecutor(2, "preprocess", initializer=self._prep_thread)
        for i in range(engine.plan.workers):
            threading.Thread(target=self._forward_loop, args=(i,), daemon=True).start()

    @staticmethod
    def _prep_thread() -> None:
        name_os_thread("preprocess")
        torch.set_num_threads(1)

    def center_view(self, data: bytes) -> np.ndarray:
        if self.region is None:
            return self.center.whole(data)
        return self.center.boxed(data, self.region)

    def prepare_and_queue(self, data: bytes, loop: asyncio.AbstractEventLoop,
                          answer: asyncio.Future[bytes]) -> None:  # fmt: skip
        self.jobs.put((self.center_view(data), loop, answer))

    def _forward_loop(self, i: int) -> None:
        name_os_thread(f"forward-floor-{i}")
        if self.engine.plan.threads:
            torch.set_num_threads(self.engine.plan.threads)
        most = self.engine.chunk_views
        while True:
            batch = [self.jobs.get()]
            while len(batch) < most:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            views = torch.from_numpy(np.stack([v for v, _, _ in batch])).permute(0, 3, 1, 2)
            logits = self.engine.run_views(views).logits.numpy()
            for row, (_, loop, answer) in zip(logits, batch, strict=True):
                loop.call_soon_threadsafe(answer.set_result, self.answer(row))

    def answer(self, logits: np.ndarray) -> bytes:
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argpartition(-p, 5)[:5]
        top = top[np.argsort(-p[top])]
        return orjson.dumps({"top": [{"index": int(i), "synset": self.labels[i],
                                      "prob": float(p[i])} for i in top]})  # fmt: skip

    async def classify(self, request: Request) -> Response:
        data = await request.body()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        self.prep.submit(self.prepare_and_queue, data, loop, answer)
        return Response(await answer, media_type="application/json")


async def _live(_: Request) -> Response:
    return Response(b"ok")


def create_app() -> Starlette:
    """The prototype's app: the model loads in the server process only, on a thread named as
    the server names its loading thread, so OpenVINO's inference threads born there count
    as forward threads."""
    engines: list[Engine] = []

    def load_named() -> None:
        name_os_thread("net-floor")
        engines.append(tuned(os.environ.get(MODEL_ENV, "tf_efficientnet_lite0")))

    loader = threading.Thread(target=load_named)
    loader.start()
    loader.join()
    lib = os.environ.get(REGION_ENV)
    server = FloorServer(engines[0], RegionDecoder(Path(lib)) if lib else None)
    return Starlette(routes=[Route("/classify", server.classify, methods=["POST"]),
                             Route("/healthz", _live)])  # fmt: skip


@dataclass
class Target:
    """One server under load: where to post, its process, what its windows added up to."""

    url: str
    pid: int
    requests: int = 0
    elapsed_s: float = 0.0
    client_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def window(self, photo: Path, seconds: float) -> None:
        before = snapshot(self.pid)
        run = run_hey(self.url, photo, 8, seconds)
        if run.errors:
            raise SystemExit(f"{run.errors} requests to {self.url} failed on {photo.name}")
        for group, s in cpu_between(before, snapshot(self.pid)).items():
            self.cpu_s[group] = self.cpu_s.get(group, 0.0) + s
        self.requests += run.ok
        self.elapsed_s += run.elapsed_s
        self.client_s += run.cpu_s

    def report(self, views_per_s: float, cpu_per_view: float) -> dict[str, Any]:
        n = max(1, self.requests)
        total = self.cpu_s["total"]
        return {
            "images_per_s": round(n / self.elapsed_s, 2),
            "of_forward_limit": round(n / self.elapsed_s / views_per_s, 3),
            "server_ms": round(1000 * total / n, 3),
            "threads_ms": {
                g: round(1000 * s / n, 3) for g, s in self.cpu_s.items() if g != "total"
            },  # fmt: skip
            "outside_network_ms": round(1000 * (total - self.cpu_s.get(FORWARD, 0.0)) / n, 3),
            "outside_network_ms_by_forward_cost": round(1000 * (total / n - cpu_per_view), 3),
            "client_ms": round(1000 * self.client_s / n, 3),
        }


def serve(port: int) -> None:
    """The prototype on uvicorn + httptools + uvloop; with ``FLOOR_LAYERS``, inside the
    served protocol class (api/http_protocol.py) and the served ASGI middleware
    (api/middleware.py), each with the served default settings."""
    layers = os.environ.get(LAYERS_ENV, "")
    settings, metrics = Settings(), Metrics()
    app: Any = create_app()
    if "middleware" in layers:
        app = RequestMiddleware.from_settings(app, settings, metrics)
    http: Any = "httptools"
    if "protocol" in layers:
        http = protocol_class(settings.header_read_timeout_s, settings.max_connections, metrics)
    uvicorn.run(app, host=HOST, port=port, loop="uvloop", http=http, log_level="warning",
                access_log=False)  # fmt: skip


def floor_target(process: Any) -> Target:
    port = process.args[process.args.index("--serve") + 1]
    return Target(f"http://{HOST}:{port}/classify", process.pid)


def floor_server(model: str, region_lib: Path | None = None, layers: str = ""
                 ) -> contextlib.AbstractContextManager[Any]:  # fmt: skip
    port = free_port()
    env = {**os.environ, MODEL_ENV: model, LAYERS_ENV: layers,
           **({REGION_ENV: str(region_lib)} if region_lib else {})}  # fmt: skip
    cmd = [sys.executable, "-m", "studies.request_floor", "--serve", str(port)]
    return running_process(cmd, f"http://{HOST}:{port}/healthz", env=env, name="floor server",
                           ready_timeout_s=120)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/imagenet-samples"))
    parser.add_argument("--seconds", type=float, default=8.0, help="of load per window")
    parser.add_argument("--rounds", type=int, default=2, help="of every photo on each server")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument(
        "--region",
        action="store_true",
        help="another server: the floor decoding only the view's box (studies/region_decode.py)",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="two more: the floor inside the served protocol class, and inside it and the "
        "served middleware",
    )
    parser.add_argument(
        "--served-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a second served server with this setting (repeatable: all on that one server)",
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:  # one of the floor's servers, started by the run below
        serve(args.serve)
        return
    if shutil.which("hey") is None:
        raise SystemExit("hey is not installed (apt-get install hey): no load client")
    if bad := [pair for pair in args.served_env if "=" not in pair]:
        raise SystemExit(f"--served-env takes NAME=VALUE, got {', '.join(bad)}")
    served_env = dict(pair.split("=", 1) for pair in args.served_env)
    files = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        raise SystemExit(f"no JPEG photos in {args.photos}")
    picked = representative([(f.name, f.read_bytes()) for f in files], 3)
    engine = tuned(args.model)
    raw: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        photos = []
        for name, data in picked:
            (tmp / name).write_bytes(data)
            photos.append(tmp / name)
        floor = stack.enter_context(floor_server(args.model))
        region = (stack.enter_context(floor_server(args.model, build(tmp))) if args.region
                  else None)  # fmt: skip
        layered = {name: stack.enter_context(floor_server(args.model, layers=layers))
                   for layers, name in LAYERS.items() if args.layers}  # fmt: skip
        served_url = f"/v1/models/{args.model}/classify?views=center&seed=0"
        base, served = stack.enter_context(
            serve_process(default_models_dir(), args.model, ready_timeout_s=180)
        )
        variant = None
        if served_env:
            variant = stack.enter_context(
                serve_process(default_models_dir(), args.model, env=served_env, ready_timeout_s=180)
            )
        targets = {
            "floor": floor_target(floor),
            **({"floor, the box decoded": floor_target(region)} if region else {}),
            **{name: floor_target(process) for name, process in layered.items()},
            "served": Target(base + served_url, served.pid),
            **({f"served, {' '.join(args.served_env)}": Target(variant[0] + served_url,
                                                               variant[1].pid)}
               if variant else {}),
        }  # fmt: skip
        for target in targets.values():
            run_hey(target.url, photos[0], 8, 1.0)  # warm-up, not counted
        for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
            raw.append(forward_cpu(engine, args.seconds / 2))
            for photo in photos:
                for target in targets.values():
                    target.window(photo, args.seconds)
    views_per_s = sorted(v for v, _ in raw)[len(raw) // 2]
    cpu_per_view = sorted(c for _, c in raw)[len(raw) // 2]
    report = {
        "photos": [p for p, _ in picked],
        "raw_forward_views_per_s": round(views_per_s, 2),
        "forward_cpu_ms_per_view": round(1000 * cpu_per_view, 3),
        **{name: t.report(views_per_s, cpu_per_view) for name, t in targets.items()},
    }
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
