"""From view outputs to an answer: average at the asked level, calibrate, rank; and the
gate between the stages of a staged policy. The server, the CLI and evaluation all answer
through these functions, so an evaluated policy is the served one."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from app.labels import LabelSet
from app.request import Level
from app.runtime.engine import ViewOutputs
from app.tta.averaging import average_probabilities
from app.tta.calibration import calibrate
from app.tta.stages import Gate, Signal, Stage, StagedPolicy


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


def averaged_key(stages: Sequence[Stage], level: Level) -> str:
    """The calibration key of an answer averaging these stages' views (model.toml
    ``[calibration]``): their views, a later stage's on another model named with it."""
    return f"{','.join(str(s) for s in stages)}@{level}"


@dataclass(frozen=True)
class StagedAnswers:
    """How one policy is answered at one level: each model's views averaged through its
    ``heads`` entry (None: the requested model's), the models' averages weighted by their
    view counts, calibrated by the requested model's temperature for the views averaged
    (model.toml ``[calibration]``, keyed by ``averaged_key``; else 1). The server, the CLI
    and evaluation all answer through it. ``outputs``: each stage's, in stage order."""

    policy: StagedPolicy
    level: Level
    heads: Mapping[str | None, Head]
    temperatures: Mapping[str, float]

    def answer(self, outputs: Sequence[ViewOutputs], stages_run: int) -> tuple[torch.Tensor, float]:
        """The calibrated probabilities [C] after ``stages_run`` stages and the temperature
        applied."""
        stages = self.policy.stages[:stages_run]
        ran = list(zip(stages, outputs[:stages_run], strict=True))
        if self.policy.answer == "last" and stages_run > 1:  # the last stage's views alone
            ran = ran[-1:]
        by_model: dict[str | None, list[ViewOutputs]] = {}
        for stage, out in ran:
            by_model.setdefault(stage.model, []).append(out)
        averaged, counts = [], []
        for model, parts in by_model.items():
            out = ViewOutputs.concat(parts) if len(parts) > 1 else parts[0]
            averaged.append(
                average_probabilities(out.features, out.logits, self.heads[model], self.level)
            )
            counts.append(out.logits.shape[0])
        if len(averaged) == 1:
            probs = averaged[0]
        else:  # at the softmax level: the mean of every view's probabilities
            probs = torch.stack([p * n for p, n in zip(averaged, counts, strict=True)])
            probs = probs.sum(0) / sum(counts)
        key = averaged_key([stage for stage, _ in ran], self.level)
        temperature = self.temperatures.get(key, 1.0)
        return calibrate(probs, temperature), temperature

    def gate(self, outputs: Sequence[ViewOutputs], stages_run: int) -> GateRecord:
        """The gate before stage ``stages_run + 1``: its signal on the calibrated answer
        after ``stages_run`` stages (agreement: over every view run so far), its decision."""
        gate = self.policy.stages[stages_run].gate
        assert gate is not None  # every stage after the first has one
        probs, _ = self.answer(outputs, stages_run)
        view_top1 = torch.cat([o.logits.argmax(dim=-1) for o in outputs[:stages_run]])
        value = gate_signal(gate.signal, probs, view_top1)
        return GateRecord(gate, value, gate.goes_on(value))

    def stages_to_run(self, outputs: Sequence[ViewOutputs]) -> int:
        """With every stage's outputs known (offline): how many stages the gates run."""
        k = 1
        while k < len(self.policy.stages) and self.gate(outputs, k).went_on:
            k += 1
        return k


def split_by_stage(outputs: ViewOutputs, policy: StagedPolicy) -> list[ViewOutputs]:
    """Outputs of every stage's views in one run (view order) as one part per stage."""
    starts = [0, *policy.stage_ends[:-1]]
    return [
        ViewOutputs(outputs.features[a:b], outputs.logits[a:b])
        for a, b in zip(starts, policy.stage_ends, strict=True)
    ]


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
