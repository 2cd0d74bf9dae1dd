"""The served models and the per-image request pipeline (no HTTP in here).

Models load in the background after start-up, so ``/healthz`` answers at once and
``/readyz`` says which models are still loading or failed; a model that fails to load does
not stop the others from serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from app.batching import ViewBatcher
from app.config import Settings
from app.engine import Engine, Prediction, PreparedViews, pick_device
from app.errors import (
    DeadlineExceededError,
    EvalResultsError,
    LimitExceededError,
    ModelNotReadyError,
    UnknownModelError,
)
from app.jobs.eval_results import EVAL_FILE, read_eval_results
from app.metrics import Metrics
from app.repository import ModelRepository
from app.tta.averaging import Level
from app.tta.preprocess import DecodeLimits
from app.tta.views import ViewSpec

log = logging.getLogger(__name__)
State = Literal["loading", "ready", "failed"]


def forward_plan(settings: Settings, device: torch.device) -> tuple[int, int, int]:
    """(forwards at once, intra-op threads each, views per forward; 0 = the engine's default).

    On a CPU with 2+ cores: two single-threaded forwards rather than one two-threaded one.
    Measured on the 2-core dev VM: about 1.3x the throughput, and no OpenMP barrier stalls
    when decode threads or the event loop take a core for a moment. Batches of up to 8
    views: with the fused network, 8 gave about 1.15x the HTTP throughput of 5 (and 10 or 16
    less than 8); a lone request still uses both cores, since the batcher gives each idle
    worker an even share of a short queue.
    """
    cores = os.cpu_count() or 1
    if device.type != "cpu":
        return settings.forward_workers or 1, settings.threads, 0
    workers = settings.forward_workers or (2 if cores >= 2 else 1)
    threads = settings.threads or max(1, cores // workers)
    chunk = 8 if workers > 1 else 0
    return workers, threads, chunk


@dataclass
class ModelSlot:
    name: str
    state: State = "loading"
    error: str = ""
    engine: Engine | None = None
    batcher: ViewBatcher | None = None

    def ready(self) -> tuple[Engine, ViewBatcher]:
        if self.state != "ready" or self.engine is None or self.batcher is None:
            why = self.error if self.state == "failed" else "still loading"
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {why}")
        return self.engine, self.batcher


class ClassifyService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository(settings.models_dir)
        self.slots: dict[str, ModelSlot] = {}
        self.device = pick_device(settings.device)
        self.limits = DecodeLimits(settings.max_pixels, settings.max_aspect_ratio)
        self._pre_pool = ThreadPoolExecutor(settings.preprocess_workers, "preprocess")
        self._load_task: asyncio.Task[None] | None = None
        self._eval_mtimes: dict[str, float] = {}
        self.forward_workers, self.threads_per_forward, self.default_chunk = forward_plan(
            settings, self.device
        )

    # -- lifecycle ------------------------------------------------------------------
    def served_names(self) -> list[str]:
        wanted = self.settings.models
        if wanted == ["all"]:
            return [n for n in self.repository.names() if self.repository.available(n)[0]]
        return list(dict.fromkeys(wanted))

    async def start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads_per_forward)
        for name in self.served_names():
            self.slots[name] = ModelSlot(name)
            self.metrics.model_ready.labels(name).set(0)
        self.refresh_eval_metrics()
        self._load_task = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        for slot in self.slots.values():
            try:
                engine = await asyncio.to_thread(self._load_and_warm, slot.name)
            except Exception as exc:  # any loading failure: report it, keep the others
                log.exception("model %s failed to load", slot.name)
                slot.state, slot.error = "failed", str(exc) or type(exc).__name__
                continue
            s = self.settings
            batcher = ViewBatcher(
                slot.name,
                engine.run_views,
                max_batch_views=s.max_batch_views or engine.chunk_views,
                max_wait_s=s.max_wait_ms / 1000.0,
                max_queue_views=max(s.max_queue_views, 1),
                metrics=self.metrics,
                workers=self.forward_workers,
            )
            batcher.start()
            slot.engine, slot.batcher, slot.state = engine, batcher, "ready"
            cfg = engine.cfg
            self.metrics.model_info.labels(
                slot.name, cfg.arch, str(cfg.input_size), str(cfg.crop_pct),
                cfg.weights.describe(), str(engine.device), engine.dtype_name,
            ).set(1)  # fmt: skip
            self.metrics.model_ready.labels(slot.name).set(1)
            log.info("model %s ready on %s", slot.name, engine.device)

    def _load_and_warm(self, name: str) -> Engine:
        model = self.repository.load(name, self.device)
        s = self.settings
        chunk = s.chunk_views or self.default_chunk
        engine = Engine(
            model, s.dtype, chunk, self.limits, s.compile, s.fuse, jpeg_draft=s.jpeg_draft
        )
        if self.settings.warmup:
            size = model.cfg.input_size
            engine.run_views(torch.zeros(engine.chunk_views, 3, size, size))
        return engine

    def refresh_eval_metrics(self) -> None:
        """Offline evaluation results (models/<name>/eval.json) as gauges, re-read when the
        file changes, so an evaluation that finishes while the server runs shows up."""
        for name in self.slots:
            path = self.repository.root / name / EVAL_FILE
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._eval_mtimes.get(name) == mtime:
                continue
            self._eval_mtimes[name] = mtime
            try:
                results = read_eval_results(path.parent)
            except EvalResultsError as exc:
                log.warning("ignoring evaluation results of %s: %s", name, exc)
                continue
            for r in results:
                labels = (name, r.config, r.dataset)
                self.metrics.eval_top1.labels(*labels).set(r.top1)
                self.metrics.eval_top5.labels(*labels).set(r.top5)
                self.metrics.eval_images.labels(*labels).set(r.images)

    async def wait_loaded(self) -> None:
        if self._load_task is not None:
            await asyncio.shield(self._load_task)

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()
        self._pre_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return bool(self.slots) and all(s.state == "ready" for s in self.slots.values())

    def slot(self, name: str) -> ModelSlot:
        if name not in self.slots:
            raise UnknownModelError(name, list(self.slots))
        return self.slots[name]

    # -- one image ------------------------------------------------------------------
    def _prepare(
        self, engine: Engine, data: bytes, spec: ViewSpec, seed: int | None
    ) -> PreparedViews:
        prepared = engine.prepare_views(data, spec, seed)
        limit = self.settings.max_views_per_request
        if len(prepared.views) > limit:  # ``auto`` is only known per image
            raise LimitExceededError(
                f"{len(prepared.views)} views for this image; the limit is {limit}"
            )
        return prepared

    async def classify_image(
        self,
        slot: ModelSlot,
        data: bytes,
        spec: ViewSpec,
        level: Level,
        top_k: int,
        seed: int | None,
        deadline: float,
    ) -> Prediction:
        engine, batcher = slot.ready()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self._pre_pool, self._prepare, engine, data, spec, seed
        )
        left = deadline - time.perf_counter()
        if left <= 0:
            raise DeadlineExceededError("request deadline passed before its forward pass")
        try:
            outputs, batch_timings = await batcher.submit(prepared.batch, left)
        except TimeoutError as exc:
            raise DeadlineExceededError(
                f"no result within {self.settings.request_timeout_s:g} s (server busy)"
            ) from exc
        t0 = time.perf_counter()
        pred = engine.predict(
            prepared.image, prepared.views, prepared.seed, prepared.spec, outputs, level, top_k
        )
        pred.policy = str(spec)
        timings = {
            "decode": prepared.timings["decode"],
            "preprocess": prepared.timings["resize"] + prepared.timings["views"],
            "queue_wait": batch_timings.queue_wait_s,
            "forward": batch_timings.forward_s,
            "postprocess": time.perf_counter() - t0,
        }
        pred.timings = timings
        for stage, seconds in timings.items():
            self.metrics.stage_duration.labels(slot.name, stage).observe(seconds)
        self.metrics.views_per_request.labels(slot.name).observe(len(prepared.views))
        return pred
