"""The per-image pipeline that the server, the CLI and evaluation share:
prepare (decode once, resize once, plan views, cut them as slices of one tensor)
-> forward (the engine, directly or through the server's cross-request batcher)
-> [staged policies: gate on the calibrated answer so far; cut the next stage (on another
    model for a cascade, with its own preprocessing); forward]
-> predict (average at the asked level, calibrate, top-k, view boxes, timings).

The engine only turns views into features and logits; averaging and ranking happen here,
and the edges (the JSON API, the protocol's tensors, the CLI) only render a ``Prediction``:
plain typed results, no wire schema.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from app.answers import Head, StagedAnswers, TopClass, top_classes
from app.errors import InvalidRequestError
from app.preparer import ImagePreparer, PreparedViews, StageModel, StageModels
from app.request import ClassifyRequest, Level
from app.runtime.cost import view_cost
from app.runtime.engine import Engine, ViewOutputs
from app.tta.views import View, boxes_in_original

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageReport:
    """What one stage of a staged policy did."""

    spec: str
    views: int
    ran: bool
    gate: str | None  # went on while SIGNAL < THRESHOLD
    signal: float | None  # the gate signal it saw
    model: str = ""  # the model it ran on
    view_equivalents: float = 0.0  # its compute, in the requested model's view-equivalents


@dataclass
class Prediction:
    """One image's answer, with its averaged probabilities kept for accuracy metrics."""

    top: list[TopClass]
    level: Level
    views: list[View]  # the views run
    spec: str  # what was run (``auto`` resolved for this image)
    policy: str  # what was asked for: the spec, or "auto"
    seed: int
    boxes: list[list[float]]
    view_top1: list[TopClass]
    probs: torch.Tensor  # [C]
    view_equivalents: float = 0.0  # in the requested model's view-equivalents
    agreement: float = 1.0  # share of the views whose own top-1 is the answer's
    temperature: float = 1.0
    stages: list[StageReport] | None = None  # staged policies: what each stage did
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    answered_by: list[str] = field(default_factory=list)  # models whose views it averages

    def ranked(self, k: int = 5) -> list[int]:
        """The ``k`` most probable class indices, best first (accuracy metrics)."""
        return self.probs.topk(min(k, self.probs.shape[0])).indices.tolist()


class ImagePipeline:
    """prepare -> forward -> predict for one engine; the forward may run elsewhere (the
    server's batcher), so the three steps are callable apart and ``classify`` chains them.
    ``stage_models``: the other models a cascade's later stages may name."""

    def __init__(
        self, engine: Engine, max_views: int = 0, stage_models: StageModels | None = None
    ) -> None:
        self.engine = engine
        self.max_views = max_views
        o = engine.options
        self.preparer = ImagePreparer(
            engine.cfg, engine.device, o.limits, o.jpeg_draft, engine.model.stride,
            o.uint8_views, stage_models,
        )  # fmt: skip
        self.temperatures = dict(engine.cfg.calibration)

    @property
    def name(self) -> str:
        return self.engine.cfg.name

    def prepare(self, data: bytes, request: ClassifyRequest) -> PreparedViews:
        request.checked(self.engine.cfg.num_classes)
        return self.preparer.views(data, request.policy, request.seed, self.max_views)

    def stage_engine(self, prepared: PreparedViews) -> Engine:
        """The engine the current stage's views run on."""
        model = prepared.current_model
        return self.engine if model is None else prepared.stage_models[model].pipeline.engine

    def answers(self, prepared: PreparedViews, level: Level) -> StagedAnswers:
        heads: dict[str | None, Head] = {None: self.engine.head}
        heads.update({m: s.pipeline.engine.head for m, s in prepared.stage_models.items()})
        return StagedAnswers(prepared.policy, level, heads, self.temperatures)

    @torch.inference_mode()
    def goes_on(
        self, prepared: PreparedViews, outputs: Sequence[ViewOutputs], level: Level
    ) -> bool:
        """Whether the image goes on to its next stage (its gate is recorded); ``outputs``:
        each stage's so far. False after the last stage."""
        if prepared.last_stage:
            return False
        record = self.answers(prepared, level).gate(outputs, prepared.stages_run)
        prepared.gates.append(record)
        return record.went_on

    def next_stage(self, prepared: PreparedViews) -> None:
        self.preparer.next_stage(prepared)

    @torch.inference_mode()
    def predict(
        self,
        prepared: PreparedViews,
        outputs: Sequence[ViewOutputs],
        request: ClassifyRequest,
        queue_wait_s: float,
        forward_s: float,
    ) -> Prediction:
        """The answer from every stage's views run (``outputs``: each stage's, in order)."""
        t0 = time.perf_counter()
        probs, temperature = self.answers(prepared, request.level).answer(
            outputs, prepared.stages_run
        )
        values, indices = probs.topk(min(request.top_k, probs.shape[0]))
        labels = self.engine.model.labels
        top = top_classes(labels, values, indices)
        ran = outputs[: prepared.stages_run]
        # one view, uncalibrated, at the logit or softmax level: its own probabilities are
        # the answer's (a softmax and a max fewer on the event loop: a quarter of this
        # method for a center crop)
        one_view = len(ran) == 1 and ran[0].logits.shape[0] == 1
        if one_view and temperature == 1.0 and request.level != "feature":
            view_top1, view_i = top[:1], indices[:1].tolist()
        else:
            logits = ran[0].logits.float() if len(ran) == 1 else torch.cat([o.logits for o in ran])
            view_p, view_ix = torch.softmax(logits, dim=-1).max(dim=-1)
            view_top1, view_i = top_classes(labels, view_p, view_ix), view_ix.tolist()
        image = prepared.image
        views = prepared.views_run
        boxes = boxes_in_original(views, image.resized_size, image.original_size)
        timings = {
            **prepared.timings,
            "queue_wait": queue_wait_s,
            "forward": forward_s,
            "postprocess": time.perf_counter() - t0,
        }
        return Prediction(
            top=top,
            level=request.level,
            views=views,
            spec=str(prepared.policy),
            policy=str(request.spec),
            seed=prepared.seed,
            boxes=boxes,
            view_top1=view_top1,
            probs=probs,
            view_equivalents=prepared.view_equivalents,
            agreement=agreement(view_i, int(indices[0])),
            temperature=temperature,
            stages=stage_report(prepared, self.name),
            timings=timings,
            answered_by=answered_by(prepared, self.name),
        )

    def classify(self, data: bytes, request: ClassifyRequest) -> Prediction:
        """The whole path in this thread (CLI, evaluation, tests)."""
        prepared = self.prepare(data, request)
        t0 = time.perf_counter()
        outputs = [self.engine.run_groups(prepared.groups)]
        while self.goes_on(prepared, outputs, request.level):
            self.next_stage(prepared)
            outputs.append(self.stage_engine(prepared).run_groups(prepared.groups))
        return self.predict(prepared, outputs, request, 0.0, time.perf_counter() - t0)


def agreement(view_top1: list[int], answer: int) -> float:
    """The share of the views whose own top-1 is the answer's (in Python: a handful of
    views, where each torch op would cost more than the sum)."""
    return sum(1 for i in view_top1 if i == answer) / max(len(view_top1), 1)


def later_stage(requested: ImagePipeline, other: ImagePipeline) -> StageModel:
    """``other`` as a later stage of ``requested``'s policies: another model, of the same
    classes, with what one of its views costs in ``requested``'s (worked out here, so
    callers find it once per pair)."""
    if other.name == requested.name:
        raise InvalidRequestError(
            f"a later stage names {other.name!r}, the requested model itself: leave the "
            "model out for its own views"
        )
    if other.engine.model.labels.ids != requested.engine.model.labels.ids:
        raise InvalidRequestError(
            f"model {other.name!r} has other classes than {requested.name!r}: its answers "
            "cannot be combined"
        )
    cost = view_cost(other.engine, requested.engine)
    log.info("a view of %s costs %.3f views of %s (%s)", other.name, cost.ratio,
             requested.name, cost.source)  # fmt: skip
    return StageModel(other.name, other, cost.ratio, cost.source)


def answered_by(prepared: PreparedViews, requested: str) -> list[str]:
    """The models whose views the answer averages, in stage order."""
    policy, k = prepared.policy, prepared.stages_run
    stages = policy.stages[k - 1 : k] if policy.answer == "last" and k > 1 else policy.stages[:k]
    return list(dict.fromkeys(s.model or requested for s in stages))


def stage_report(prepared: PreparedViews, requested: str) -> list[StageReport] | None:
    """Each stage of a staged policy: its model and views, whether it ran, its compute, and
    the gate before it."""
    policy = prepared.policy
    if not policy.staged:
        return None
    out = []
    for k, stage in enumerate(policy.stages):
        record = prepared.gates[k - 1] if 0 < k <= len(prepared.gates) else None
        out.append(
            StageReport(
                spec=str(stage.spec),
                views=stage.spec.total,
                ran=k < prepared.stages_run,
                gate=str(stage.gate) if stage.gate else None,
                signal=round(record.value, 4) if record else None,
                model=stage.model or requested,
                view_equivalents=round(prepared.stage_costs[k], 4),
            )
        )
    return out
