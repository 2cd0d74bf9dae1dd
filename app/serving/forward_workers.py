"""The forward threads of one model, supervised: a watchdog on every forward, and a worker
that dies or hangs is replaced.

A thread pool (``concurrent.futures``) can do neither: its threads never die of what they
run, and a thread stuck in native code cannot be stopped from Python. So each worker is a
thread of its own with a task queue. A forward that gives no result within ``timeout_s``
raises ``ForwardStalledError`` at once; its worker is retired (it exits when its forward
returns, the result thrown away) and a fresh worker takes its place, so the model keeps
its ``workers`` forwards. A worker whose thread ends while it runs a forward fails that
forward with ``WorkerDiedError`` and is replaced the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from app.errors import ForwardStalledError, WorkerDiedError
from app.metrics import Metrics
from app.threads import name_os_thread

log = logging.getLogger(__name__)
T = TypeVar("T")


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on the event loop, from a worker thread; dropped when the loop has
    closed (a forward that outlived its server's shutdown has nobody left to tell)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


@dataclass
class _Task(Generic[T]):
    fn: Callable[..., T]
    args: tuple[Any, ...]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any = None, exc: BaseException | None = None) -> None:
        """From the worker's thread: hand the outcome to the event loop."""

        def done() -> None:
            if self.future.done():  # the watchdog gave up on it already
                return
            if exc is not None:
                self.future.set_exception(exc)
            else:
                self.future.set_result(result)

        _on_loop(self.loop, done)


class _Worker:
    def __init__(self, pool: ForwardPool, number: int) -> None:
        self.pool = pool
        self.tasks: queue.SimpleQueue[_Task[Any] | None] = queue.SimpleQueue()
        self.retired = False  # the watchdog gave up on its forward: exit after it
        self.dead = False
        self.thread = threading.Thread(
            target=self._main, name=f"forward-{pool.model_name}-{number}", daemon=True
        )

    def _main(self) -> None:
        name_os_thread()  # "forward-<model>-<n>", cut to 15 bytes: per-thread CPU shows it
        if self.pool.threads > 0:
            torch.set_num_threads(self.pool.threads)
        task: _Task[Any] | None = None
        try:
            while not self.retired:
                task = self.tasks.get()
                if task is None:
                    return
                try:
                    result = task.fn(*task.args)
                except Exception as exc:
                    task.settle(exc=exc)
                else:
                    task.settle(result)
                task = None
        except BaseException as exc:  # the thread is ending: say so, and be replaced
            self.dead = True
            log.error("forward worker %s died: %r", self.thread.name, exc)
            if task is not None:
                task.settle(exc=WorkerDiedError(f"the forward worker died ({exc!r})"))
            _on_loop(self.pool.loop, self.pool.replace, self, "died")
        finally:
            if self.retired:
                _on_loop(self.pool.loop, self.pool.stuck_returned)


class ForwardPool:
    """``workers`` supervised forward threads on the running event loop; ``run`` is called
    at most ``workers`` times at once (the batcher's semaphore sees to it)."""

    def __init__(
        self,
        model_name: str,
        workers: int,
        *,
        threads: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.threads = threads
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self._numbers = itertools.count(1)
        self._idle: list[_Worker] = [self._spawn() for _ in range(max(1, workers))]
        self.stuck = 0  # retired workers whose forward has not returned yet

    def _spawn(self) -> _Worker:
        worker = _Worker(self, next(self._numbers))
        worker.thread.start()
        return worker

    def replace(self, worker: _Worker, reason: str) -> None:
        """A fresh worker for one that died or was retired (on the event loop)."""
        if worker in self._idle:
            self._idle.remove(worker)
        self._idle.append(self._spawn())
        if self.metrics:
            self.metrics.worker_restarts.labels(self.model_name, reason).inc()
        log.warning("forward worker %s replaced (%s)", worker.thread.name, reason)

    def stuck_returned(self) -> None:
        self.stuck = max(0, self.stuck - 1)
        if self.metrics:
            self.metrics.stuck_workers.labels(self.model_name).set(self.stuck)

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None) -> T:
        """``fn(*args)`` on an idle worker; ForwardStalledError after ``timeout_s`` (None:
        no limit), WorkerDiedError when the worker's thread ends under it."""
        worker = self._idle.pop()
        future: asyncio.Future[T] = self.loop.create_future()
        worker.tasks.put(_Task(fn, args, future, self.loop))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            worker.retired = True
            worker.tasks.put(None)
            self.stuck += 1
            if self.metrics:
                self.metrics.stuck_workers.labels(self.model_name).set(self.stuck)
            self.replace(worker, "stalled")
            raise ForwardStalledError(
                f"the forward pass gave no result within {timeout_s:g} s; the model is "
                "recovering, retry (another replica, or after Retry-After)"
            ) from None
        finally:
            if not (worker.retired or worker.dead):
                self._idle.append(worker)

    def close(self) -> None:
        """Ask every idle worker to exit (stuck ones are daemon threads: they do not hold
        the process), and wait for them."""
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.tasks.put(None)
        for worker in idle:
            worker.thread.join(timeout=30)
