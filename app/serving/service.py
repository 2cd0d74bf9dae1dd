"""One classify request's execution on the served models (no HTTP in here): every image
prepared off the event loop and its views queued from there, its forwards through the
model's batcher with other requests' views, staged policies gated and escalated, the
answer predicted. Every classify metric (requests, images, stages, views, accuracy from
labelled images) is observed here, so the edges only translate their wire. The models'
lifecycle is ``models.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from app.config import Settings
from app.errors import DeadlineExceededError, ForwardError, MidserveError, OverloadedError
from app.metrics import Metrics
from app.pipeline import ImagePipeline, Prediction
from app.preparer import PreparedViews
from app.request import ClassifyRequest
from app.runtime.engine import ViewOutputs
from app.runtime.plan import EngineOptions
from app.serving.batch_items import BatchTimings, Job
from app.serving.batching import ViewBatcher
from app.serving.models import ModelSlot, ServedModels
from app.threads import TaskThreads, to_future

Outcome = Prediction | MidserveError  # one image's answer, or why it has none


@dataclass
class RequestRecord:
    """What the metrics say of one classify request; the route fills it in as it learns."""

    model: str
    level: str = "unknown"
    status: int = 500
    error: MidserveError | None = None


class ClassifyService(ServedModels):
    """The served models, and classify requests on them."""

    def __init__(
        self, settings: Settings, metrics: Metrics, options: EngineOptions | None = None
    ) -> None:
        super().__init__(settings, metrics, options)
        self._pre_pool = TaskThreads(settings.preprocess_workers, "preprocess")

    async def stop(self) -> None:
        await super().stop()
        self._pre_pool.shutdown()

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
        """Every image of one request: all of them prepared in one task of the preparation
        pool, which queues their views for the forward threads itself, so each image's
        first forward comes back to the event loop once, as its rows. An image that fails
        on its own (bad bytes, too many views) comes back as its error; a failure of the
        whole request (overload, deadline, a cascade's later model that is not served,
        ready or of the same classes) raises, as does anything that is not a domain error
        (a server bug)."""
        pipeline, batcher = slot.ready()
        arrived = time.perf_counter()
        loop = asyncio.get_running_loop()
        firsts = [FirstStage(loop.create_future()) for _ in images]
        self._pre_pool.submit(self._prepare_and_queue, slot, pipeline, batcher, images,
                              request, arrived, deadline, firsts)  # fmt: skip
        gathered: list[Outcome | BaseException]
        if len(firsts) == 1:  # the common case: no task, no gather
            try:
                gathered = [await self.classify_image(slot, firsts[0], request, deadline,
                                                      arrived)]  # fmt: skip
            except Exception as exc:
                gathered = [exc]
        else:
            gathered = await asyncio.gather(
                *(self.classify_image(slot, f, request, deadline, arrived) for f in firsts),
                return_exceptions=True,
            )
        for first, outcome in zip(firsts, gathered, strict=True):
            if first.fails_request and isinstance(outcome, BaseException):
                raise outcome
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

    def _prepare_and_queue(
        self,
        slot: ModelSlot,
        pipeline: ImagePipeline,
        batcher: ViewBatcher,
        images: Sequence[bytes],
        request: ClassifyRequest,
        arrived: float,
        deadline: float,
        firsts: list[FirstStage],
    ) -> None:
        """In the preparation pool: the later-stage models the request's policy names
        (``auto``: the model's measured policy) each served, ready and of the same classes,
        else the whole request fails before any image is decoded (a first cost of a pair
        of models is worked out here, off the event loop); then every image prepared and
        its views queued, all at once. Whatever fails reaches the images' answers."""
        try:
            for policy in pipeline.preparer.with_auto([request.policy]):
                for name in policy.models:
                    self.stage_model(slot, name)
            ready: list[tuple[FirstStage, PreparedViews]] = []
            for first, prepared in zip(firsts, prepare_all(pipeline, images, request),
                                       strict=True):  # fmt: skip
                if isinstance(prepared, MidserveError):
                    first.image_error = True
                    to_future(first.answer)(None, prepared)
                else:
                    first.prepared = prepared
                    ready.append((first, prepared))
            if ready and time.perf_counter() >= deadline:
                raise DeadlineExceededError("request deadline passed before its forward")
            jobs = batcher.enqueue_many(
                [(prepared.groups, to_future(first.answer)) for first, prepared in ready],
                enqueued_at=arrived,
            )
            for (first, _), job in zip(ready, jobs, strict=True):
                first.job = job
                if first.answer.cancelled():  # its waiter gave up while it was queued
                    batcher.abandon(job)
        except Exception as exc:  # the whole request's: every image still waiting gets it
            for first in firsts:
                first.fails_request = not first.image_error
                to_future(first.answer)(None, exc)

    # -- one image ------------------------------------------------------------------
    async def classify_image(
        self,
        slot: ModelSlot,
        first: FirstStage,
        request: ClassifyRequest,
        deadline: float,
        arrived: float,
    ) -> Prediction:
        """One image from its first forward's rows: for a staged policy, while the gate
        says so, cut the next stage from the same decoded image (in the preparation pool)
        and forward it ahead of newer work (its queue room held while it is cut) through
        its model's batcher (a cascade's later model: that model's, batched with its own
        requests); predict here, on the event loop (measured cheaper than a hand-off of the
        rows to another thread)."""
        pipeline, own_batcher = slot.ready()
        batcher = own_batcher  # the current stage's model's
        try:
            out, timings = await asyncio.wait_for(
                first.answer, max(0.0, deadline - time.perf_counter())
            )
        except (TimeoutError, asyncio.CancelledError) as exc:
            if first.job is not None:
                batcher.abandon(first.job)
            if isinstance(exc, TimeoutError):
                raise self._busy() from exc
            raise
        prepared = first.prepared
        assert prepared is not None, "answered without being prepared"
        parts: list[ViewOutputs] = []  # each stage's outputs
        queue_wait = forward = 0.0
        while True:
            parts.append(out)
            queue_wait, forward = queue_wait + timings.queue_wait_s, forward + timings.forward_s
            if not pipeline.goes_on(prepared, parts, request.level):
                break
            self.metrics.escalated.labels(slot.name, str(prepared.stages_run + 1)).inc()
            # the next stage's model (a cascade's other model, or this one) and its queue
            model = prepared.policy.stages[prepared.stages_run].model
            stage_pipeline, batcher = self.slot(model).ready() if model else (pipeline, own_batcher)
            cost = stage_pipeline.preparer.view_equivalents(prepared.next_stage_views)
            reserved = batcher.reserve(cost)
            try:
                await self._pre_pool.run(pipeline.next_stage, prepared)
            except BaseException:
                batcher.release(reserved)
                raise
            left = deadline - time.perf_counter()
            if left <= 0:
                batcher.release(reserved)
                raise DeadlineExceededError(
                    f"request deadline passed before stage {prepared.stages_run}'s forward"
                )
            try:
                out, timings = await batcher.submit(
                    prepared.groups, left, enqueued_at=arrived, reserved=reserved
                )
            except TimeoutError as exc:
                raise self._busy() from exc
        pred = pipeline.predict(prepared, parts, request, queue_wait, forward)
        self.metrics.observe_prediction(slot.name, pred, prepared.gates)
        return pred

    def _busy(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"no result within {self.settings.request_timeout_s:g} s (server busy)"
        )


@dataclass
class FirstStage:
    """One image on its way through preparation to its first forward's rows: filled in
    by the preparation thread, awaited on the event loop."""

    answer: asyncio.Future[tuple[ViewOutputs, BatchTimings]]
    prepared: PreparedViews | None = None
    job: Job | None = None
    image_error: bool = False  # it failed on its own (bad bytes, too many views)
    fails_request: bool = False  # its error is the whole request's, not this image's


def prepare_all(
    pipeline: ImagePipeline, images: Sequence[bytes], request: ClassifyRequest
) -> list[PreparedViews | MidserveError]:
    """Every image of a request prepared in this (preparation pool) thread; an image that
    cannot be is its domain error, so the others still run."""
    out: list[PreparedViews | MidserveError] = []
    for data in images:
        try:
            out.append(pipeline.prepare(data, request))
        except MidserveError as exc:
            out.append(exc)
    return out
