"""From view outputs to an answer: average at the asked level, calibrate, rank; and the
gate between the stages of a staged policy. The server, the CLI and evaluation all answer
through these functions, so an evaluated policy is the served one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from app.labels import LabelSet
from app.request import Level
from app.runtime.engine import ViewOutputs
from app.tta.averaging import average_probabilities
from app.tta.calibration import calibrate
from app.tta.stages import Gate, Signal, StagedPolicy
from app.tta.views import ViewSpec


@dataclass(frozen=True, slots=True)
class TopClass:
    """One ranked class of an answer."""

    index: int
    synset: str
    label: str
    prob: float


@dataclass
class GateRecord:
    """What one gate saw and decided."""

    gate: Gate
    value: float
    went_on: bool


Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StagedAnswers:
    """How one policy is answered at one level: averaged through ``head``, calibrated by
    the model's temperature for the views averaged (model.toml ``[calibration]``, keyed
    ``spec@level``; else 1). The server, the CLI and evaluation all answer through it."""

    policy: StagedPolicy
    level: Level
    head: Head
    temperatures: Mapping[str, float]

    def answer(self, outputs: ViewOutputs, stages_run: int) -> tuple[torch.Tensor, float]:
        """The calibrated probabilities [C] after ``stages_run`` stages (``outputs`` holds
        at least those stages' views, in order) and the temperature applied."""
        policy, ends, k = self.policy, self.policy.stage_ends, stages_run
        if policy.answer == "last" and k > 1:  # the last stage's views alone
            rows = slice(ends[k - 2], ends[k - 1])
            averaged = policy.stages[k - 1].spec
        else:
            rows = slice(0, ends[k - 1])
            averaged = ViewSpec(tuple(p for stage in policy.stages[:k] for p in stage.spec.parts))
        probs = average_probabilities(
            outputs.features[rows], outputs.logits[rows], self.head, self.level
        )
        temperature = self.temperatures.get(f"{averaged}@{self.level}", 1.0)
        return calibrate(probs, temperature), temperature

    def gate(self, outputs: ViewOutputs, stages_run: int) -> GateRecord:
        """The gate before stage ``stages_run + 1``: its signal on the calibrated answer
        after ``stages_run`` stages (agreement: over every view run so far), its decision."""
        gate = self.policy.stages[stages_run].gate
        assert gate is not None  # every stage after the first has one
        probs, _ = self.answer(outputs, stages_run)
        view_top1 = outputs.logits[: self.policy.stage_ends[stages_run - 1]].argmax(dim=-1)
        value = gate_signal(gate.signal, probs, view_top1)
        return GateRecord(gate, value, gate.goes_on(value))

    def stages_to_run(self, outputs: ViewOutputs) -> int:
        """With every stage's outputs known (offline): how many stages the gates run."""
        k = 1
        while k < len(self.policy.stages) and self.gate(outputs, k).went_on:
            k += 1
        return k


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
