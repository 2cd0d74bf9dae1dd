"""``midserve bench``: throughput against the hardware bound and the naive pipeline.

Everything is measured in ONE run so the ratios hold on a noisy machine. Prints a table and
one final JSON line. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import default_models_dir
from app.engine import Engine, pick_device
from app.options import EngineOptions
from app.pipeline import ImagePipeline
from app.repository import LoadedModel, ModelRepository
from app.request import ClassifyRequest, check_level
from app.tta.views import ViewSpec, default_policy, parse_view_spec

ROUNDS = 3
SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "imagenet-samples"


def _timed_loop(fn: Callable[[], int], duration_s: float, min_iters: int = 3) -> float:
    """Units per second of ``fn`` (which returns the units it did), after one warm-up call."""
    fn()
    done, iters, start = 0, 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < duration_s:
        done += fn()
        iters += 1
    return done / (time.perf_counter() - start)


def gemm_gflops(duration_s: float, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """Matmul throughput now, on this device (the compute bound's numerator)."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def one() -> int:
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1

    return 2 * n**3 / 1e9 * _timed_loop(one, duration_s)


def model_gflops_per_view(model: LoadedModel) -> float:
    """Forward FLOPs of one view, counted by torch.utils.flop_counter (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.cfg.input_size
    x = torch.zeros(1, 3, size, size, device=model.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.head(model.features(x))
    return counter.get_total_flops() / 1e9


def raw_forward(engine: Engine, chunk: int, duration_s: float, views: int = 10) -> float:
    """The network alone on ready tensors: views/s at a given chunk size."""
    size = engine.cfg.input_size
    x = torch.randn(views, 3, size, size, device=engine.device)
    saved = engine.chunk_views
    engine.chunk_views = chunk
    try:
        return _timed_loop(lambda: engine.run_views(x).logits.shape[0], duration_s)
    finally:
        engine.chunk_views = saved


def engine_throughput(engine: Engine, images: list[bytes], spec: ViewSpec, level: str,
                      duration_s: float) -> float:  # fmt: skip
    """decode -> resize -> views -> forward -> average, on real JPEG bytes."""
    state = {"i": 0}
    pipeline = ImagePipeline(engine)

    def one() -> int:
        data = images[state["i"] % len(images)]
        state["i"] += 1
        request = ClassifyRequest(spec, check_level(level), top_k=5, seed=state["i"])
        return len(pipeline.classify(data, request).views)

    return _timed_loop(one, duration_s)


def naive_throughput(model: LoadedModel, images: list[bytes], views: int,
                     duration_s: float) -> float:  # fmt: skip
    """What a user writes with torchvision / ttach habits: per view a PIL crop, ToTensor,
    Normalize and one forward; NCHW; views are the 5 fixed crops and their mirrors."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    cfg = model.cfg
    net = model.network.to(memory_format=torch.contiguous_format)
    resize = T.Resize(cfg.resize_size, interpolation=T.InterpolationMode(cfg.interpolation))
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    state = {"i": 0}

    def one() -> int:
        img = Image.open(io.BytesIO(images[state["i"] % len(images)])).convert("RGB")
        state["i"] += 1
        img = resize(img)
        crops = list(F.five_crop(img, cfg.input_size))
        crops += [F.hflip(c) for c in crops]
        probs = []
        with torch.no_grad():
            for crop in crops[:views]:
                probs.append(torch.softmax(net(to_tensor(crop).unsqueeze(0)), -1))
        torch.stack(probs).mean(0)
        return min(views, len(crops))

    try:
        return _timed_loop(one, duration_s)
    finally:
        net.to(memory_format=torch.channels_last)


def dtype_agreement(model: LoadedModel, images: list[bytes], spec: ViewSpec, dtype: str,
                    chunk: int) -> dict[str, float]:  # fmt: skip
    """Top-1 agreement and max probability difference of the served path (``dtype``, fused
    network) against the plain float32 network."""
    served = EngineOptions(dtype=dtype, chunk_views=chunk)  # type: ignore[arg-type]
    ref = ImagePipeline(Engine(model, served.with_changes(dtype="float32", fuse=False)))
    fast = ImagePipeline(Engine(model, served))
    agree, max_diff = 0, 0.0
    for i, data in enumerate(images):
        a = ref.classify(data, ClassifyRequest(spec, top_k=1, seed=i))
        b = fast.classify(data, ClassifyRequest(spec, top_k=1, seed=i))
        agree += a.top[0].index == b.top[0].index
        max_diff = max(max_diff, float((a.probs - b.probs).abs().max()))
    return {"images": len(images), "top1_agreement": agree / len(images),
            "max_prob_diff": max_diff}  # fmt: skip


@dataclass
class HttpRound:
    views: int
    latencies: list[float]
    errors: int
    elapsed: float


def http_load(base: str, model: str, images: list[bytes], params: dict[str, Any],
              concurrency: int, duration_s: float, warmup_s: float = 1.0) -> HttpRound:  # fmt: skip
    """Closed-loop load: ``concurrency`` clients each sending one request after another."""
    import httpx

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


def _server(models_dir: Path, model: str, env: dict[str, str]) -> tuple[Any, str]:
    """Start ``midserve serve`` in a subprocess; return (process, base URL) once ready."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(Path(__file__).resolve().parent.parent)
    full_env = {**os.environ, "PYTHONPATH": root, **env}
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


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    models_dir = args.models_dir or default_models_dir()
    model = ModelRepository(models_dir).load(args.model, device)
    spec = (
        default_policy(args.views) if args.views_spec is None else parse_view_spec(args.views_spec)
    )
    files = sorted(Path(args.data).glob("*")) if args.data else []
    images = [f.read_bytes() for f in files if f.is_file()][: args.images]
    if not images:
        raise SystemExit(f"no images in {args.data!r}: pass --data with real photos")
    d = args.duration
    out: dict[str, Any] = {"model": args.model, "device": str(device), "dtype": args.dtype,
                           "views": spec.total, "spec": str(spec), "level": args.level,
                           "threads": torch.get_num_threads()}  # fmt: skip
    rows: list[tuple[str, str]] = []

    out["gemm_gflops"] = gemm_gflops(d, device)
    out["model_gflops_per_view"] = model_gflops_per_view(model)
    out["bound_views_per_s"] = out["gemm_gflops"] / out["model_gflops_per_view"]

    options = EngineOptions(dtype=args.dtype, chunk_views=args.chunk_views, fuse=not args.no_fuse)
    engine = Engine(model, options)
    out["dtype"] = engine.dtype_name
    out["fusion"] = engine.fusion.describe() if engine.fusion else "off"
    chunks = sorted({1, 2, 4, 8, 10, 16, spec.total, engine.chunk_views})
    # rounds interleaved, median per chunk: one noisy second cannot pick the chunk
    chunk_rounds: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(3):
        for c in chunks:
            chunk_rounds[c].append(raw_forward(engine, c, d / 4, views=max(spec.total, c)))
    raw = {c: statistics.median(v) for c, v in chunk_rounds.items()}
    best_chunk = max(raw, key=lambda c: raw[c])
    out["raw_forward_by_chunk"] = {str(c): round(v, 2) for c, v in raw.items()}
    out["raw_forward_views_per_s"] = raw[best_chunk]
    out["best_chunk"] = best_chunk
    engine.chunk_views = args.chunk_views or best_chunk
    if args.compile:
        out["eager_engine_views_per_s"] = engine_throughput(engine, images, spec, args.level, d)
        engine = Engine(model, options.with_changes(chunk_views=engine.chunk_views, compile=True))
        size = model.cfg.input_size
        t0 = time.perf_counter()
        engine.run_views(torch.zeros(engine.chunk_views, 3, size, size, device=device))
        out["compile_warmup_s"] = time.perf_counter() - t0
        out["raw_forward_views_per_s"] = raw_forward(engine, engine.chunk_views, d)
    # interleaved rounds, medians: the machine's speed drifts between one phase and the next
    # the same engine on the network as loaded: what the inference rewrites buy
    served = options.with_changes(dtype=engine.dtype_name, chunk_views=engine.chunk_views)
    unfused = None if args.no_fuse else Engine(model, served.with_changes(fuse=False))
    engine_runs, naive_runs, unfused_runs = [], [], []
    for _ in range(ROUNDS):
        engine_runs.append(engine_throughput(engine, images, spec, args.level, d / ROUNDS))
        naive_runs.append(naive_throughput(model, images, min(spec.total, 10), d / ROUNDS))
        if unfused is not None:
            unfused_runs.append(engine_throughput(unfused, images, spec, args.level, d / ROUNDS))
    out["engine_views_per_s"] = statistics.median(engine_runs)
    out["naive_views_per_s"] = statistics.median(naive_runs)
    if unfused_runs:
        out["engine_unfused_views_per_s"] = statistics.median(unfused_runs)
        out["fusion_speedup"] = out["engine_views_per_s"] / out["engine_unfused_views_per_s"]
    out["efficiency"] = out["engine_views_per_s"] / out["bound_views_per_s"]
    if engine.dtype != torch.float32:
        # fp32 is not the ceiling of a bf16/fp16 forward: its own matmul rate is
        gemm = gemm_gflops(d, device, engine.dtype)
        out[f"gemm_gflops_{engine.dtype_name}"] = gemm
        out[f"bound_views_per_s_{engine.dtype_name}"] = gemm / out["model_gflops_per_view"]
        out[f"efficiency_{engine.dtype_name}"] = (
            out["engine_views_per_s"] / out[f"bound_views_per_s_{engine.dtype_name}"]
        )
    out["speedup_vs_naive"] = out["engine_views_per_s"] / out["naive_views_per_s"]

    if engine.dtype_name != "float32":
        # the same pipeline in float32, to state what the faster dtype buys
        fp32 = Engine(model, served.with_changes(dtype="float32"))
        out["engine_float32_views_per_s"] = engine_throughput(fp32, images, spec, args.level, d)
        out["agreement_vs_float32"] = dtype_agreement(
            model, images, spec, engine.dtype_name, engine.chunk_views
        )
    elif args.check_dtype:
        out[f"{args.check_dtype}_agreement"] = dtype_agreement(
            model, images, spec, args.check_dtype, engine.chunk_views
        )

    if not args.no_http:
        env = {"MIDSERVE_DEVICE": str(device), "MIDSERVE_DTYPE": out["dtype"],
               "MIDSERVE_COMPILE": "true" if args.compile else "false",
               "MIDSERVE_FUSE": "false" if args.no_fuse else "true"}  # fmt: skip
        params = {"views": str(spec), "level": args.level}
        # batched: the server's own defaults; unbatched: requests never share a forward
        settings = {"batched": {},
                    "unbatched": {"MIDSERVE_MAX_BATCH_VIEWS": str(spec.total),
                                  "MIDSERVE_MAX_WAIT_MS": "0"}}  # fmt: skip
        modes = ["batched", "unbatched"] if args.http_matrix else ["batched"]
        levels = [1, 8] if args.http_matrix else [8]
        servers: dict[str, tuple[Any, str]] = {}
        rounds: dict[str, list[HttpRound]] = {f"http_{m}_c{c}": [] for m in modes for c in levels}
        engine_rounds: list[float] = []
        try:
            for mode in modes:
                servers[mode] = _server(models_dir, args.model, {**env, **settings[mode]})
            # The machine's speed drifts from minute to minute: interleave short rounds of the
            # in-process engine and every HTTP setting, so each ratio compares like with like.
            for r in range(ROUNDS):
                engine_rounds.append(
                    engine_throughput(engine, images, spec, args.level, d / ROUNDS)
                )
                for mode in modes:
                    for c in levels:
                        rounds[f"http_{mode}_c{c}"].append(
                            http_load(servers[mode][1], args.model, images, params, c,
                                      d / ROUNDS, warmup_s=1.0 if r == 0 else 0.2)
                        )  # fmt: skip
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        for key, value in rounds.items():
            out[key] = {k: round(v, 2) for k, v in summarize_rounds(value).items()}
        out["engine_views_per_s_beside_http"] = statistics.median(engine_rounds)
        c8 = out["http_batched_c8"]
        out["http_views_per_s_c8"] = c8["views_per_s"]
        out["http_p50_ms_c8"], out["http_p99_ms_c8"] = c8["p50_ms"], c8["p99_ms"]
        out["http_overhead"] = 1.0 - c8["views_per_s"] / out["engine_views_per_s_beside_http"]

    for key, value in out.items():
        if isinstance(value, float):
            rows.append((key, f"{value:.3f}"))
        elif not isinstance(value, dict):
            rows.append((key, str(value)))
        else:
            rows.append((key, json.dumps(value)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=sys.stderr)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def cmd_bench(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per load request
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(args)
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput vs the hardware bound and the naive pipeline")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--views", type=int, default=10, help="crop count (default policy)")
    p.add_argument("--views-spec", default=None, help="explicit view mix instead of --views")
    p.add_argument("--level", default="softmax", choices=["feature", "logit", "softmax"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--chunk-views", type=int, default=0, help="0 = the best measured chunk")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    p.add_argument("--data", default=str(SAMPLES), help="folder of real photos")
    p.add_argument("--images", type=int, default=100)
    p.add_argument(
        "--check-dtype",
        default="bfloat16",
        choices=["", "bfloat16", "float16"],
        help="also report this dtype's agreement with float32 on the photos",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--no-fuse", action="store_true", help="serve the network as loaded, "
                   "without folded batch norms and static padding")  # fmt: skip
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurements")
    p.add_argument(
        "--http-matrix",
        action="store_true",
        help="HTTP at concurrency 1 and 8, batching on and off",
    )
    p.set_defaults(handler=cmd_bench)
