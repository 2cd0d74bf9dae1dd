"""What a view policy costs: FLOPs from a counter, measured milliseconds per image on the
serving path, the accuracy-vs-compute Pareto front, and the best policy under a budget."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from app.jobs.evaluate.configs import EvalConfig
from app.jobs.evaluate.staged import StagedRow
from app.jobs.evaluate.tables import Row
from app.model_config import ModelConfig, write_model_config
from app.pipeline import ImagePipeline
from app.repository import build_network
from app.request import ClassifyRequest, Level
from app.tta.stages import StagedPolicy

TIMING_ROUNDS = 3


class FlopCounter:
    """GFLOPs of one view of a given shape, counted once per shape on the plain network
    (the inference rewrites change no multiply-add count, and fused oneDNN ops are opaque
    to the counter)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.gflops = lru_cache(maxsize=None)(self._count)

    @property
    def network(self) -> torch.nn.Module:
        if not hasattr(self, "_network"):
            self._network = build_network(self.cfg).eval()
        return self._network

    def _count(self, shape: tuple[int, int]) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.network(torch.zeros(1, 3, *shape))
        return counter.get_total_flops() / 1e9


def time_configs(
    pipeline: ImagePipeline, configs: Sequence[EvalConfig], photos: list[bytes]
) -> dict[str, float]:
    """Milliseconds per image of each config alone through the serving pipeline."""
    jobs = [(c.name, pipeline, c.asked, c.level) for c in configs]
    return time_policies(jobs, photos)


def time_policies(
    jobs: Sequence[tuple[str, ImagePipeline, StagedPolicy, Level]], photos: list[bytes]
) -> dict[str, float]:
    """Milliseconds per image of each (name, pipeline, policy, level) alone through the
    serving pipeline (decode to answer, no batching across images), medians of
    interleaved rounds, so the machine's drift falls on every policy alike."""
    rounds: dict[str, list[float]] = {name: [] for name, *_ in jobs}
    for _ in range(TIMING_ROUNDS):
        for name, pipeline, policy, level in jobs:
            request = ClassifyRequest(policy, level, 1, 0)
            t0 = time.perf_counter()
            for data in photos:
                pipeline.classify(data, request)
            rounds[name].append(1000.0 * (time.perf_counter() - t0) / len(photos))
    return {name: statistics.median(ms) for name, ms in rounds.items()}


def pareto_front(rows: Sequence[Row]) -> list[Row]:
    """Rows no other row beats on both top-1 and GFLOPs per image, cheapest first."""
    front = [
        r
        for r in rows
        if not any(
            (o.top1 >= r.top1 and o.gflops <= r.gflops) and (o.top1 > r.top1 or o.gflops < r.gflops)
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r.gflops)


def best_under_budget(rows: Sequence[Row], budget: float) -> Row | None:
    """The most accurate row at most ``budget`` view-equivalents per image (the cheaper on
    a tie); ``auto`` rows are left out, since they are what is being chosen."""
    fits = [r for r in rows if r.view_equivalents <= budget and not r.config.startswith("auto")]
    return max(fits, key=lambda r: (r.top1, -r.gflops), default=None)


@dataclass(frozen=True)
class ChosenPolicy:
    """What ``views=auto`` will serve, the temperatures its answers are calibrated with,
    and the numbers it was chosen by (fit half) and is reported by (test half)."""

    spec: str
    temperatures: dict[str, float]
    fit_top1: float
    fit_nll: float
    fit_view_equivalents: float
    top1: float
    view_equivalents: float


def choose_policy(
    halves: dict[str, dict[str, float]],
    staged: Sequence[StagedRow],
    temperatures: dict[str, float],
    budget: float,
) -> ChosenPolicy | None:
    """The most accurate policy on the fit half within ``budget`` view-equivalents per image
    on average, plain or gated (on a tie the likelier, then the cheaper). ``halves``: the
    plain softmax configs on the two halves; ``temperatures``: each plain config's, fitted
    on the fit half."""
    options = [
        ChosenPolicy(name.rpartition("@")[0], {name: temperatures[name]} if name in temperatures
                     else {}, h["fit_top1"], h["fit_nll"], h["fit_view_equivalents"], h["top1"],
                     h["view_equivalents"])
        for name, h in halves.items()
        if h["fit_view_equivalents"] <= budget
    ] + [
        ChosenPolicy(r.policy, r.temperatures, r.fit_top1, r.fit_nll, r.fit_view_equivalents,
                     r.top1, r.view_equivalents)
        for r in staged
        if r.budget == budget
    ]  # fmt: skip
    return max(
        options, key=lambda c: (c.fit_top1, -c.fit_nll, -c.fit_view_equivalents), default=None
    )


def write_policy(
    cfg: ModelConfig, spec: str, temperatures: dict[str, float] | None = None
) -> ModelConfig:
    """Make ``spec`` what ``views=auto`` serves for this model (model.toml), with the
    temperatures its answers are calibrated with (replacing earlier ones)."""
    out = cfg.with_changes(auto_views=spec, calibration=dict(temperatures or {}))
    assert cfg.folder is not None
    write_model_config(out, cfg.folder)
    return out


def plot_policies(
    rows: Sequence[Row], title: str, path: Path, staged: Sequence[StagedRow] = ()
) -> None:
    """Top-1 against GFLOPs per image, every config labelled, the Pareto front joined;
    gated policies (scored on the test half only) in their own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for n, r in enumerate(sorted(rows, key=lambda r: (r.gflops, r.top1))):
        err = None
        if r.paired is not None:  # the paired 95 % CI of the difference, around this top-1
            low, high = r.paired.diff - r.paired.ci_low, r.paired.ci_high - r.paired.diff
            err = [[100 * low], [100 * high]]
        label = "top-1; bar: paired 95 % CI of the gain over center" if n == 0 else None
        ax.errorbar(r.gflops, 100 * r.top1, yerr=err, fmt="o", color="tab:blue", capsize=3,
                    label=label)  # fmt: skip
        name = r.config.rpartition("@")[0].replace(":1", "")
        ax.annotate(name, (r.gflops, 100 * r.top1), fontsize=7, textcoords="offset points",
                    xytext=(5, 4 if n % 2 else -10))  # fmt: skip
    for n, g in enumerate(staged):
        label = "gated policy (test half)" if n == 0 else None
        ax.plot(g.gflops, 100 * g.top1, "D", color="tab:green", label=label)
        ax.annotate(f"{g.policy} ({100 * g.escalated:.0f} % on)".replace(":1", ""),
                    (g.gflops, 100 * g.top1), fontsize=6, color="tab:green",
                    textcoords="offset points", xytext=(5, -12 if n % 2 else 6))  # fmt: skip
    front = pareto_front(rows)
    ax.plot([r.gflops for r in front], [100 * r.top1 for r in front], "-", color="tab:orange",
            label="Pareto front")  # fmt: skip
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
