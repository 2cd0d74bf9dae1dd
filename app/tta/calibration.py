"""Calibrated probabilities: a temperature per policy, and how honest the probabilities are.

Averaging views changes confidence (an average of softmaxes is flatter than any of them), so
a probability of 0.6 after ten views does not mean what 0.6 means after one. Each policy's
averaged distribution ``p`` is rescaled as ``softmax(log p / T)`` with the temperature ``T``
that minimises the negative log-likelihood on labelled photos; ``T < 1`` sharpens an
under-confident average. The negative log-likelihood is convex in ``1 / T``, so a bracketed
one-dimensional search finds the exact minimum. ``T = 1`` leaves ``p`` as it is.
"""

from __future__ import annotations

import math

import torch

ECE_BINS = 15
BETA_RANGE = (0.05, 20.0)  # 1 / T searched here: T from 0.05 to 20
SEARCH_STEPS = 80
EPS = 1e-12


def calibrate(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` over the last dimension."""
    if temperature == 1.0:
        return probs
    logp = probs.float().clamp_min(EPS).log()
    return torch.softmax(logp / temperature, dim=-1)


def nll(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood of the targets [N] under ``probs`` [N, C]."""
    picked = probs.float().gather(1, targets.long().view(-1, 1)).clamp_min(EPS)
    return float(-picked.log().mean())


def _nll_at(logp: torch.Tensor, targets: torch.Tensor, beta: float) -> float:
    scaled = logp * beta
    return float(
        (torch.logsumexp(scaled, dim=1) - scaled.gather(1, targets.view(-1, 1))[:, 0]).mean()
    )


def fit_temperature(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``targets`` [N] under ``probs`` [N, C]
    rescaled by it (golden-section search on 1 / T, where the NLL is convex)."""
    if probs.shape[0] == 0:
        return 1.0
    logp = probs.float().clamp_min(EPS).log()
    t = targets.long()
    lo, hi = math.log(BETA_RANGE[0]), math.log(BETA_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll_at(logp, t, math.exp(a)), _nll_at(logp, t, math.exp(b))
    for _ in range(SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll_at(logp, t, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll_at(logp, t, math.exp(b))
    return 1.0 / math.exp((lo + hi) / 2)


def ece(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over equal-width bins of top-1 probability, the
    image-weighted gap between mean confidence and accuracy."""
    if probs.shape[0] == 0:
        return 0.0
    conf, pred = probs.float().max(dim=1)
    right = (pred == targets.long()).float()
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for i in range(bins):
        upper = conf <= edges[i + 1] if i == bins - 1 else conf < edges[i + 1]
        inside = (conf >= edges[i]) & upper
        if inside.any():
            gap = (conf[inside].mean() - right[inside].mean()).abs()
            total += float(gap) * int(inside.sum()) / conf.numel()
    return total


def auroc(scores: list[float], correct: list[bool]) -> float | None:
    """How well a confidence score separates right answers from wrong ones: the chance that
    a random right answer scores above a random wrong one (ties count half). None when
    every answer is right, or every one wrong."""
    pos = [s for s, c in zip(scores, correct, strict=True) if c]
    neg = [s for s, c in zip(scores, correct, strict=True) if not c]
    if not pos or not neg:
        return None
    ranked = sorted((s, c) for s, c in zip(scores, correct, strict=True))
    # rank-sum (Mann-Whitney U) with average ranks for ties
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2
        rank_sum += mean_rank * sum(1 for k in range(i, j) if ranked[k][1])
        i = j
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))
