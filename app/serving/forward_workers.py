"""The forward threads of one model, supervised: each takes its next batch from the
batcher itself, runs it and hands every finished request its rows, so no forward passes
through the event loop; a watchdog thread fails a forward that overruns its limit; a worker
that dies or hangs is replaced.

A thread pool (``concurrent.futures``) could do neither: its threads never die of what
they run, and a thread stuck in native code cannot be stopped from Python. So each worker
is a thread of its own. A forward that gives no result within ``timeout_s`` fails its batch
with ``ForwardStalledError`` as soon as the watchdog sees it; its worker is retired (it
exits when its forward returns, the result thrown away) and a fresh worker takes its place,
first answering the recovery probe (app/serving/forward_faults.py), so the model keeps its
``workers`` forwards. A worker whose thread ends while it runs a forward is replaced by one
that runs the batch once more; a second death fails it with ``WorkerDiedError``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from app.errors import ForwardError, ForwardStalledError, WorkerDiedError
from app.metrics import Metrics
from app.serving.batch_items import Batch
from app.serving.forward_faults import ForwardFaults
from app.threads import name_os_thread

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the workers need of the batcher."""

    def next_batch(self, worker: Worker) -> Batch | None:
        """The next batch to run, waiting for one; None: the worker should exit."""

    def run(self, batch: Batch) -> None:
        """Run it and hand each finished request its rows, or fail the batch's requests
        (WorkerDeath, a BaseException, goes through)."""

    def fail(self, batch: Batch, error: ForwardError) -> None:
        """Fail the batch's requests with ``error``."""


class Worker:
    """One forward thread and what the supervisor knows of it."""

    def __init__(self, name: str, main: Callable[[Worker], None], first: Batch | None,
                 recover: str | None) -> None:  # fmt: skip
        self.first = first  # a batch to run again before any other (its last worker died)
        self.recover = recover  # why to answer the probe before taking work (a stall)
        self.retired = False  # the watchdog gave up on its forward: exit after it
        self.busy: tuple[float, Batch] | None = None  # since when, on what
        self.thread = threading.Thread(target=main, args=(self,), name=name, daemon=True)


class ForwardWorkers:
    """``workers`` supervised forward threads taking batches from ``source``."""

    def __init__(
        self,
        model_name: str,
        workers: int,
        source: BatchSource,
        faults: ForwardFaults,
        probe: Callable[[], object] | None,
        *,
        threads: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        """``probe()``: the forward a recovering model must answer; ``threads``: torch
        intra-op threads on each forward thread (0: as the process)."""
        self.model_name, self.source, self.faults = model_name, source, faults
        self.threads, self.metrics, self._probe = threads, metrics, probe
        self.lock = threading.Lock()  # guards the workers' busy/retired marks and the list
        self._numbers = itertools.count(1)
        self._live: list[Worker] = []
        self.stuck = 0  # retired workers whose forward has not returned yet
        self._stopping = threading.Event()
        for _ in range(max(1, workers)):
            self._spawn()
        self._watchdog: threading.Thread | None = None
        if faults.timeout_s or faults.recovery_limit_s:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"watchdog-{model_name}", daemon=True
            )
            self._watchdog.start()

    def _spawn(self, first: Batch | None = None, recover: str | None = None) -> Worker:
        name = f"forward-{self.model_name}-{next(self._numbers)}"
        worker = Worker(name, self._main, first, recover)
        self._live.append(worker)
        worker.thread.start()
        return worker

    def _replace(self, worker: Worker, reason: str, first: Batch | None = None,
                 recover: str | None = None) -> None:  # fmt: skip
        """A fresh worker for one that died or was retired (under ``lock``)."""
        if worker in self._live:
            self._live.remove(worker)
        if not self._stopping.is_set():
            self._spawn(first, recover)
        if self.metrics:
            self.metrics.worker_restarts.labels(self.model_name, reason).inc()
        log.warning("forward worker %s replaced (%s)", worker.thread.name, reason)

    # -- a worker's thread ----------------------------------------------------------
    def _main(self, worker: Worker) -> None:
        name_os_thread()  # "forward-<model>-<n>", cut to 15 bytes: per-thread CPU shows it
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        batch: Batch | None = None
        try:
            if worker.recover is not None:
                self._recover(worker.recover)
                worker.recover = None
            while True:
                batch, worker.first = worker.first, None
                if batch is None:
                    batch = self.source.next_batch(worker)
                if batch is None:
                    return
                with self.lock:
                    worker.busy = (time.monotonic(), batch)
                self.source.run(batch)
                with self.lock:
                    worker.busy = None
                    if worker.retired:  # stalled: its batch was failed, its place taken
                        self._stuck_returned()
                        return
                batch = None
        except BaseException as exc:  # the thread is ending: say so, and be replaced
            log.error("forward worker %s died: %r", worker.thread.name, exc)
            self._died(worker, batch)

    def _died(self, worker: Worker, batch: Batch | None) -> None:
        with self.lock:
            worker.busy = None
            if worker.retired:
                self._stuck_returned()
                return
            # run once more on the replacement, unless it was the retry or none will come
            retry = batch is not None and not batch.retried and not self._stopping.is_set()
            if batch is not None:
                self.faults.count_fault(WorkerDiedError())
            if retry:
                assert batch is not None
                if self.metrics:
                    self.metrics.forward_retries.labels(self.model_name, "worker_died").inc()
                log.warning("forward worker died; running its batch once more")
                batch = Batch(batch.pieces, retried=True)
            self._replace(worker, "died", batch if retry else None, worker.recover)
        if batch is not None and not retry:
            then = "and again on its retry" if batch.retried else "as the server stops"
            self.source.fail(batch, WorkerDiedError(
                f"the forward worker died running this request's batch, {then}"
            ))  # fmt: skip

    def _stuck_returned(self) -> None:
        self.stuck = max(0, self.stuck - 1)
        if self.metrics:
            self.metrics.stuck_workers.labels(self.model_name).set(self.stuck)

    def _recover(self, why: str) -> None:
        """On a fresh worker after a stall: take no work until the probe answers (tried
        again a second after it raises); then the model is ready again."""
        while self._probe is not None:
            if self._stopping.is_set():
                return
            try:
                self._probe()
                break
            except Exception as exc:
                log.warning("probe forward of %s failed (%r); trying again", self.model_name,
                            exc)  # fmt: skip
                self._stopping.wait(1.0)
        self.faults.recovered(why)

    # -- the watchdog ---------------------------------------------------------------
    def _watch(self) -> None:
        """Checks every few hundredths of the limits: a forward past ``timeout_s`` stalls;
        a recovery past ``recovery_limit_s`` takes the model out of liveness."""
        limits = [s for s in (self.faults.timeout_s, self.faults.recovery_limit_s) if s]
        period = max(0.005, min(0.5, *(s / 16 for s in limits)))
        while not self._stopping.wait(period):
            self.faults.check_recovery_limit()
            if self.faults.timeout_s:
                self._stall_overdue(self.faults.timeout_s)

    def _stall_overdue(self, timeout_s: float) -> None:
        now = time.monotonic()
        why = (
            f"the forward pass gave no result within {timeout_s:g} s; the model is "
            "recovering, retry (another replica, or after Retry-After)"
        )
        stalled: list[Batch] = []
        with self.lock:
            for worker in list(self._live):
                if worker.busy is None or now - worker.busy[0] < timeout_s:
                    continue
                worker.retired = True
                stalled.append(worker.busy[1])
                self.stuck += 1
                if self.metrics:
                    self.metrics.stuck_workers.labels(self.model_name).set(self.stuck)
                self.faults.stalled(why)
                self._replace(worker, "stalled", recover=why)
        for batch in stalled:
            error = ForwardStalledError(why)
            self.faults.count_fault(error)
            self.source.fail(batch, error)

    # -- shutdown -------------------------------------------------------------------
    def close(self, timeout_s: float | None) -> None:
        """Stop taking batches (the source sees to waking the waiting workers), and wait up
        to ``timeout_s`` (None: 30 s) for the forwards running to finish and answer (stuck
        and recovering workers are daemon threads: they do not hold the process)."""
        self._stopping.set()
        deadline = time.monotonic() + (timeout_s or 30.0)
        with self.lock:
            live = [w for w in self._live if not w.retired and w.recover is None]
        for worker in live:
            worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._watchdog is not None:
            self._watchdog.join(timeout=1.0)
