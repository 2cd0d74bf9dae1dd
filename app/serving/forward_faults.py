"""What a forward's faults do (docs/reliability.md): out of memory splits the batch in halves
until it fits; a worker that dies is replaced and its batch run once more; a forward past the
watchdog's limit takes the model out of readiness until a probe forward answers on a fresh
worker, and past the recovery limit out of liveness too (an orchestrator restarts the
process); each event is counted. The supervised threads (app/serving/forward_workers.py) call
these."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from app.errors import (
    ForwardError,
    ForwardOutOfMemoryError,
    ForwardStalledError,
    WorkerDiedError,
)
from app.metrics import Metrics
from app.runtime.engine import ViewOutputs

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's (a plain RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def split_on_oom(
    run: Callable[[torch.Tensor], ViewOutputs],
    on_split: Callable[[int], None] | None = None,
) -> Callable[[torch.Tensor], ViewOutputs]:
    """On out-of-memory, free the CUDA cache and run the batch as two halves, each split
    again while it does not fit; one view that does not fit raises ForwardOutOfMemoryError.
    ``on_split(views)`` is told of each split (a metric)."""

    def guarded(batch: torch.Tensor) -> ViewOutputs:
        try:
            return run(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            n = int(batch.shape[0])
            if n < 2:
                raise ForwardOutOfMemoryError(
                    "out of memory on a single view; retry later or with fewer views"
                ) from exc
            log.warning("out of memory at %d views; retrying as two halves", n)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_split is not None:
                on_split(n)
            a, b = guarded(batch[: n // 2]), guarded(batch[n // 2 :])
            return ViewOutputs(torch.cat([a.features, b.features]), torch.cat([a.logits, b.logits]))

    return guarded


class ForwardFaults:
    """One model's forwards under supervision: the watchdog's limit, why the model is out
    of readiness while it recovers (and out of liveness past the recovery limit), and the
    fault metrics. Called from the forward and watchdog threads, under its own lock."""

    def __init__(self, model_name: str, metrics: Metrics | None, timeout_s: float | None,
                 recovery_limit_s: float | None = None) -> None:  # fmt: skip
        self.model_name, self.metrics, self.timeout_s = model_name, metrics, timeout_s
        self.recovery_limit_s = recovery_limit_s or None
        self._lock = threading.Lock()
        self._stalls: dict[str, float] = {}  # why the model is out of readiness -> since
        self._unrecovered: str | None = None  # why it is out of liveness, while it is

    @property
    def unready(self) -> str | None:
        with self._lock:
            return next(reversed(self._stalls), None)

    @property
    def unrecovered(self) -> str | None:
        """Why the model has been recovering longer than the recovery limit: the process
        should be restarted (liveness fails), since waiting has not brought it back."""
        return self._unrecovered

    def stalled(self, why: str) -> None:
        """A forward stalled: out of readiness until ``recovered(why)``."""
        with self._lock:
            self._stalls[why] = time.monotonic()
        if self.metrics:
            self.metrics.model_unready.labels(self.model_name, "forward_stalled").inc()
            self.metrics.model_ready.labels(self.model_name).set(0)
        log.error("model %s out of readiness: %s", self.model_name, why)

    def recovered(self, why: str) -> None:
        """A fresh worker answered the probe after the stall ``why``: ready again once no
        other stall is outstanding, and live again."""
        with self._lock:
            self._stalls.pop(why, None)
            if self._stalls:
                return
            self._unrecovered = None
        if self.metrics:
            self.metrics.model_recoveries.labels(self.model_name).inc()
            self.metrics.model_ready.labels(self.model_name).set(1)
            self.metrics.model_unrecovered.labels(self.model_name).set(0)
        log.warning("model %s ready again", self.model_name)

    def check_recovery_limit(self) -> None:
        """Out of liveness as well when a recovery has lasted past the limit."""
        limit = self.recovery_limit_s
        with self._lock:
            if limit is None or self._unrecovered is not None or not self._stalls:
                return
            why, since = next(iter(self._stalls.items()))
            if time.monotonic() - since < limit:
                return
            self._unrecovered = (
                f"not recovered within {limit:g} s of a stalled forward ({why}); "
                "restart the process"
            )
        if self.metrics:
            self.metrics.model_unrecovered.labels(self.model_name).set(1)
        log.error("model %s: %s", self.model_name, self._unrecovered)

    def count_fault(self, error: ForwardError) -> None:
        if self.metrics is None:
            return
        kind = {
            ForwardStalledError: "stalled",
            ForwardOutOfMemoryError: "out_of_memory",
            WorkerDiedError: "worker_died",
        }.get(type(error), "raised")
        self.metrics.forward_faults.labels(self.model_name, kind).inc()

    def count_split(self, views: int) -> None:
        """On the forward thread: one batch of ``views`` split after out of memory."""
        if self.metrics:
            self.metrics.forward_faults.labels(self.model_name, "out_of_memory").inc()
            self.metrics.forward_retries.labels(self.model_name, "split").inc()
