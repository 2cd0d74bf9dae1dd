"""What a forward's faults do (docs/reliability.md): out of memory splits the batch in halves
until it fits; a worker that dies is replaced and its batch run once more; a forward past the
watchdog's limit takes the model out of readiness until a probe forward answers on a fresh
worker, and past the recovery limit out of liveness too (an orchestrator restarts the
process); each event is counted. The batcher (app/serving/batching.py) calls these; the supervised
threads are app/serving/forward_workers.py."""

from __future__ import annotations

import asyncio
import logging
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
from app.serving.forward_workers import ForwardPool

log = logging.getLogger(__name__)

RunParts = Callable[[list[torch.Tensor]], ViewOutputs]


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
    """One model's forwards under supervision: the watchdog's limit, the probe a stalled
    model must answer, why it is out of readiness while it is, and the fault metrics."""

    def __init__(self, model_name: str, metrics: Metrics | None, timeout_s: float | None,
                 probe: torch.Tensor | None, recovery_limit_s: float | None = None,
                 ) -> None:  # fmt: skip
        self.model_name, self.metrics, self.timeout_s = model_name, metrics, timeout_s
        self.recovery_limit_s = recovery_limit_s or None
        self._probe = probe
        self._stalls: list[str] = []  # why the model is out of readiness, while it is
        self._unrecovered: str | None = None  # why it is out of liveness, while it is

    @property
    def unready(self) -> str | None:
        return self._stalls[-1] if self._stalls else None

    @property
    def unrecovered(self) -> str | None:
        """Why the model has been recovering longer than the recovery limit: the process
        should be restarted (liveness fails), since waiting has not brought it back."""
        return self._unrecovered

    async def run(self, pool: ForwardPool, run_parts: RunParts, parts: list[torch.Tensor]
                  ) -> ViewOutputs:  # fmt: skip
        """The forward on a supervised worker, under the watchdog; run once more when the
        worker dies under it (the views were not at fault)."""
        try:
            return await pool.run(run_parts, parts, timeout_s=self.timeout_s)
        except WorkerDiedError:
            self.count_fault(WorkerDiedError())
            if self.metrics:
                self.metrics.forward_retries.labels(self.model_name, "worker_died").inc()
            log.warning("forward worker died; running its batch once more")
            return await pool.run(run_parts, parts, timeout_s=self.timeout_s)

    async def recover(self, pool: ForwardPool, run_parts: RunParts, why: str) -> None:
        """Out of readiness until a probe forward answers on a fresh worker. The probe
        holds this forward's worker slot, so nothing else is scheduled on it meanwhile; it
        is not abandoned for another (waiting spawns no more threads), and one that raises
        is tried again a second later. Not back within the recovery limit: out of liveness
        as well, until it is."""
        self._stalls.append(why)
        if self.metrics:
            self.metrics.model_unready.labels(self.model_name, "forward_stalled").inc()
            self.metrics.model_ready.labels(self.model_name).set(0)
        log.error("model %s out of readiness: %s", self.model_name, why)
        deadline = time.monotonic() + (self.recovery_limit_s or float("inf"))
        probe = self._probe
        while probe is not None:
            attempt = asyncio.ensure_future(pool.run(run_parts, [probe], timeout_s=None))
            try:
                if self._unrecovered is None:
                    left = max(0.0, deadline - time.monotonic())
                    await asyncio.wait({attempt}, timeout=None if left == float("inf") else left)
                    if not attempt.done():
                        self._give_up(why)
                await attempt
                break
            except asyncio.CancelledError:
                attempt.cancel()
                raise
            except Exception as exc:
                log.warning("probe forward of %s failed (%r); trying again", self.model_name, exc)
                await asyncio.sleep(1.0)
        self._stalls.remove(why)
        if self._stalls:
            return
        self._unrecovered = None
        if self.metrics:
            self.metrics.model_recoveries.labels(self.model_name).inc()
            self.metrics.model_ready.labels(self.model_name).set(1)
            self.metrics.model_unrecovered.labels(self.model_name).set(0)
        log.warning("model %s ready again", self.model_name)

    def _give_up(self, why: str) -> None:
        self._unrecovered = (
            f"not recovered within {self.recovery_limit_s:g} s of a stalled forward ({why}); "
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
