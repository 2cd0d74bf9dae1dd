"""The server's own threads: their OS names, the preparation pool, and how a thread hands
an outcome to the event loop.

Python 3.11 names a thread for Python only: the kernel still calls every thread by the
process's name, so per-thread CPU (``/proc/PID/task/TID/comm``, ``top -H``, ``midserve
bench``'s CPU budget) could not tell preparation from forward threads. Threads a named
thread starts (OpenMP teams) inherit its name.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import queue
import sys
import threading
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
# (result, None) or (None, error), called once, from any thread
Deliver = Callable[[Any, BaseException | None], None]

PR_SET_NAME = 15  # linux/prctl.h
NAME_BYTES = 15  # the kernel keeps 16 bytes, the NUL included


@cache
def _prctl() -> Callable[..., Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread an OS name: ``name``, or its Python name, cut to 15 bytes.
    Does nothing off Linux; a failed call only leaves the name as it was."""
    prctl = _prctl()
    if prctl is None:
        return
    raw = (name or threading.current_thread().name).encode("utf-8", "replace")[:NAME_BYTES]
    prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)


def to_future(future: asyncio.Future[Any]) -> Deliver:
    """A Deliver that settles ``future`` on its event loop, from any thread: one wake-up of
    the loop. Dropped when the future is done already (its waiter timed out or went away)
    or the loop has closed (nobody is left to tell)."""
    loop = future.get_loop()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def deliver(result: Any, error: BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            if not loop.is_closed():
                raise

    return deliver


class TaskThreads:
    """A fixed set of named daemon threads running queued calls in order (the preparation
    pool). A call is one queue put, and it hands its outcome on itself: concurrent.futures'
    pool builds a future, takes two locks and checks its threads on every submit, a tenth
    of a millisecond of the event loop's time per request under load."""

    def __init__(self, workers: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None]
        self._tasks = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._main, name=f"{name}_{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` on the next free thread; what it raises is logged."""
        if self._closed:
            raise RuntimeError("the preparation pool has shut down")
        self._tasks.put((fn, args))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the pool, its result (or error) awaited on the running loop."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        deliver = to_future(future)

        def call() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                deliver(None, exc)
            else:
                deliver(result, None)

        self.submit(call)
        return await future

    def _main(self) -> None:
        name_os_thread()
        while (task := self._tasks.get()) is not None:
            fn, args = task
            try:
                fn(*args)
            except Exception:
                log.exception("a task of %s failed", threading.current_thread().name)

    def shutdown(self) -> None:
        """The threads end once the calls already queued have run."""
        self._closed = True
        for _ in self._threads:
            self._tasks.put(None)
