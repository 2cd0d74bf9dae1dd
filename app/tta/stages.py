"""Staged view policies: cheap views first, more only for the images the model is unsure of.

Most images are already right after the center crop, and sure of it; whole-image views at a
test resolution above the training one buy accuracy on the rest. A staged policy runs its
first stage for every image, and each later stage only for the images whose *gate signal*
(computed on the answer so far) is below the stage's threshold:

    center|margin<0.4|full@288,mfull@288          stage 1, gate, stage 2
    center|prob<0.6|full@288,mfull@288|last       answer from the last stage's views only
    center@256|margin<0.42|tf_efficientnet_lite2:full,mfull
                                                  a cascade: stage 2 on another model

Signals, all in [0, 1] and higher meaning surer: ``prob`` (top-1 probability), ``margin``
(top-1 minus top-2 probability) and ``agree`` (the share of views run so far whose own top-1
is the answer's; computed in app/answers.py). The answer averages every view run so far
(``all``, the default) or only the last stage's (``last``). A plain spec is a policy of one
stage. A later stage may run on another model of the repository (``MODEL:views``; the first
stage always runs on the requested model): its views are cut from the image decoded for the
first stage with that model's own preprocessing, and with ``all`` every model's views are
averaged at the asked level within the model, then the models' averages weighted by their
view counts (at the softmax level: the mean of every view's probabilities, as for one
model). No torch in here: request parameters parse without it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from app.errors import InvalidRequestError
from app.tta.views import KINDS, ViewSpec, parse_view_spec, split_kind

Signal = Literal["prob", "margin", "agree"]
SIGNALS: tuple[Signal, ...] = ("prob", "margin", "agree")
Answer = Literal["all", "last"]
MAX_STAGES = 3
STAGE_SEPARATOR = "|"
MODEL_SEPARATOR = ":"  # ``MODEL:views``: a later stage on another model
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a model folder's name


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
    model: str | None = None  # another model of the repository; None: the requested one

    def __str__(self) -> str:
        return f"{self.model}{MODEL_SEPARATOR}{self.spec}" if self.model else str(self.spec)


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
        """The views of every stage on the requested model in one spec, in stage order
        (what an image that goes through every stage runs there; planned at once, so a
        staged run and a one-shot run of these views plan the same boxes)."""
        return self.views_on(None)

    def views_on(self, model: str | None) -> ViewSpec:
        """Every stage's views on ``model`` (None: the requested one), in stage order."""
        return ViewSpec(tuple(p for s in self.stages if s.model == model for p in s.spec.parts))

    @property
    def models(self) -> list[str]:
        """The other models its later stages run on, in order of first use."""
        return list(dict.fromkeys(s.model for s in self.stages if s.model))

    @property
    def cascade(self) -> bool:
        return bool(self.models)

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
        parts = [str(self.stages[0])]
        for stage in self.stages[1:]:
            parts += [str(stage.gate), str(stage)]
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
    if len(tokens) // 2 + 1 > MAX_STAGES:
        raise InvalidRequestError(f"at most {MAX_STAGES} stages, got {len(tokens) // 2 + 1}")
    parsed = [parse_stage_views(t) for t in tokens[0::2]]
    if parsed[0][0] is not None:
        raise InvalidRequestError(
            f"the first stage runs on the requested model; {parsed[0][0]!r} may only name a "
            "later stage's model (choose the first stage's model with the model parameter)"
        )
    if any(spec.adaptive for _, spec in parsed):
        raise InvalidRequestError("a stage cannot be 'auto': name its views")
    gates = [parse_gate(t) for t in tokens[1::2]]
    stages = (Stage(parsed[0][1]),) + tuple(
        Stage(spec, gate, model) for (model, spec), gate in zip(parsed[1:], gates, strict=True)
    )
    return StagedPolicy(stages, answer)


def parse_stage_views(text: str) -> tuple[str | None, ViewSpec]:
    """``views`` or ``MODEL:views`` (a view kind before the first ``:`` is a count's, as in
    ``fixed:5``; anything else names a model)."""
    head, sep, _ = text.partition(",")[0].partition(MODEL_SEPARATOR)
    head = head.strip()
    if not sep or split_kind(head.lower())[0] in KINDS:
        return None, parse_view_spec(text)
    if not MODEL_NAME.fullmatch(head):
        raise InvalidRequestError(
            f"stage {text.strip()[:60]!r}: {head[:40]!r} is neither a view kind "
            f"({', '.join(KINDS)}) nor a model name"
        )
    try:  # the text's first ``:`` (before any ``,``) ends the model's name
        return head, parse_view_spec(text.partition(MODEL_SEPARATOR)[2])
    except InvalidRequestError as exc:
        raise InvalidRequestError(
            f"stage {text.strip()[:60]!r} reads as views on model {head!r} ({head!r} is not a "
            f"view kind: {', '.join(KINDS)}); {exc}"
        ) from exc
