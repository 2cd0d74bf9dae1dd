"""One unit of compute across models: what a view of one model costs in views of another.

A cascade's later stage on a stronger model is paid for in the requested model's
view-equivalents, so that answers, metrics, budgets and the policy search count every
stage alike. The ratio comes from each engine's measured views per second on its served
plan (the tuner's timing of that plan, on this machine), and from the networks' FLOPs per
view when either engine was not timed (tuning off, or a plan forced by settings)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from app.model_config import ModelConfig
from app.runtime.engine import Engine


@dataclass(frozen=True)
class ViewCost:
    """What one view of a model (at its input size) costs in another model's views."""

    ratio: float
    source: str  # measured | gflops


def measured_views_per_s(engine: Engine) -> float | None:
    """The served plan's views per second as the tuner timed it here; None: not timed."""
    report = engine.tuning
    if report is None:
        return None
    for trial in report.trials:
        if trial.plan == report.chosen and trial.views_per_s:
            return float(trial.views_per_s)
    return None


def network_gflops(network: torch.nn.Module, shape: tuple[int, int]) -> float:
    """GFLOPs of one view of ``shape`` (height, width) through ``network``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(torch.zeros(1, 3, *shape))
    return counter.get_total_flops() / 1e9


def gflops_per_view(cfg: ModelConfig) -> float:
    """GFLOPs of one view at the model's input size, on the bare architecture."""
    return _gflops(cfg.arch, cfg.num_classes, cfg.input_size)


@lru_cache(maxsize=32)
def _gflops(arch: str, num_classes: int, size: int) -> float:
    import timm

    network = timm.create_model(arch, pretrained=False, num_classes=num_classes).eval()
    return network_gflops(network, (size, size))


def view_cost(of: Engine, unit: Engine) -> ViewCost:
    """One view of ``of`` in views of ``unit``: measured time per view where both were
    timed on this machine, else FLOPs per view."""
    a, b = measured_views_per_s(unit), measured_views_per_s(of)
    if a and b:
        return ViewCost(a / b, "measured")
    return ViewCost(gflops_per_view(of.cfg) / gflops_per_view(unit.cfg), "gflops")
