"""What the view batcher queues: a request's views (a job) in pieces of one shape, and
how each request's rows come back in its own view order, handed over once (app/threads.py's
``Deliver``) by whichever thread settles it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.runtime.engine import ViewOutputs
from app.threads import Deliver
from app.tta.preprocess import ViewGroup


@dataclass
class BatchTimings:
    queue_wait_s: float = 0.0
    forward_s: float = 0.0
    batches: int = 0


@dataclass
class Job:
    """One image's views in the queue. Its fields change under the batcher's lock only."""

    groups: list[ViewGroup]
    deliver: Deliver
    enqueued_at: float  # when the image first arrived: its place in the queue
    submitted_at: float  # when these views were submitted: their queue wait
    done: list[tuple[int, int, ViewOutputs]] = field(default_factory=list)  # group, start
    done_views: int = 0
    timings: BatchTimings = field(default_factory=BatchTimings)
    started: bool = False
    share: int = 0  # view-equivalents a forward took of it when shared among idle workers
    settled: bool = False  # answered, failed or abandoned: its views no longer run

    @property
    def size(self) -> int:
        return sum(len(g.indices) for g in self.groups)

    def settle(self, error: BaseException) -> None:
        """Fail it, once: a job settled already keeps its first outcome (a job's rows are
        handed over by the batcher's ``_deliver``, which settles it as they complete)."""
        if not self.settled:
            self.settled = True
            self.deliver(None, error)

    def pieces(self, max_batch_views: float, view_cost: Callable[[tuple[int, ...]], float]
               ) -> list[Piece]:  # fmt: skip
        """Its views in pieces of one shape, each at most ``max_batch_views``
        view-equivalents (``view_cost(shape)``: one view's)."""
        out: list[Piece] = []
        for gi, group in enumerate(self.groups):
            n, cost = int(group.batch.shape[0]), view_cost(tuple(group.batch.shape))
            step = max(1, int(max_batch_views / cost))
            out += [
                Piece(self, gi, start, min(n, start + step), cost) for start in range(0, n, step)
            ]
        return out

    def merged(self) -> ViewOutputs:
        """Every group's rows, in the request's view order."""
        if len(self.done) == 1 and len(self.groups) == 1:  # one piece: nothing to put together
            return self.done[0][2]
        parts = []
        for gi, group in enumerate(self.groups):
            pieces = sorted(((start, out) for g, start, out in self.done if g == gi),
                            key=lambda item: item[0])  # fmt: skip
            features = torch.cat([out.features for _, out in pieces])
            logits = torch.cat([out.logits for _, out in pieces])
            parts.append((group.indices, ViewOutputs(features, logits)))
        return ViewOutputs.in_view_order(parts)


@dataclass
class Piece:
    job: Job
    group: int
    start: int
    stop: int
    view_cost: float  # view-equivalents of one view of this shape

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def cost(self) -> float:
        return self.size * self.view_cost

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.job.groups[self.group].batch.shape[-2:])

    @property
    def views(self) -> torch.Tensor:
        return self.job.groups[self.group].batch[self.start : self.stop]


@dataclass
class Batch:
    """The pieces one forward runs; ``retried``: this is its run after a worker died."""

    pieces: list[Piece]
    retried: bool = False

    @property
    def views(self) -> int:
        return sum(p.size for p in self.pieces)
