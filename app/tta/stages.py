"""Staged view policies: cheap views first, more only for the images the model is unsure of.

Most images are already right after the center crop, and sure of it; whole-image views at a
test resolution above the training one buy accuracy on the rest. A staged policy runs its
first stage for every image, and each later stage only for the images whose *gate signal*
(computed on the answer so far) is below the stage's threshold:

    center|margin<0.4|full@288,mfull@288          stage 1, gate, stage 2
    center|prob<0.6|full@288,mfull@288|last       answer from the last stage's views only

Signals, all in [0, 1] and higher meaning surer: ``prob`` (top-1 probability), ``margin``
(top-1 minus top-2 probability) and ``agree`` (the share of views run so far whose own top-1
is the answer's; computed in app/answers.py). The answer averages every view run so far
(``all``, the default) or only the last stage's (``last``). A plain spec is a policy of one
stage. No torch in here: request parameters parse without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from app.errors import InvalidRequestError
from app.tta.views import ViewSpec, parse_view_spec

Signal = Literal["prob", "margin", "agree"]
SIGNALS: tuple[Signal, ...] = ("prob", "margin", "agree")
Answer = Literal["all", "last"]
MAX_STAGES = 3
STAGE_SEPARATOR = "|"


@dataclass(frozen=True)
class Gate:
    """Go on to the next stage while ``signal`` is below ``threshold``."""

    signal: Signal
    threshold: float

    def goes_on(self, value: float) -> bool:
        return value < self.threshold

    def __str__(self) -> str:
        return f"{self.signal}<{self.threshold:g}"


@dataclass(frozen=True)
class Stage:
    spec: ViewSpec
    gate: Gate | None = None  # None for the first stage: it always runs


@dataclass(frozen=True)
class StagedPolicy:
    stages: tuple[Stage, ...]
    answer: Answer = "all"

    @classmethod
    def single(cls, spec: ViewSpec) -> StagedPolicy:
        return cls((Stage(spec),))

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    @property
    def first(self) -> ViewSpec:
        return self.stages[0].spec

    @property
    def adaptive(self) -> bool:
        return self.first.adaptive

    @property
    def joined(self) -> ViewSpec:
        """Every stage's views in one spec, in stage order (what an image that goes
        through every stage runs; planned at once, so a staged run and a one-shot run of
        these views plan the same boxes)."""
        return ViewSpec(tuple(p for stage in self.stages for p in stage.spec.parts))

    @property
    def stage_ends(self) -> list[int]:
        """Where each stage's views end in ``joined``."""
        ends, end = [], 0
        for stage in self.stages:
            end += stage.spec.total
            ends.append(end)
        return ends

    @property
    def total(self) -> int:
        """Views of an image that goes through every stage (what request bounds count)."""
        return sum(stage.spec.total for stage in self.stages)

    def __str__(self) -> str:
        parts = [str(self.stages[0].spec)]
        for stage in self.stages[1:]:
            parts += [str(stage.gate), str(stage.spec)]
        if self.answer == "last":
            parts.append("last")
        return STAGE_SEPARATOR.join(parts)


def parse_gate(text: str) -> Gate:
    signal, sep, value = text.strip().lower().partition("<")
    signal = signal.strip()
    if not sep or signal not in SIGNALS:
        raise InvalidRequestError(
            f"gate {text.strip()[:40]!r} must be SIGNAL<THRESHOLD with SIGNAL one of "
            f"{', '.join(SIGNALS)}, e.g. margin<0.4"
        )
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:  # also refuses nan
        raise InvalidRequestError(
            f"gate threshold in {text.strip()[:40]!r} must be a number between 0 and 1"
        )
    return Gate(signal, threshold)


def parse_policy(text: str) -> StagedPolicy:
    """A plain view spec (one stage) or ``spec|gate|spec[|gate|spec][|last]``."""
    if not isinstance(text, str) or STAGE_SEPARATOR not in text:
        return StagedPolicy.single(parse_view_spec(text))
    tokens = [t.strip() for t in text.split(STAGE_SEPARATOR)]
    answer: Answer = "all"
    if tokens[-1].lower() == "last":
        answer = "last"
        tokens = tokens[:-1]
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise InvalidRequestError(
            f"staged views {text[:60]!r} must alternate stages and gates: "
            "spec|gate|spec, e.g. center|margin<0.4|full@288,mfull@288"
        )
    specs = [parse_view_spec(t) for t in tokens[0::2]]
    if len(specs) > MAX_STAGES:
        raise InvalidRequestError(f"at most {MAX_STAGES} stages, got {len(specs)}")
    if any(s.adaptive for s in specs):
        raise InvalidRequestError("a stage cannot be 'auto': name its views")
    gates = [parse_gate(t) for t in tokens[1::2]]
    stages = (Stage(specs[0]),) + tuple(
        Stage(spec, gate) for spec, gate in zip(specs[1:], gates, strict=True)
    )
    return StagedPolicy(stages, answer)
