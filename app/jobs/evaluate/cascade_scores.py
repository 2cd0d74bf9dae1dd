"""Policies scored on the test half of the cascade search: a gated policy replayed from
the per-photo records as the server answers it, and every policy's top-1 and compute
pooled over the folders and per folder, paired against the references."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.answers import averaged_key
from app.jobs.evaluate.staged import Scored, joint_probs, signals
from app.jobs.evaluate.tables import Paired, paired
from app.tta.calibration import calibrate
from app.tta.stages import parse_policy

if TYPE_CHECKING:
    from app.jobs.evaluate.cascade import CascadeInputs


@dataclass(frozen=True)
class Answered:
    """A policy's per-photo outcome on every merged photo."""

    right: np.ndarray
    cost: np.ndarray
    went_on: np.ndarray


def replay(policy_text: str, temperatures: dict[str, float], by_name: dict[str, Scored],
           targets: torch.Tensor) -> Answered:  # fmt: skip
    """A two-stage policy answered from the records as the server answers it: the gate on
    the calibrated first answer; then the later stage alone, or both averaged by view
    count (their temperature does not move the top-1, so only the gate's is applied)."""
    policy = parse_policy(policy_text)
    first, second = policy.stages[0], policy.stages[1]
    a, b = averaged_key([first], "softmax"), averaged_key([second], "softmax")
    sa, sb = by_name[a], by_name[b]
    p1 = calibrate(sa.probs, temperatures.get(a, 1.0))
    assert second.gate is not None
    on = signals(second.gate.signal, p1, sa.view_top1) < second.gate.threshold
    p2 = sb.probs if policy.answer == "last" else joint_probs(sa, sb)
    right = np.where(on, (p2.argmax(1) == targets).numpy(), (p1.argmax(1) == targets).numpy())
    return Answered(right, np.where(on, sa.cost + sb.cost, sa.cost), on)


def plain_answered(s: Scored, targets: torch.Tensor) -> Answered:
    right = (s.probs.argmax(1) == targets).numpy()
    return Answered(right, s.cost, np.zeros(len(right), dtype=bool))


@dataclass(frozen=True)
class KindScore:
    images: int
    top1: float
    view_equivalents: float
    escalated: float
    vs: dict[str, Paired]  # against each reference, same photos


@dataclass(frozen=True)
class PolicyScore:
    """One policy on the test half: all folders pooled, and each folder."""

    policy: str
    model: str  # the model of a plain config; "cascade" or "staged" for gated ones
    budget: float | None
    pooled: KindScore
    kinds: dict[str, KindScore]
    fit_top1: float | None = None
    fit_view_equivalents: float | None = None
    temperatures: dict[str, float] = dataclasses.field(default_factory=dict)
    ms_per_image: float | None = None


def score_policy(name: str, model: str, answered: Answered, inputs: CascadeInputs,
                 refs: dict[str, Answered], test: np.ndarray, seed: int,
                 **extra: Any) -> PolicyScore:  # fmt: skip
    kinds = np.array([r["kind"] for r in inputs.records])

    def on(mask: np.ndarray) -> KindScore:
        m = mask & test
        return KindScore(
            images=int(m.sum()),
            top1=float(answered.right[m].mean()) if m.any() else float("nan"),
            view_equivalents=float(answered.cost[m].mean()) if m.any() else float("nan"),
            escalated=float(answered.went_on[m].mean()) if m.any() else 0.0,
            vs={r: paired(answered.right[m], a.right[m], seed=seed) for r, a in refs.items()},
        )

    every = np.ones(len(kinds), dtype=bool)
    return PolicyScore(name, model, extra.pop("budget", None), on(every),
                       {k: on(kinds == k) for k in inputs.kinds}, **extra)  # fmt: skip
