"""The views waiting for a forward, in queue order, and their view-equivalents: the
batcher's queue as a plain structure (its lock is the batcher's)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from app.serving.batch_items import Job, Piece


class PendingViews:
    """Pieces of queued jobs, oldest image first; ``views`` counts them in
    view-equivalents, with room held for later stages (``hold``). ``on_change(views)``
    hears every new count (a gauge)."""

    def __init__(self, on_change: Callable[[float], None] | None = None) -> None:
        self._pieces: deque[Piece] = deque()
        self.views = 0.0
        self._on_change = on_change

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def __iter__(self) -> Iterator[Piece]:
        return iter(self._pieces)

    def head(self) -> Piece:
        return self._pieces[0]

    def hold(self, views: float) -> None:
        """Count ``views`` more (negative: fewer) without pieces: room held or given back."""
        self.views = max(0.0, self.views + views)
        if self._on_change is not None:
            self._on_change(self.views)

    def add(self, pieces: list[Piece], enqueued_at: float) -> None:
        """At the end, or for an older image's later stage, before the first newer work."""
        queue = self._pieces
        if not queue or queue[-1].job.enqueued_at <= enqueued_at:
            queue.extend(pieces)
        else:
            at = next(i for i, p in enumerate(queue) if p.job.enqueued_at > enqueued_at)
            self._pieces = deque([*list(queue)[:at], *pieces, *list(queue)[at:]])
        self.hold(sum(p.cost for p in pieces))

    def drop(self, job: Job) -> None:
        """Take a job's pieces out (it was answered, failed or abandoned)."""
        dropped = [p for p in self._pieces if p.job is job]
        if dropped:
            self._pieces = deque(p for p in self._pieces if p.job is not job)
            self.hold(-sum(p.cost for p in dropped))

    def clear(self) -> None:
        self._pieces.clear()
        self.hold(-self.views)

    def take(self, room_for: Callable[[], float]) -> list[Piece]:
        """Views of one shape, the oldest waiting view's, up to ``room_for()``
        view-equivalents (asked once settled pieces are gone), in arrival order; a piece
        that does not fit is split."""
        while self._pieces and self._pieces[0].job.settled:
            self.hold(-self._pieces.popleft().cost)
        if not self._pieces:
            return []
        shape = self._pieces[0].shape
        room = room_for()
        now = time.perf_counter()
        batch: list[Piece] = []
        kept: deque[Piece] = deque()
        taken_views = 0.0
        for piece in self._pieces:
            if piece.job.settled:
                taken_views += piece.cost  # gone from the count as well
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
            taken_views += taken.cost
        self._pieces = kept
        self.hold(-taken_views)
        return batch
