"""Cross-request batching by view shape, counted in view-equivalents, with a bounded queue.

Each request submits the views of one image, grouped by shape (square crops at the model's
input size; whole-image views in shapes that recur because their long side is rounded to
the network's stride). A forward runs one shape: the oldest waiting view sets it, and views
of that shape from every queued request join it, up to ``max_batch_views`` view-equivalents
(a view's pixels over the pixels of one view at the model's input size, so a forward's cost
stays bounded whatever the shape); requests are split across forwards when needed. Nothing
is padded, so global pooling sees exactly the view's pixels. Flush on size or after
``max_wait_s``; results go back in view order; a failing forward fails only the requests
in that batch. When the queue holds ``max_queue_views`` view-equivalents, new work is
refused at once (503 upstream).

The queue lives in the threads, not on the event loop: views are queued from any thread
(the preparation thread that cut them, or the loop), the plan's ``workers`` forward threads
take their batches themselves (one gathers at a time, while the others run), and the
thread that finishes a request's last rows hands its outcome to the loop once. So the loop
does nothing per forward, and one wake-up per request.

Faults (docs/reliability.md): a forward that raises fails its batch (ForwardError, 500);
out of memory splits the batch in halves until it fits; a worker that dies is replaced and
its batch run once more; a forward past ``forward_timeout_s`` fails its batch with
ForwardStalledError (503), takes the model out of readiness (``unready``) and brings it
back once a probe forward on a fresh worker answers (app/serving/forward_workers.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

import torch

from app.errors import ForwardError, OverloadedError
from app.metrics import Metrics
from app.runtime.engine import ViewOutputs
from app.serving.batch_items import Batch, BatchTimings, Job
from app.serving.forward_faults import ForwardFaults, split_on_oom
from app.serving.forward_workers import ForwardWorkers, Worker
from app.serving.pending import PendingViews
from app.threads import Deliver, to_future
from app.tta.preprocess import ViewGroup

log = logging.getLogger(__name__)


class ViewBatcher:
    """One per served model; up to ``workers`` forwards run at once, each on a thread of
    its own with ``threads`` intra-op threads (the plan's team)."""

    def __init__(
        self,
        model_name: str,
        run: Callable[[torch.Tensor], ViewOutputs],
        *,
        max_batch_views: int,
        max_wait_s: float,
        max_queue_views: int,
        metrics: Metrics | None = None,
        workers: int = 1,
        threads: int = 0,
        view_pixels: int = 0,
        forward_timeout_s: float | None = None,
        probe: torch.Tensor | None = None,
        recovery_limit_s: float | None = None,
    ) -> None:
        """``view_pixels``: the pixels of one view at the model's input size, the unit of
        batch and queue sizes (0: every view counts as one, whatever its shape).
        ``threads``: torch intra-op threads on each forward thread (0: as the process).
        ``forward_timeout_s``: the watchdog's limit on one forward (None: none);
        ``probe``: the views a recovering model must answer to be ready again, within
        ``recovery_limit_s`` (None: no limit) or liveness fails (``unrecovered``)."""
        if max_batch_views < 1 or max_queue_views < 1:
            raise ValueError("max_batch_views and max_queue_views must be positive")
        self.model_name = model_name
        self.forward_timeout_s = forward_timeout_s or None
        self._faults = ForwardFaults(model_name, metrics, self.forward_timeout_s,
                                     recovery_limit_s)  # fmt: skip
        self._run = split_on_oom(run, self._faults.count_split)
        self._probe = probe
        self.max_batch_views = max_batch_views
        self.max_wait_s = max_wait_s
        self.max_queue_views = max_queue_views
        self.metrics = metrics
        self.view_pixels = view_pixels
        # Several forwards may run at once, each on its own thread: on a small CPU, two
        # single-threaded forwards beat one forward on a two-thread OpenMP team (no barrier
        # waits when a decode thread or the event loop takes a core for a moment).
        self.workers = max(1, workers)
        self._threads = threads
        self._lock = threading.RLock()  # guards everything below, and every Job
        # idle workers wait for work while nobody gathers; the one gathering waits for a
        # full batch: each is woken alone, so no thread wakes only to sleep again
        self._work = threading.Condition(self._lock)
        self._filled = threading.Condition(self._lock)
        self._arrived = threading.Condition(self._lock)  # a worker came for work (start waits)
        self._pending = PendingViews(self._gauge)
        self._idle_workers = 0  # workers waiting for work: neither gathering nor running
        self._gathering = False  # one worker gathers a batch at a time
        self._stopping = False
        self._pool: ForwardWorkers | None = None
        self._views_per_s = 0.0  # moving estimate, for Retry-After

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Start the forward threads and return once each waits for work (a few ms at
        most), so the first request is shared among all of them like any later one."""
        if self._pool is None:
            with self._lock:
                self._stopping = False
            probe = self._probe
            self._pool = ForwardWorkers(
                self.model_name, self.workers, self, self._faults,
                None if probe is None else lambda: self._run(probe),
                threads=self._threads, metrics=self.metrics,
            )  # fmt: skip
            with self._lock:
                self._arrived.wait_for(lambda: self._idle_workers >= self.workers, timeout=5.0)

    async def stop(self) -> None:
        """Forwards already running finish and answer their requests; views still queued
        are refused."""
        with self._lock:
            self._stopping = True
            self._work.notify_all()
            self._filled.notify_all()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close, self.forward_timeout_s)
            self._pool = None
        with self._lock:
            for piece in self._pending:
                piece.job.settle(RuntimeError("server is shutting down"))
            self._pending.clear()

    @property
    def unready(self) -> str | None:
        """Why the model is out of readiness (a stalled forward it is recovering from)."""
        return self._faults.unready

    @property
    def unrecovered(self) -> str | None:
        """Why the model is past its recovery limit: the process should be restarted."""
        return self._faults.unrecovered

    @property
    def queued_views(self) -> float:
        return self._pending.views

    def view_cost(self, shape: tuple[int, ...]) -> float:
        """View-equivalents of one view of ``shape`` (height, width)."""
        return shape[-2] * shape[-1] / self.view_pixels if self.view_pixels else 1.0

    # -- submitting (any thread) ----------------------------------------------------
    def retry_after_s(self) -> float:
        if self._views_per_s <= 0:
            return 1.0
        return max(1.0, self._pending.views / self._views_per_s)

    def reserve(self, cost: float) -> float:
        """Hold ``cost`` view-equivalents of the queue for views still being cut (an image
        going on to its next stage), so it counts against the bound while it waits; raises
        OverloadedError when they do not fit. Pass it to ``submit(reserved=...)`` or give
        it back with ``release``."""
        with self._lock:
            self._refuse_beyond(cost, "the next stage of this image")
            self._pending.hold(cost)
        return cost

    def release(self, reserved: float) -> None:
        with self._lock:
            self._pending.hold(-reserved)

    def _refuse_beyond(self, cost: float, what: str) -> None:
        if self._pending.views + cost > self.max_queue_views:
            raise OverloadedError(
                f"queue full ({self._pending.views:.0f} view-equivalents waiting, {what} "
                f"{cost:.1f}, limit {self.max_queue_views})",
                retry_after_s=self.retry_after_s(),
            )

    def enqueue(
        self,
        groups: list[ViewGroup],
        deliver: Deliver,
        *,
        enqueued_at: float | None = None,
        reserved: float = 0.0,
    ) -> Job:
        """Queue the views of one image (groups by shape), from any thread; ``deliver``
        gets ((outputs in view order, timings), None) or (None, error) once. Raises
        OverloadedError when the queue is full. ``enqueued_at``: when the image first
        arrived, for the later stage of a staged policy: its views go ahead of work that
        arrived after it. ``reserved``: queue room held for these views by ``reserve``
        (consumed here, whatever happens)."""
        return self.enqueue_many([(groups, deliver)], enqueued_at=enqueued_at,
                                 reserved=reserved)[0]  # fmt: skip

    def enqueue_many(
        self,
        images: list[tuple[list[ViewGroup], Deliver]],
        *,
        enqueued_at: float | None = None,
        reserved: float = 0.0,
    ) -> list[Job]:
        """``enqueue`` for the images of one request at once: one lock, one wake-up, and a
        forward sees all of them or none; refused together when they do not all fit."""
        now = time.perf_counter()
        at = now if enqueued_at is None else enqueued_at
        jobs = [Job(groups, deliver, at, now) for groups, deliver in images]
        pieces = [p for job in jobs for p in job.pieces(self.max_batch_views, self.view_cost)]
        cost = sum(p.cost for p in pieces)
        with self._lock:
            self._pending.hold(-reserved)
            if self._stopping:
                raise RuntimeError("server is shutting down")
            self._refuse_beyond(cost, "this image" if len(jobs) == 1 else "these images")
            self._pending.add(pieces, at)
            if not self._gathering:
                self._work.notify()
            elif self._pending.views >= self.max_batch_views:
                self._filled.notify()
        return jobs

    async def submit(
        self,
        views: torch.Tensor | list[ViewGroup],
        timeout_s: float,
        *,
        enqueued_at: float | None = None,
        reserved: float = 0.0,
    ) -> tuple[ViewOutputs, BatchTimings]:
        """``enqueue`` from the event loop, and wait: TimeoutError after ``timeout_s``
        (its queued views are then dropped, not run). Outputs come back in view order."""
        if isinstance(views, torch.Tensor):
            views = [ViewGroup(list(range(int(views.shape[0]))), views)]
        future: asyncio.Future[tuple[ViewOutputs, BatchTimings]]
        future = asyncio.get_running_loop().create_future()
        job = self.enqueue(views, to_future(future), enqueued_at=enqueued_at, reserved=reserved)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            self.abandon(job)
            raise

    def abandon(self, job: Job) -> None:
        """Drop a job's queued views so no forward runs them (its waiter timed out or went
        away)."""
        with self._lock:
            self._end(job, asyncio.CancelledError())

    def _end(self, job: Job, error: BaseException) -> None:
        """Settle ``job`` with ``error`` (unless it has its outcome) and drop its views."""
        job.settle(error)
        self._pending.drop(job)

    def _gauge(self, views: float) -> None:
        if self.metrics:
            self.metrics.queue_views.labels(self.model_name).set(views)

    # -- the forward threads' side --------------------------------------------------
    def batch_size_now(self) -> float:
        """View-equivalents for the next forward: full batches while the queue is deep;
        with idle workers and a short queue, an even share each, so the views of a lone
        request run on every idle worker at once instead of queueing behind each other.
        A request once shared out is not cut finer: a worker back from its share before the
        one woken for the rest takes a whole share too, not half of what is left."""
        share = math.ceil(self._pending.views / (self._idle_workers + 1) - 1e-9)
        head = self._pending.head().job
        head.share = share = max(share, head.share)
        return max(1, min(self.max_batch_views, share))

    def next_batch(self, worker: Worker) -> Batch | None:
        """On a forward thread: wait for work, gather it (one worker at a time, up to
        max_wait_s more while the batch is not full; the rest of a request already running
        goes at once) and take it. None: the worker should exit."""
        with self._lock:
            self._idle_workers += 1  # until it starts gathering
            self._arrived.notify_all()
            while True:
                while (
                    not self._stopping
                    and not worker.retired
                    and (self._gathering or not self._pending)
                ):
                    self._work.wait()
                if self._stopping or worker.retired:
                    self._idle_workers -= 1
                    return None
                self._gathering = True
                self._idle_workers -= 1
                try:
                    self._gather()
                    pieces = self._pending.take(self.batch_size_now)
                finally:
                    self._gathering = False
                    if self._pending:
                        self._work.notify()  # the next idle worker gathers the rest
                if pieces:
                    return Batch(pieces)
                self._idle_workers += 1

    def _gather(self) -> None:
        if self._pending.head().job.started:
            return
        deadline = time.perf_counter() + self.max_wait_s
        while self._pending.views < self.max_batch_views and not self._stopping:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._filled.wait(left)

    def run(self, batch: Batch) -> None:
        """On a forward thread: one forward pass, then each request gets its rows; a
        failed forward fails this batch's requests only."""
        started = time.perf_counter()
        parts = [p.views for p in batch.pieces]
        try:
            # every torch op stays on the thread that runs the network, so no second
            # OpenMP team competes with it for the cores
            outputs = self._run(parts[0] if len(parts) == 1 else torch.cat(parts))
            if outputs.logits.shape[0] != batch.views:
                raise RuntimeError(
                    f"forward returned {outputs.logits.shape[0]} rows for {batch.views} views"
                )
        except Exception as exc:
            error = exc if isinstance(exc, ForwardError) else None
            if error is None:
                log.exception("forward of %d views failed", batch.views)
                error = ForwardError(
                    f"the forward pass of this request's batch failed ({type(exc).__name__}); "
                    "the error is logged on the server"
                )
            self._faults.count_fault(error)
            self.fail(batch, error)
            return
        elapsed = time.perf_counter() - started
        self._record(batch, elapsed)
        self._deliver(batch, outputs, elapsed)

    def fail(self, batch: Batch, error: ForwardError) -> None:
        """Fail every request with views in ``batch`` (their other views are dropped)."""
        with self._lock:
            for piece in batch.pieces:
                self._end(piece.job, error)

    def _record(self, batch: Batch, elapsed: float) -> None:
        rate = self.workers * batch.views / max(elapsed, 1e-6)
        self._views_per_s = rate if self._views_per_s == 0 else 0.8 * self._views_per_s + 0.2 * rate
        if self.metrics:
            self.metrics.batch_views.labels(self.model_name).observe(batch.views)
            jobs = len({id(p.job) for p in batch.pieces})
            self.metrics.batch_requests.labels(self.model_name).observe(jobs)

    def _deliver(self, batch: Batch, outputs: ViewOutputs, elapsed: float) -> None:
        """Each piece's rows to its job; a job whose last rows these are is answered from
        this thread (its rows merged here), one hand-off to whoever waits for it."""
        offset = 0
        counted: set[int] = set()
        finished: list[Job] = []
        with self._lock:
            for piece in batch.pieces:
                rows = slice(offset, offset + piece.size)
                offset += piece.size
                job = piece.job
                if id(job) not in counted:
                    counted.add(id(job))
                    job.timings.forward_s += elapsed
                    job.timings.batches += 1
                if job.settled:
                    continue
                job.done.append(
                    (piece.group, piece.start,
                     ViewOutputs(outputs.features[rows], outputs.logits[rows]))
                )  # fmt: skip
                job.done_views += piece.size
                if job.done_views == job.size:
                    job.settled = True  # nothing can abandon it now; its answer follows
                    finished.append(job)
        for job in finished:
            try:
                job.deliver((job.merged(), job.timings), None)
            except Exception as exc:  # the waiter's own follow-up failed: its error, not ours
                log.exception("handing a request its rows failed")
                job.deliver(None, exc)
