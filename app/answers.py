"""From view outputs to an answer: average at the asked level, calibrate, rank; and the
gate between the stages of a staged policy. The server, the CLI and evaluation all answer
through these functions, so an evaluated policy is the served one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.labels import LabelSet
from app.request import Level
from app.runtime.engine import ViewOutputs
from app.schemas import TopClass
from app.tta.averaging import average_probabilities
from app.tta.calibration import calibrate
from app.tta.stages import Gate, Signal, StagedPolicy
from app.tta.views import ViewSpec


@dataclass
class GateRecord:
    """What one gate saw and decided."""

    gate: Gate
    value: float
    went_on: bool


Head = Callable[[torch.Tensor], torch.Tensor]


def staged_answer(
    policy: StagedPolicy,
    stage_ends: list[int],
    stages_run: int,
    outputs: ViewOutputs,
    level: Level,
    head: Head,
    temperatures: dict[str, float],
) -> tuple[torch.Tensor, float]:
    """The calibrated probabilities [C] after ``stages_run`` stages, and the temperature
    applied: the model's temperature for the views averaged (model.toml ``[calibration]``,
    keyed ``spec@level``), else 1. ``outputs`` holds at least those stages' views, in
    order. The server, the CLI and evaluation all answer through this function."""
    k = stages_run
    if policy.answer == "last" and k > 1:  # the last stage's views alone
        rows = slice(stage_ends[k - 2], stage_ends[k - 1])
        averaged = policy.stages[k - 1].spec
    else:
        rows = slice(0, stage_ends[k - 1])
        averaged = ViewSpec(tuple(p for stage in policy.stages[:k] for p in stage.spec.parts))
    probs = average_probabilities(outputs.features[rows], outputs.logits[rows], head, level)
    temperature = temperatures.get(f"{averaged}@{level}", 1.0)
    return calibrate(probs, temperature), temperature


def next_gate(
    policy: StagedPolicy,
    stage_ends: list[int],
    stages_run: int,
    outputs: ViewOutputs,
    level: Level,
    head: Head,
    temperatures: dict[str, float],
) -> GateRecord:
    """The gate before stage ``stages_run + 1``: its signal on the calibrated answer after
    ``stages_run`` stages (agreement: over every view run so far) and its decision."""
    gate = policy.stages[stages_run].gate
    assert gate is not None  # every stage after the first has one
    probs, _ = staged_answer(policy, stage_ends, stages_run, outputs, level, head, temperatures)
    view_top1 = outputs.logits[: stage_ends[stages_run - 1]].argmax(dim=-1)
    value = gate_signal(gate.signal, probs, view_top1)
    return GateRecord(gate, value, gate.goes_on(value))


def top_classes(labels: LabelSet, probs: torch.Tensor, indices: torch.Tensor) -> list[TopClass]:
    """Classes with their ids, names and probabilities, in the order given."""
    return [
        TopClass(index=int(i), synset=labels.ids[i], label=labels.names[i], prob=float(p))
        for p, i in zip(probs.tolist(), indices.tolist(), strict=True)
    ]


def gate_signal(signal: Signal, probs: torch.Tensor, view_top1: torch.Tensor) -> float:
    """The signal of one image's answer so far: ``probs`` [C] (averaged, calibrated) and
    the top-1 class of each view run so far."""
    if signal == "prob":
        return float(probs.max())
    if signal == "margin":
        top = probs.topk(min(2, probs.shape[-1])).values
        return float(top[0] - top[-1]) if top.numel() > 1 else 1.0
    return float((view_top1 == probs.argmax()).float().mean())
