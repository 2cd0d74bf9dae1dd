"""What the view batcher queues: a request's views (a job) in pieces of one shape, and
how each request's rows come back in its own view order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from app.runtime.engine import ViewOutputs
from app.tta.preprocess import ViewGroup


@dataclass
class BatchTimings:
    queue_wait_s: float = 0.0
    forward_s: float = 0.0
    batches: int = 0


@dataclass
class Job:
    groups: list[ViewGroup]
    future: asyncio.Future[tuple[ViewOutputs, BatchTimings]]
    enqueued_at: float  # when the image first arrived: its place in the queue
    submitted_at: float  # when these views were submitted: their queue wait
    done: list[tuple[int, int, ViewOutputs]] = field(default_factory=list)  # group, start
    done_views: int = 0
    timings: BatchTimings = field(default_factory=BatchTimings)
    started: bool = False

    @property
    def size(self) -> int:
        return sum(len(g.indices) for g in self.groups)

    @property
    def abandoned(self) -> bool:
        return self.future.done()

    def merged(self) -> ViewOutputs:
        """Every group's rows, in the request's view order."""
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
