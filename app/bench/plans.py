"""Execution plans in ``midserve bench``: raw forwards per backend and dtype, and the tuned
engine's pipeline run with the concurrency it serves with."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from app.pipeline import ImagePipeline
from app.repository import LoadedModel
from app.request import ClassifyRequest, check_level
from app.runtime.backends import backend_missing
from app.runtime.engine import Engine
from app.runtime.int8 import int8_missing
from app.runtime.plan import EngineOptions
from app.runtime.tuning.tuner import measure, tuned_engine
from app.tta.views import ViewSpec

PATHS = [("torch", "float32"), ("torch", "bfloat16"), ("openvino", "float32"),
         ("openvino", "bfloat16")]  # fmt: skip


def cannot_run(engine: Engine) -> str | None:
    """Why ``engine`` fails a one-view forward on this machine (None: it runs). Some CPUs
    lack what a path needs (oneDNN's fused bf16 convolutions want AVX-512 or AVX-NE-CONVERT);
    a timing thread that raised would leave the others waiting for it."""
    size = engine.cfg.input_size
    try:
        engine.run_views(torch.zeros(1, 3, size, size, device=engine.device))
    except RuntimeError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def raw_by_backend(model: LoadedModel, chunk: int, duration_s: float, rounds: int = 3,
                   team: tuple[int, int] = (1, 1)) -> dict[str, float]:  # fmt: skip
    """Views/s of the served network alone per backend and dtype, OpenVINO int8 included
    where the model's entry has one this CPU runs; ``team`` (workers, threads) forwarding at
    once, one forward on one thread by default; interleaved rounds, medians."""
    engines: dict[str, Engine] = {}
    int8 = [("openvino", "int8")] if int8_missing(model) is None else []
    for backend, dtype in PATHS + int8:
        if backend_missing(backend) or (dtype == "bfloat16" and model.device.type != "cpu"):
            continue
        options = EngineOptions(dtype=dtype)  # type: ignore[arg-type]
        workers, threads = team
        plan = dataclasses.replace(options.forward_plan(model.device.type), backend=backend,
                                   workers=workers, threads=threads, chunk_views=chunk)  # fmt: skip
        engine = Engine(model, options, plan)
        if engine.plan.backend == backend and cannot_run(engine) is None:
            engines[f"{backend}_{dtype}"] = engine
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            runs[name].append(measure(engine, engine.plan, duration_s / rounds))
    return {name: statistics.median(v) for name, v in runs.items()}


def tuned(model: LoadedModel, seconds: float, cache_dir: Path | None) -> Engine:
    options = EngineOptions(tune=True, tune_seconds=seconds, tune_cache_dir=cache_dir)
    return tuned_engine(model, options)


def parallel_throughput(engine: Engine, images: list[bytes], spec: ViewSpec, level: str,
                        duration_s: float) -> float:  # fmt: skip
    """decode -> views -> forward -> average on real JPEGs, ``plan.workers`` images at once
    (each thread with the plan's torch threads): how the tuned plan serves."""
    plan, pipeline = engine.plan, ImagePipeline(engine)
    counts = [0] * plan.workers
    stop_at = time.perf_counter() + duration_s

    def work(w: int) -> None:
        if plan.threads:
            torch.set_num_threads(plan.threads)
        i = w
        while time.perf_counter() < stop_at:
            request = ClassifyRequest(spec, check_level(level), top_k=5, seed=i)
            counts[w] += len(pipeline.classify(images[i % len(images)], request).views)
            i += plan.workers

    before = torch.get_num_threads()
    pipeline.classify(images[0], ClassifyRequest(spec, check_level(level), top_k=5))  # warm
    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(plan.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(before)
    return sum(counts) / (time.perf_counter() - start)


def tuning_summary(engine: Engine) -> dict[str, Any]:
    report = engine.tuning
    return {"tuned_plan": engine.plan.describe(),
            "tuning_source": report.source if report else "off",
            "tuning_table": report.table().splitlines() if report else []}  # fmt: skip
