"""Cross-request batching by view shape, counted in view-equivalents, with a bounded queue.

Each request submits the views of one image, grouped by shape (square crops at the model's
input size; whole-image views in shapes that recur because their long side is rounded to
the network's stride). A forward runs one shape: the oldest waiting view sets it, and views
of that shape from every queued request join it, up to ``max_batch_views`` view-equivalents
(a view's pixels over the pixels of one view at the model's input size, so a forward's cost
stays bounded whatever the shape); requests are split across forwards when needed. Nothing
is padded, so global pooling sees exactly the view's pixels. Flush on size or after
``max_wait_s``; one Future per request; results go back in view order; a failing forward
fails only the requests in that batch. Up to the plan's ``workers`` forwards run at once;
while every worker is busy the next batch keeps filling. When the queue holds
``max_queue_views`` view-equivalents, new work is refused at once (503 upstream).

Faults (docs/reliability.md): a forward that raises fails its batch (ForwardError, 500);
out of memory splits the batch in halves until it fits; a worker that dies is replaced and
its batch run once more; a forward past ``forward_timeout_s`` fails its batch with
ForwardStalledError (503), takes the model out of readiness (``unready``) and brings it
back once a probe forward on a fresh worker answers (app/serving/forward_workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable

import torch

from app.errors import ForwardError, ForwardStalledError, OverloadedError
from app.metrics import Metrics
from app.runtime.engine import ViewOutputs
from app.serving.batch_items import BatchTimings, Job, Piece
from app.serving.forward_faults import ForwardFaults, split_on_oom
from app.serving.forward_workers import ForwardPool
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
        self._faults = ForwardFaults(
            model_name, metrics, self.forward_timeout_s, probe, recovery_limit_s
        )
        self._run = split_on_oom(run, self._faults.count_split)
        self.max_batch_views = max_batch_views
        self.max_wait_s = max_wait_s
        self.max_queue_views = max_queue_views
        self.metrics = metrics
        self.view_pixels = view_pixels
        self._pending: deque[Piece] = deque()
        self._queued_views = 0.0  # view-equivalents
        self._wakeup = asyncio.Event()
        # Several forwards may run at once, each on its own thread: on a small CPU, two
        # single-threaded forwards beat one forward on a two-thread OpenMP team (no barrier
        # waits when a decode thread or the event loop takes a core for a moment).
        self.workers = max(1, workers)
        self._threads = threads
        self._pool: ForwardPool | None = None
        self._free_workers = asyncio.Semaphore(self.workers)
        self._idle_workers = self.workers
        self._in_flight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._views_per_s = 0.0  # moving estimate, for Retry-After

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        if self._pool is None:
            self._pool = ForwardPool(
                self.model_name, self.workers, threads=self._threads, metrics=self.metrics
            )
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._in_flight:  # forwards already running finish and answer their requests
            _, stuck = await asyncio.wait(self._in_flight, timeout=self.forward_timeout_s)
            for task in stuck:  # a recovery still waiting on a hung probe
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        for piece in self._pending:
            if not piece.job.abandoned:
                piece.job.future.set_exception(RuntimeError("server is shutting down"))
        self._pending.clear()
        self._set_queue(0)
        if self._pool is not None:
            self._pool.close()
            self._pool = None

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
        return self._queued_views

    def view_cost(self, shape: tuple[int, ...]) -> float:
        """View-equivalents of one view of ``shape`` (height, width)."""
        return shape[-2] * shape[-1] / self.view_pixels if self.view_pixels else 1.0

    # -- submitting -----------------------------------------------------------------
    def retry_after_s(self) -> float:
        if self._views_per_s <= 0:
            return 1.0
        return max(1.0, self._queued_views / self._views_per_s)

    def reserve(self, cost: float) -> float:
        """Hold ``cost`` view-equivalents of the queue for views still being cut (an image
        going on to its next stage), so it counts against the bound while it waits; raises
        OverloadedError when they do not fit. Pass it to ``submit(reserved=...)`` or give
        it back with ``release``."""
        if self._queued_views + cost > self.max_queue_views:
            raise OverloadedError(
                f"queue full ({self._queued_views:.0f} view-equivalents waiting, the next "
                f"stage of this image {cost:.1f}, limit {self.max_queue_views})",
                retry_after_s=self.retry_after_s(),
            )
        self._set_queue(self._queued_views + cost)
        return cost

    def release(self, reserved: float) -> None:
        self._set_queue(self._queued_views - reserved)

    async def submit(
        self,
        views: torch.Tensor | list[ViewGroup],
        timeout_s: float,
        *,
        enqueued_at: float | None = None,
        reserved: float = 0.0,
    ) -> tuple[ViewOutputs, BatchTimings]:
        """Queue the views of one image (one stack of one shape, or groups by shape);
        raises OverloadedError when the queue is full and TimeoutError after ``timeout_s``
        (its queued views are then dropped, not run). Outputs come back in view order.

        ``enqueued_at``: when the image first arrived, for the later stage of a staged
        policy: its views go ahead of work that arrived after it. ``reserved``: queue room
        held for these views by ``reserve`` (consumed here, whatever happens)."""
        if isinstance(views, torch.Tensor):
            views = [ViewGroup(list(range(int(views.shape[0]))), views)]
        pieces: list[Piece] = []
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        job = Job(views, loop.create_future(), enqueued_at or now, now)
        for gi, group in enumerate(views):
            n, view_cost = int(group.batch.shape[0]), self.view_cost(group.batch.shape)
            step = max(1, int(self.max_batch_views / view_cost))
            pieces += [
                Piece(job, gi, start, min(n, start + step), view_cost)
                for start in range(0, n, step)
            ]
        cost = sum(p.cost for p in pieces)
        self.release(reserved)
        if self._queued_views + cost > self.max_queue_views:
            raise OverloadedError(
                f"queue full ({self._queued_views:.0f} view-equivalents waiting, this image "
                f"{cost:.1f}, limit {self.max_queue_views})",
                retry_after_s=self.retry_after_s(),
            )
        self._enqueue(pieces, job.enqueued_at)
        self._set_queue(self._queued_views + cost)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            self._abandon(job)
            raise

    def _enqueue(self, pieces: list[Piece], enqueued_at: float) -> None:
        """At the end, or for an older image's later stage, before the first newer work."""
        pending = self._pending
        if not pending or pending[-1].job.enqueued_at <= enqueued_at:
            pending.extend(pieces)
            return
        at = next(i for i, p in enumerate(pending) if p.job.enqueued_at > enqueued_at)
        self._pending = deque([*list(pending)[:at], *pieces, *list(pending)[at:]])

    def _abandon(self, job: Job) -> None:
        """Drop a timed-out or cancelled request's queued views so no forward runs them."""
        if not job.future.done():
            job.future.cancel()
        kept = [p for p in self._pending if p.job is not job]
        dropped = sum(p.cost for p in self._pending if p.job is job)
        self._pending = deque(kept)
        self._set_queue(self._queued_views - dropped)

    def _set_queue(self, views: float) -> None:
        self._queued_views = max(0.0, views)
        if self.metrics:
            self.metrics.queue_views.labels(self.model_name).set(views)

    # -- the worker -----------------------------------------------------------------
    def batch_size_now(self) -> float:
        """View-equivalents for the next forward: full batches while the queue is deep;
        with idle workers and a short queue, an even share each, so the views of a lone
        request run on every idle worker at once instead of queueing behind each other."""
        share = math.ceil(self._queued_views / (self._idle_workers + 1) - 1e-9)
        return max(1, min(self.max_batch_views, share))

    def _take_batch(self) -> list[Piece]:
        """Views of one shape, the oldest waiting view's, up to batch_size_now()
        view-equivalents, in arrival order; a piece that does not fit is split."""
        while self._pending and self._pending[0].job.abandoned:
            self._set_queue(self._queued_views - self._pending.popleft().cost)
        if not self._pending:
            return []
        shape = self._pending[0].shape
        room = self.batch_size_now()
        now = time.perf_counter()
        batch: list[Piece] = []
        kept: deque[Piece] = deque()
        while self._pending:
            piece = self._pending.popleft()
            if piece.job.abandoned:
                self._set_queue(self._queued_views - piece.cost)
                continue
            fits = int(room / piece.view_cost + 1e-9)
            if piece.shape != shape or (batch and fits < 1):
                kept.append(piece)
                continue
            n = max(1, fits)  # the first piece runs even if one of its views exceeds the room
            taken = piece
            if piece.size > n:
                taken = Piece(piece.job, piece.group, piece.start, piece.start + n, piece.view_cost)
                piece.start += n
                kept.append(piece)
            batch.append(taken)
            if not taken.job.started:
                taken.job.started = True
                taken.job.timings.queue_wait_s = now - taken.job.submitted_at
            room -= taken.cost
            self._set_queue(self._queued_views - taken.cost)
        self._pending = kept
        return batch

    async def _gather(self) -> None:
        """Wait for work, then up to max_wait_s more while the batch is not full; the rest of
        a request already running goes at once (its answer waits on it)."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._pending[0].job.started:
            return
        deadline = time.perf_counter() + self.max_wait_s
        while self._queued_views < self.max_batch_views:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)

    async def _loop(self) -> None:
        while True:
            await self._free_workers.acquire()  # the batch fills while every worker is busy
            self._idle_workers -= 1
            try:
                await self._gather()
                batch = self._take_batch()
            except BaseException:
                self._release_worker()
                raise
            if not batch:
                self._release_worker()
                continue
            task = asyncio.get_running_loop().create_task(self._forward(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._forward_done)

    def _forward_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._release_worker()

    def _release_worker(self) -> None:
        self._idle_workers += 1
        self._free_workers.release()

    async def _forward(self, batch: list[Piece]) -> None:
        """One forward pass on a worker thread, then each request gets its rows; a failed
        forward fails this batch's requests only."""
        now = time.perf_counter()
        jobs = {id(p.job): p.job for p in batch}
        parts = [p.views for p in batch]
        n_views = sum(p.size for p in batch)
        try:
            assert self._pool is not None, "start() the batcher first"
            outputs = await self._faults.run(self._pool, self._run_parts, parts)
            if outputs.logits.shape[0] != n_views:
                raise RuntimeError(
                    f"forward returned {outputs.logits.shape[0]} rows for {n_views} views"
                )
        except Exception as exc:
            error = exc if isinstance(exc, ForwardError) else None
            if error is None:
                log.exception("forward of %d views failed", n_views)
                error = ForwardError(
                    f"the forward pass of this request's batch failed ({type(exc).__name__}); "
                    "the error is logged on the server"
                )
            self._faults.count_fault(error)
            for job in jobs.values():
                if not job.future.done():
                    job.future.set_exception(error)
                self._abandon(job)
            if isinstance(error, ForwardStalledError):
                assert self._pool is not None
                await self._faults.recover(self._pool, self._run_parts, str(error))
            return
        elapsed = time.perf_counter() - now
        self._record(len(jobs), n_views, elapsed)
        self._deliver(batch, outputs, elapsed)

    def _run_parts(self, parts: list[torch.Tensor]) -> ViewOutputs:
        """On the forward thread: every torch op stays on the one thread that runs the
        network, so no second OpenMP team competes with it for the cores."""
        return self._run(parts[0] if len(parts) == 1 else torch.cat(parts))

    def _record(self, n_jobs: int, n_views: int, elapsed: float) -> None:
        rate = self.workers * n_views / max(elapsed, 1e-6)
        self._views_per_s = rate if self._views_per_s == 0 else 0.8 * self._views_per_s + 0.2 * rate
        if self.metrics:
            self.metrics.batch_views.labels(self.model_name).observe(n_views)
            self.metrics.batch_requests.labels(self.model_name).observe(n_jobs)

    @staticmethod
    def _deliver(batch: list[Piece], outputs: ViewOutputs, elapsed: float) -> None:
        offset = 0
        counted: set[int] = set()
        for piece in batch:
            rows = slice(offset, offset + piece.size)
            offset += piece.size
            job = piece.job
            if id(job) not in counted:
                counted.add(id(job))
                job.timings.forward_s += elapsed
                job.timings.batches += 1
            if job.future.done():
                continue
            job.done.append(
                (
                    piece.group,
                    piece.start,
                    ViewOutputs(outputs.features[rows], outputs.logits[rows]),
                )
            )
            job.done_views += piece.size
            if job.done_views == job.size:
                job.future.set_result((job.merged(), job.timings))
