"""The served models and the request pipeline (no HTTP in here).

Models load in the background after start-up, so ``/healthz`` answers at once and
``/readyz`` says which models are still loading or failed; a model that fails to load does
not stop the others from serving. Every classify metric (requests, images, stages, views,
accuracy from labelled images) is observed here, so the routes only translate HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from app.batching import ViewBatcher
from app.config import Settings
from app.errors import (
    DeadlineExceededError,
    EvalResultsError,
    ForwardError,
    MidserveError,
    ModelNotReadyError,
    OverloadedError,
    UnknownModelError,
)
from app.eval_results import EVAL_FILE, read_eval_results
from app.faults import FaultInjector, injector_from_spec
from app.metrics import Metrics
from app.pipeline import ImagePipeline, Prediction
from app.repository import ModelRepository
from app.request import ClassifyRequest
from app.runtime.engine import Engine, ViewOutputs, pick_device
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions
from app.tta.views import view_pixels

log = logging.getLogger(__name__)
State = Literal["loading", "ready", "failed"]


Outcome = Prediction | MidserveError  # one image's answer, or why it has none


@dataclass
class RequestRecord:
    """What the metrics say of one classify request; the route fills it in as it learns."""

    model: str
    level: str = "unknown"
    status: int = 500
    error: MidserveError | None = None


@dataclass
class ModelSlot:
    name: str
    state: State = "loading"
    error: str = ""
    pipeline: ImagePipeline | None = None
    batcher: ViewBatcher | None = None
    faults: FaultInjector | None = None  # only when the fault_injection setting names some

    @property
    def engine(self) -> Engine | None:
        return self.pipeline.engine if self.pipeline else None

    def health(self) -> tuple[str, str]:
        """(state, why): loading | ready | failed, or recovering while a stalled forward
        keeps a loaded model out of readiness."""
        if self.state == "ready" and self.batcher is not None and self.batcher.unready:
            return "recovering", self.batcher.unready
        return self.state, self.error

    def ready(self) -> tuple[ImagePipeline, ViewBatcher]:
        state, why = self.health()
        if state != "ready" or self.pipeline is None or self.batcher is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {why or 'still loading'}")
        return self.pipeline, self.batcher


class ClassifyService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.options = EngineOptions.from_settings(settings)
        self.repository = ModelRepository(settings.models_dir)
        self.slots: dict[str, ModelSlot] = {}
        self.device = pick_device(settings.device)
        self.forward_plan = self.options.forward_plan(self.device.type)
        self._pre_pool = ThreadPoolExecutor(settings.preprocess_workers, "preprocess")
        self._load_task: asyncio.Task[None] | None = None
        self._eval_mtimes: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------
    def served_names(self) -> list[str]:
        wanted = self.settings.models
        if wanted == ["all"]:
            return [n for n in self.repository.names() if self.repository.available(n)[0]]
        return list(dict.fromkeys(wanted))

    async def start(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.forward_plan.threads)
        for name in self.served_names():
            self.slots[name] = ModelSlot(name)
            self.metrics.model_ready.labels(name).set(0)
        self.refresh_eval_metrics()
        self._load_task = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        for slot in self.slots.values():
            try:
                pipeline = await asyncio.to_thread(self._load_and_warm, slot.name)
            except Exception as exc:  # any loading failure: report it, keep the others
                log.exception("model %s failed to load", slot.name)
                slot.state, slot.error = "failed", str(exc) or type(exc).__name__
                continue
            s, engine = self.settings, pipeline.engine
            slot.faults = injector_from_spec(s.fault_injection)
            size = engine.cfg.input_size
            batcher = ViewBatcher(
                slot.name,
                slot.faults.wrap(engine.run_views) if slot.faults else engine.run_views,
                max_batch_views=s.max_batch_views or engine.chunk_views,
                max_wait_s=s.max_wait_ms / 1000.0,
                max_queue_views=max(s.max_queue_views, 1),
                metrics=self.metrics,
                workers=engine.plan.workers,
                threads=engine.plan.threads if engine.device.type == "cpu" else 0,
                view_pixels=view_pixels(engine.cfg.input_size),
                forward_timeout_s=s.forward_timeout_s,
                probe=torch.zeros(1, 3, size, size),
                recovery_limit_s=s.recovery_limit_s,
            )
            batcher.start()
            slot.pipeline, slot.batcher, slot.state = pipeline, batcher, "ready"
            cfg = engine.cfg
            self.metrics.model_info.labels(
                slot.name, cfg.arch, str(cfg.input_size), str(cfg.crop_pct),
                cfg.weights.describe(), str(engine.device), engine.dtype_name,
            ).set(1)  # fmt: skip
            self.metrics.observe_plan(slot.name, engine.plan, engine.tuning)
            self.metrics.model_ready.labels(slot.name).set(1)
            self.metrics.model_unrecovered.labels(slot.name).set(0)
            log.info("model %s ready on %s: %s", slot.name, engine.device, engine.plan.describe())

    def _load_and_warm(self, name: str) -> ImagePipeline:
        engine = load_engine(self.repository, name, self.options)
        if self.options.warmup:
            engine.warm_up()
        return ImagePipeline(engine, self.settings.max_views_per_request)

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

    def readiness(self) -> dict[str, dict[str, str]]:
        """Every served model's state (and why, when it is not ready): what /readyz and any
        other readiness route answer from."""
        out = {}
        for name, slot in self.slots.items():
            state, why = slot.health()
            out[name] = {"state": state, **({"error": why} if why else {})}
        return out

    @property
    def ready(self) -> bool:
        """Every served model loaded, warm and not recovering from a stalled forward."""
        return bool(self.slots) and all(s.health()[0] == "ready" for s in self.slots.values())

    def unrecovered(self) -> dict[str, str]:
        """Models past their recovery limit, and why: what liveness answers from. A model
        still loading or that failed to load does not fail it (a restart changes neither)."""
        return {
            name: why
            for name, slot in self.slots.items()
            if slot.batcher is not None and (why := slot.batcher.unrecovered)
        }

    def slot(self, name: str) -> ModelSlot:
        if name not in self.slots:
            raise UnknownModelError(name, list(self.slots))
        return self.slots[name]

    # -- one request ----------------------------------------------------------------
    @contextlib.contextmanager
    def observed(self, model: str) -> Iterator[RequestRecord]:
        """A classify request in flight; on exit its latency (by level and status) and a
        request-wide error are counted."""
        m = self.metrics
        record = RequestRecord(model)
        started = time.perf_counter()
        m.in_flight.inc()
        try:
            yield record
        finally:
            m.in_flight.dec()
            if record.error is not None:
                m.errors.labels(model, record.error.kind).inc()
            m.request_duration.labels(model, record.level, str(record.status)).observe(
                time.perf_counter() - started
            )

    async def classify(
        self,
        slot: ModelSlot,
        images: Sequence[bytes],
        request: ClassifyRequest,
        labels: Sequence[int | None],
        deadline: float,
    ) -> list[Outcome]:
        """Every image of one request, each through the pipeline at once. An image that
        fails on its own (bad bytes, too many views) comes back as its error; a failure of
        the whole request (overload, deadline) raises, as does anything that is not a
        domain error (a server bug)."""
        gathered = await asyncio.gather(
            *(self.classify_image(slot, data, request, deadline) for data in images),
            return_exceptions=True,
        )
        for fatal in (OverloadedError, DeadlineExceededError, ForwardError):
            for outcome in gathered:
                if isinstance(outcome, fatal):
                    raise outcome
        outcomes: list[Outcome] = []
        for outcome in gathered:
            if isinstance(outcome, BaseException) and not isinstance(outcome, MidserveError):
                raise outcome
            outcomes.append(outcome)
        m = self.metrics
        for outcome, label in zip(outcomes, labels, strict=True):
            if isinstance(outcome, MidserveError):
                m.images.labels(slot.name, "refused").inc()
                m.errors.labels(slot.name, outcome.kind).inc()
                continue
            m.images.labels(slot.name, "classified").inc()
            if label is not None:
                m.observe_accuracy(
                    slot.name, outcome.level, outcome.policy, label, outcome.ranked()
                )
        return outcomes

    # -- one image ------------------------------------------------------------------
    async def classify_image(
        self, slot: ModelSlot, data: bytes, request: ClassifyRequest, deadline: float
    ) -> Prediction:
        """The pipeline with its forwards through the batcher: prepare in the thread pool,
        forward with other requests' views, and for a staged policy, while the gate says so,
        cut the next stage from the same decoded image and forward it ahead of newer work
        (its queue room held while it is cut); predict here."""
        pipeline, batcher = slot.ready()
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        prepared = await loop.run_in_executor(self._pre_pool, pipeline.prepare, data, request)
        parts: list[ViewOutputs] = []
        queue_wait = forward = reserved = 0.0
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                batcher.release(reserved)
                stage = f"stage {prepared.stages_run}'s" if prepared.policy.staged else "its"
                raise DeadlineExceededError(f"request deadline passed before {stage} forward")
            try:
                out, timings = await batcher.submit(
                    prepared.groups, left, enqueued_at=arrived, reserved=reserved
                )
            except TimeoutError as exc:
                raise DeadlineExceededError(
                    f"no result within {self.settings.request_timeout_s:g} s (server busy)"
                ) from exc
            parts.append(out)
            queue_wait, forward = queue_wait + timings.queue_wait_s, forward + timings.forward_s
            outputs = ViewOutputs.concat(parts)
            if not pipeline.goes_on(prepared, outputs, request.level):
                break
            self.metrics.escalated.labels(slot.name, str(prepared.stages_run + 1)).inc()
            cost = pipeline.preparer.view_equivalents(prepared.next_stage_views)
            reserved = batcher.reserve(cost)
            try:
                await loop.run_in_executor(self._pre_pool, pipeline.next_stage, prepared)
            except BaseException:
                batcher.release(reserved)
                raise
        pred = pipeline.predict(prepared, outputs, request, queue_wait, forward)
        self.metrics.observe_prediction(slot.name, pred, prepared.gates)
        return pred
