"""Fault injection for the forward pass: how the service's promises under failure are tested.

Off unless the ``MIDSERVE_FAULT_INJECTION`` setting names faults when the server starts; no
request can switch it on (it is read once, into the batcher's forward function). A spec is
a comma list of

    raise@N     the Nth forward raises (a bug in the model or the runtime)
    hang@N      the Nth forward blocks until ``release()`` (or ``hang@N:S``: for S seconds)
    die@N       the forward worker running the Nth forward dies (its thread ends)
    oom>V       every forward of more than V views runs out of memory
    hangload    the model's load blocks until ``release()`` (or ``hangload:S``: S seconds),
                so a test sees the server while its model is still loading

Forwards are counted from 1 in the order they start, warm-up excluded; a split retry
counts as forwards of its own. ``tests/reliability/test_faults.py`` drives each one and
docs/reliability.md says what a client sees.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

_ITEM = re.compile(
    r"^(?:(raise|hang|die)@(\d+)(?::(\d+(?:\.\d+)?)s?)?|oom>(\d+)|hangload(?::(\d+(?:\.\d+)?)s?)?)$"
)
MAX_HANG_S = 600.0  # a hang nobody releases still ends, so no test leaves a thread behind


class InjectedFault(RuntimeError):
    """What an injected ``raise`` throws."""


class WorkerDeath(BaseException):
    """Ends the forward thread it is raised on (not an Exception: nothing catches it)."""


@dataclass(frozen=True)
class FaultPlan:
    raise_at: frozenset[int] = frozenset()
    hang_at: dict[int, float] = field(default_factory=dict)  # forward -> seconds
    die_at: frozenset[int] = frozenset()
    oom_above: int = 0  # views; 0: never
    load_hang_s: float = 0.0  # the load blocks this long (or until released); 0: never

    @classmethod
    def parse(cls, spec: str) -> FaultPlan | None:
        """The plan of a spec; None for an empty one. Raises ValueError naming a bad item."""
        raise_at: set[int] = set()
        die_at: set[int] = set()
        hang_at: dict[int, float] = {}
        oom_above, load_hang_s = 0, 0.0
        items = [s.strip() for s in spec.split(",") if s.strip()]
        for item in items:
            m = _ITEM.match(item)
            if m is None:
                raise ValueError(
                    f"bad fault {item!r}: use raise@N, hang@N, hang@N:S, die@N, oom>V, "
                    "hangload or hangload:S"
                )
            kind, at, seconds, oom, load_s = m.groups()
            if item.startswith("hangload"):
                load_hang_s = min(float(load_s), MAX_HANG_S) if load_s else MAX_HANG_S
            elif oom is not None:
                oom_above = int(oom)
            elif kind == "raise":
                raise_at.add(int(at))
            elif kind == "die":
                die_at.add(int(at))
            else:
                hang_at[int(at)] = min(float(seconds), MAX_HANG_S) if seconds else MAX_HANG_S
        if not items:
            return None
        return cls(frozenset(raise_at), hang_at, frozenset(die_at), oom_above, load_hang_s)


class FaultInjector:
    """Wraps a forward function and makes the planned forwards fail."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.forwards = 0
        self.hanging = threading.Event()  # set while an injected hang blocks a forward
        self._release = threading.Event()
        self._lock = threading.Lock()

    def release(self) -> None:
        """End every injected hang now (a test's way to let a stuck forward return)."""
        self._release.set()

    def before_load(self) -> None:
        """Where the model's load starts: an injected ``hangload`` blocks here."""
        if self.plan.load_hang_s:
            log.warning("injected: the model's load hangs")
            self.hanging.set()
            self._release.wait(self.plan.load_hang_s)
            self.hanging.clear()

    def wrap(self, run: Callable[[torch.Tensor], T]) -> Callable[[torch.Tensor], T]:
        def faulty(batch: torch.Tensor) -> T:
            with self._lock:
                self.forwards += 1
                n = self.forwards
            plan = self.plan
            if plan.oom_above and batch.shape[0] > plan.oom_above:
                raise torch.OutOfMemoryError(
                    f"injected: out of memory at {batch.shape[0]} views (forward {n})"
                )
            if n in plan.raise_at:
                raise InjectedFault(f"injected failure of forward {n}")
            if n in plan.die_at:
                raise WorkerDeath(f"injected death of the worker running forward {n}")
            if n in plan.hang_at:
                log.warning("injected: forward %d hangs", n)
                self.hanging.set()
                self._release.wait(plan.hang_at[n])
                self.hanging.clear()
            return run(batch)

        return faulty


def injector_from_spec(spec: str) -> FaultInjector | None:
    plan = FaultPlan.parse(spec)
    if plan is None:
        return None
    log.warning("fault injection is ON: %s (for tests and drills, never in production)", spec)
    return FaultInjector(plan)
