"""Staged policies scored offline, and each policy's calibration, from one pool per image.

Every stage's views are in the pool, so for a first-stage config A and a second-stage config
B the answer of "A, then B for the images whose gate signal is below t" is known for every
image and every threshold at once: the image's A answer where it stopped, else the average
of A's and B's views (softmax level: the view-count-weighted mean of the two averages) or
B's alone (``last``). Images are split in two halves by a hash of their name: temperatures
and thresholds are fitted on the *fit* half and accuracy, cost and calibration are reported
on the *test* half, so a written policy is never scored on the images that chose it.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.answers import averaged_key, gate_signal
from app.jobs.evaluate.tables import Paired, paired
from app.tta.calibration import auroc, calibrate, ece, fit_temperature, nll
from app.tta.stages import SIGNALS, Gate, Signal, Stage, StagedPolicy
from app.tta.views import ViewSpec

FIRST_STAGE_MAX_COST = 1.5  # view-equivalents: a first stage is cheap, or it is no gate
ANSWERS = ("all", "last")


def encode_probs(probs: torch.Tensor) -> str:
    """A probability vector as base64 float32, exact, for the per-image records."""
    return base64.b64encode(probs.float().contiguous().numpy().tobytes()).decode()


def decode_probs(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32)


def fit_half(name: str, seed: int) -> bool:
    """Which half an image is in: a hash of its name and the run seed, not its order."""
    return zlib.crc32(f"split:{seed}:{name}".encode()) % 2 == 0


@dataclass
class Scored:
    """One config's per-image answers, as arrays over the images."""

    probs: torch.Tensor  # [N, C]
    view_top1: list[list[int]]
    views: np.ndarray  # [N] views run
    cost: np.ndarray  # [N] view-equivalents
    gflops: np.ndarray  # [N]


def scored(records: Sequence[dict[str, Any]], name: str) -> Scored:
    return Scored(
        torch.from_numpy(np.stack([decode_probs(r["probs"][name]) for r in records])),
        [list(r["view_top1"][name]) for r in records],
        np.array([r["views"][name] for r in records], dtype=np.float64),
        np.array([r["view_equivalents"][name] for r in records], dtype=np.float64),
        np.array([r["gflops"][name] for r in records], dtype=np.float64),
    )


def joint_probs(first: Scored, second: Scored) -> torch.Tensor:
    """Both stages' views averaged at the softmax level, as the server's ``all`` answer
    does: each stage's mean weighted by its view count, per image."""
    n1 = torch.from_numpy(first.views).view(-1, 1)
    n2 = torch.from_numpy(second.views).view(-1, 1)
    return (first.probs * n1 + second.probs * n2) / (n1 + n2)


def signals(kind: Signal, probs: torch.Tensor, view_top1: list[list[int]]) -> np.ndarray:
    return np.array(
        [gate_signal(kind, p, torch.tensor(v)) for p, v in zip(probs, view_top1, strict=True)]
    )


@dataclass(frozen=True)
class Calibration:
    """A config's temperature (fitted on the fit half) and its test-half honesty."""

    config: str
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    auroc: dict[str, float | None]  # error detection by signal, calibrated, test half


def calibration_of(name: str, s: Scored, targets: torch.Tensor, fit: np.ndarray) -> Calibration:
    f, t = torch.from_numpy(fit), torch.from_numpy(~fit)
    temperature = fit_temperature(s.probs[f], targets[f])
    test_p = s.probs[t]
    after = calibrate(test_p, temperature)
    right = (after.argmax(1) == targets[t]).tolist()
    tops = [v for v, keep in zip(s.view_top1, ~fit, strict=True) if keep]
    return Calibration(
        config=name,
        temperature=round(temperature, 4),
        nll_before=nll(test_p, targets[t]),
        nll_after=nll(after, targets[t]),
        ece_before=ece(test_p, targets[t]),
        ece_after=ece(after, targets[t]),
        auroc={k: auroc(signals(k, after, tops).tolist(), right) for k in SIGNALS},
    )


@dataclass(frozen=True)
class StagedRow:
    """A gated policy chosen on the fit half for one budget, scored on the test half."""

    policy: str  # the spec the server runs, threshold included
    budget: float  # mean view-equivalents per image it was chosen within (fit half)
    images: int  # test half
    top1: float
    top5: float
    view_equivalents: float  # mean per image, test half
    escalated: float  # share of test images that went on to stage 2
    paired: Paired  # against the center crop on the same test images
    fit_top1: float
    fit_view_equivalents: float
    fit_nll: float
    temperatures: dict[str, float]  # calibration key (views run) -> temperature
    gflops: float = math.nan  # mean per image, test half
    ms_per_image: float = math.nan  # measured on the serving path (--time-images)


@dataclass
class _Candidate:
    first: str
    second: str
    signal: Signal
    answer: str
    gate_values: np.ndarray  # [N] signal of the calibrated first-stage answer
    first_right: np.ndarray  # [N] top-1 right after stage 1
    joint_right: np.ndarray  # [N] top-1 right after stage 2
    first_top5: np.ndarray
    joint_top5: np.ndarray
    first_nll: np.ndarray  # [N] -log p(target), calibrated
    joint_nll: np.ndarray
    first_cost: np.ndarray
    joint_cost: np.ndarray
    first_gflops: np.ndarray
    joint_gflops: np.ndarray
    temperatures: dict[str, float]


def rounded(temperatures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in temperatures.items()}


def _nll_each(probs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    picked = probs.float().gather(1, targets.long().view(-1, 1))[:, 0].clamp_min(1e-12)
    return (-picked.log()).numpy().astype(np.float64)


def _top5(probs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    top = probs.topk(min(5, probs.shape[1]), dim=1).indices
    return (top == targets.view(-1, 1)).any(1).numpy()


def _candidates(
    by_name: dict[str, Scored], stages: dict[str, Stage], targets: torch.Tensor,
    fit: np.ndarray,
) -> list[_Candidate]:  # fmt: skip
    f = torch.from_numpy(fit)
    temps = {n: fit_temperature(s.probs[f], targets[f]) for n, s in by_name.items()}
    firsts = [
        n for n, s in by_name.items()
        if float(s.cost.mean()) <= FIRST_STAGE_MAX_COST and stages[n].model is None
    ]  # fmt: skip
    out = []
    for a in firsts:
        sa = by_name[a]
        p1 = calibrate(sa.probs, temps[a])
        right1, top5_1 = (p1.argmax(1) == targets).numpy(), _top5(p1, targets)
        nll1 = _nll_each(p1, targets)
        for b, sb in by_name.items():
            same_model = stages[b].model is None
            if b == a or (same_model and float(sb.cost.mean()) <= float(sa.cost.mean())):
                continue
            joint = joint_probs(sa, sb)
            key = averaged_key([stages[a], stages[b]], "softmax")
            joint_t = fit_temperature(joint[f], targets[f])
            answers = {
                "all": (calibrate(joint, joint_t), {key: joint_t}),
                "last": (calibrate(sb.probs, temps[b]), {b: temps[b]}),
            }
            for answer, (p2, t2) in answers.items():
                right2, top5_2 = (p2.argmax(1) == targets).numpy(), _top5(p2, targets)
                nll2 = _nll_each(p2, targets)
                for kind in SIGNALS:
                    out.append(_Candidate(
                        a, b, kind, answer, signals(kind, p1, sa.view_top1), right1, right2,
                        top5_1, top5_2, nll1, nll2, sa.cost, sa.cost + sb.cost, sa.gflops,
                        sa.gflops + sb.gflops,
                        {a: round(temps[a], 4), **rounded(t2)},
                    ))  # fmt: skip
    return out


@dataclass(frozen=True)
class Outcome:
    """A candidate at one threshold, on some of the images."""

    top1: float
    nll: float  # mean -log p(target): the tie-break, finer than top-1 on few images
    cost: float  # mean view-equivalents
    right: np.ndarray
    went_on: np.ndarray

    def key(self) -> tuple[float, float, float]:
        """What choosing maximises: top-1, then likelihood, then thrift."""
        return (self.top1, -self.nll, -self.cost)


def _outcome(c: _Candidate, threshold: float, mask: np.ndarray) -> Outcome:
    on = c.gate_values[mask] < threshold
    right = np.where(on, c.joint_right[mask], c.first_right[mask])
    nll = np.where(on, c.joint_nll[mask], c.first_nll[mask])
    cost = np.where(on, c.joint_cost[mask], c.first_cost[mask])
    return Outcome(float(right.mean()), float(nll.mean()), float(cost.mean()), right, on)


def _best_threshold(c: _Candidate, fit: np.ndarray, budget: float) -> float | None:
    """The fit half's best threshold within ``budget`` (Outcome.key)."""
    values = np.unique(np.round(c.gate_values[fit], 4))
    best: tuple[Outcome, float] | None = None
    for t in [*values.tolist(), 1.0]:
        o = _outcome(c, t, fit)
        if o.cost <= budget and (best is None or o.key() > best[0].key()):
            best = (o, t)
    return None if best is None else best[1]


def staged_rows(
    records: Sequence[dict[str, Any]],
    specs: Mapping[str, ViewSpec | Stage],
    baseline: str,
    budgets: Sequence[float],
    seed: int,
) -> tuple[list[StagedRow], list[Calibration]]:
    """For each budget, the best gated policy (chosen on the fit half) and every config's
    calibration; ``specs``: the softmax-level configs by name, the baseline among them,
    each a view spec of the requested model or a stage on another model (a cascade's
    later stage, whose records hold its cost in the requested model's view-equivalents)."""
    stages = {n: s if isinstance(s, Stage) else Stage(s) for n, s in specs.items()}
    if len(records) < 4 or baseline not in specs:
        return [], []
    fit = np.array([fit_half(r["file"], seed) for r in records])
    if fit.all() or not fit.any():
        return [], []
    targets = torch.tensor([r["target"] for r in records])
    by_name = {n: scored(records, n) for n in specs}
    calibrations = [calibration_of(n, s, targets, fit) for n, s in by_name.items()]
    candidates = _candidates(by_name, stages, targets, fit)
    base_right = (by_name[baseline].probs.argmax(1) == targets).numpy()
    test = ~fit
    rows = []
    for budget in budgets:
        chosen: tuple[Outcome, _Candidate, float] | None = None
        for c in candidates:
            t = _best_threshold(c, fit, budget)
            if t is None:
                continue
            o = _outcome(c, t, fit)
            if chosen is None or o.key() > chosen[0].key():
                chosen = (o, c, t)
        if chosen is None:
            continue
        on_fit, c, t = chosen
        o = _outcome(c, t, test)
        on = o.went_on
        top5 = np.where(on, c.joint_top5[test], c.first_top5[test])
        gflops = np.where(on, c.joint_gflops[test], c.first_gflops[test])
        second = stages[c.second]
        policy = StagedPolicy(
            (stages[c.first], Stage(second.spec, Gate(c.signal, t), second.model)),
            "last" if c.answer == "last" else "all",
        )
        rows.append(StagedRow(
            policy=str(policy), budget=budget, images=int(test.sum()), top1=o.top1,
            top5=float(top5.mean()), view_equivalents=o.cost, escalated=float(on.mean()),
            paired=paired(o.right, base_right[test], seed=seed), fit_top1=on_fit.top1,
            fit_view_equivalents=on_fit.cost, fit_nll=on_fit.nll, temperatures=c.temperatures,
            gflops=float(gflops.mean()),
        ))  # fmt: skip
    return rows, calibrations


def plain_halves(records: Sequence[dict[str, Any]], name: str, seed: int) -> dict[str, float]:
    """A plain config on the same halves as the staged rows: top-1, calibrated NLL (its
    temperature fitted on the fit half) and mean cost, so the two can be compared and
    chosen between on the fit half alone."""
    fit = np.array([fit_half(r["file"], seed) for r in records])
    s = scored(records, name)
    targets = torch.tensor([r["target"] for r in records])
    f = torch.from_numpy(fit)
    probs = calibrate(s.probs, fit_temperature(s.probs[f], targets[f]))
    right = (probs.argmax(1) == targets).numpy()
    nll = _nll_each(probs, targets)

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else math.nan

    return {
        "fit_top1": mean(right[fit]),
        "fit_nll": mean(nll[fit]),
        "fit_view_equivalents": mean(s.cost[fit]),
        "top1": mean(right[~fit]),
        "view_equivalents": mean(s.cost[~fit]),
    }
