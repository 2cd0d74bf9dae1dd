"""The per-image pipeline that the server, the CLI and evaluation share:
prepare (decode once, resize once, plan views, cut them as slices of one tensor)
-> forward (the engine, directly or through the server's cross-request batcher)
-> [staged policies: gate on the calibrated answer so far; cut the next stage; forward]
-> predict (average at the asked level, calibrate, top-k, view boxes, timings).

The engine only turns views into features and logits; averaging and ranking happen here,
and the edges (the JSON API, the protocol's tensors, the CLI) only render a ``Prediction``:
plain typed results, no wire schema.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch

from app.answers import GateRecord, StagedAnswers, TopClass, top_classes
from app.errors import LimitExceededError
from app.model_config import ModelConfig
from app.request import ClassifyRequest, Level
from app.runtime.engine import Engine, ViewOutputs
from app.tta.adaptive import resolve_spec
from app.tta.decode import SERVED_JPEG, JpegDecoding, decode_picture
from app.tta.limits import DecodeLimits
from app.tta.preprocess import PreparedImage, ViewGroup, cut_view_groups, prepare_image
from app.tta.stages import StagedPolicy, parse_policy
from app.tta.views import (
    DEFAULT_STRIDE,
    View,
    ViewGeometry,
    ViewSpec,
    boxes_in_original,
    plan_image_views,
    view_equivalents,
)

# a reduced-scale JPEG decode keeps the shorter side at least this many times the largest
# resize the policy's views ask for (docs/benchmarks.md, the ceiling run)
JPEG_DRAFT_MARGIN = 2


@dataclass
class PreparedViews:
    """An image decoded, resized, planned and cut into views: ready for a forward pass.

    Every stage's views are planned at once (so a staged run plans exactly what a one-shot
    run of the same views plans); ``groups`` holds the current stage's views only, and a
    later stage is cut from the same decoded image when its gate lets the image go on."""

    image: PreparedImage
    views: list[View]  # every stage's views, in stage order
    seed: int
    policy: StagedPolicy  # as used: ``auto`` resolved for this image
    stage_ends: list[int]  # views[: stage_ends[k]] are the views of stages 1 .. k + 1
    groups: list[ViewGroup]  # the current stage's views by shape, stacked channels_last
    timings: dict[str, float]  # seconds: decode, preprocess
    stages_run: int = 1
    gates: list[GateRecord] = field(default_factory=list)

    @property
    def views_run(self) -> list[View]:
        return self.views[: self.stage_ends[self.stages_run - 1]]

    @property
    def last_stage(self) -> bool:
        return self.stages_run == len(self.stage_ends)

    @property
    def next_stage_views(self) -> list[View]:
        return self.views[self.stage_ends[self.stages_run - 1] : self.stage_ends[self.stages_run]]


@dataclass(frozen=True, slots=True)
class StageReport:
    """What one stage of a staged policy did."""

    spec: str
    views: int
    ran: bool
    gate: str | None  # went on while SIGNAL < THRESHOLD
    signal: float | None  # the gate signal it saw


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
    view_equivalents: float = 0.0
    agreement: float = 1.0  # share of the views whose own top-1 is the answer's
    temperature: float = 1.0
    stages: list[StageReport] | None = None  # staged policies: what each stage did
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def ranked(self, k: int = 5) -> list[int]:
        """The ``k`` most probable class indices, best first (accuracy metrics)."""
        return self.probs.topk(min(k, self.probs.shape[0])).indices.tolist()


class ImagePreparer:
    """Bytes -> the decoded image, resized once per resolution its views ask for, and the
    views cut from those tensors, grouped by shape.

    CPU bound and thread-safe (the server runs it off the event loop); holds no network,
    so evaluation's DataLoader workers can carry it."""

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        limits: DecodeLimits,
        jpeg_draft: bool,
        stride: int = DEFAULT_STRIDE,
        uint8: bool = True,
    ) -> None:
        self.cfg, self.device, self.limits = cfg, device, limits
        self.geometry = ViewGeometry(cfg.input_size, cfg.crop_pct, cfg.resize_size, stride)
        self.measured_auto = parse_policy(cfg.auto_views) if cfg.auto_views else None
        self.jpeg_draft, self.uint8 = jpeg_draft, uint8

    def draft_side(self, policies: list[StagedPolicy]) -> int:
        """The shorter side a large JPEG may be decoded down to (1/2-1/8 scale in the DCT)
        for these policies' views: twice the largest resize they ask for; 0: full size."""
        if not self.jpeg_draft:
            return 0
        specs = [p.joined for p in policies if not p.adaptive]
        if any(p.adaptive for p in policies) and self.measured_auto is not None:
            specs.append(self.measured_auto.joined)
        return JPEG_DRAFT_MARGIN * max(
            [self.cfg.resize_size, *(self.geometry.largest_resize(s) for s in specs)]
        )

    def image(
        self, data: bytes, draft_side: int = 0, jpeg: JpegDecoding = SERVED_JPEG
    ) -> tuple[PreparedImage, float]:
        """The decoded image (a large JPEG at no less than ``draft_side`` on its shorter
        side), ready to be resized once per resolution; (image, decode s). ``jpeg``: how
        a JPEG is decoded (studies/jpeg_decoders.py compares the ways)."""
        t0 = time.perf_counter()
        decoded = decode_picture(data, self.limits, draft_side, jpeg)
        image = prepare_image(
            decoded.picture, self.cfg, self.device, decoded.format, decoded.original_size,
            self.uint8,
        )  # fmt: skip
        return image, time.perf_counter() - t0

    def resolve(self, policy: StagedPolicy, image: PreparedImage) -> StagedPolicy:
        """The policy itself, or for ``auto`` the model's measured policy when it has one,
        else the crop mix this image's resized size earns (app/tta/adaptive.py)."""
        if not policy.adaptive:
            return policy
        if self.measured_auto is not None:
            return self.measured_auto
        w, h = image.resized_size
        return StagedPolicy.single(resolve_spec(policy.first, w, h, self.cfg.input_size))

    def plan(
        self, image: PreparedImage, policy: ViewSpec | StagedPolicy, seed: int | None
    ) -> tuple[list[View], int, StagedPolicy]:
        """View boxes of every stage, in stage order, the seed used (drawn when missing, so
        the answer can be reproduced) and the policy used (``auto`` resolved for this
        image's size)."""
        if isinstance(policy, ViewSpec):
            policy = StagedPolicy.single(policy)
        seed = secrets.randbits(31) if seed is None else seed
        used = self.resolve(policy, image)
        views = plan_image_views(used.joined, *image.decoded_size, self.geometry, seed)
        return views, seed, used

    def views(
        self, data: bytes, policy: ViewSpec | StagedPolicy, seed: int | None, max_views: int = 0
    ) -> PreparedViews:
        """Decode, plan, resize and cut the first stage; ``max_views`` (0: none) bounds both
        the count and the pixels (in views of the model's input size) of every stage
        together, checked per image, since ``auto`` and whole-image shapes are only known
        once the image's size is."""
        if isinstance(policy, ViewSpec):
            policy = StagedPolicy.single(policy)
        image, decode_s = self.image(data, self.draft_side([policy]))
        t0 = time.perf_counter()
        views, used_seed, used = self.plan(image, policy, seed)
        ends = used.stage_ends
        if max_views:
            self.check_budget(views, max_views)
        groups = cut_view_groups(image, views[: ends[0]])
        if len(ends) == 1:
            image.source = None  # every tensor the views need is made: free the decoded pixels
        timings = {"decode": decode_s, "preprocess": time.perf_counter() - t0}
        return PreparedViews(image, views, used_seed, used, ends, groups, timings)

    def next_stage(self, prepared: PreparedViews) -> None:
        """Cut the next stage's views from the image decoded for the first (no second
        decode); the decoded pixels are freed once the last stage is cut."""
        t0 = time.perf_counter()
        prepared.groups = cut_view_groups(prepared.image, prepared.next_stage_views)
        prepared.stages_run += 1
        if prepared.last_stage:
            prepared.image.source = None
        prepared.timings["preprocess"] += time.perf_counter() - t0

    def view_equivalents(self, views: list[View]) -> float:
        return view_equivalents(views, self.cfg.input_size)

    def check_budget(self, views: list[View], max_views: int) -> None:
        if len(views) > max_views:
            raise LimitExceededError(f"{len(views)} views for this image; the limit is {max_views}")
        cost = self.view_equivalents(views)
        if cost > max_views:
            s = self.cfg.input_size
            raise LimitExceededError(
                f"the views of this image cover {cost:.1f} times the pixels of a {s}x{s} view; "
                f"the limit is {max_views} (use a smaller @size or fewer views)"
            )


class ImagePipeline:
    """prepare -> forward -> predict for one engine; the forward may run elsewhere (the
    server's batcher), so the three steps are callable apart and ``classify`` chains them."""

    def __init__(self, engine: Engine, max_views: int = 0) -> None:
        self.engine = engine
        self.max_views = max_views
        o = engine.options
        self.preparer = ImagePreparer(
            engine.cfg, engine.device, o.limits, o.jpeg_draft, engine.model.stride, o.uint8_views
        )
        self.temperatures = dict(engine.cfg.calibration)

    def prepare(self, data: bytes, request: ClassifyRequest) -> PreparedViews:
        request.checked(self.engine.cfg.num_classes)
        return self.preparer.views(data, request.policy, request.seed, self.max_views)

    def answer(
        self, prepared: PreparedViews, outputs: ViewOutputs, level: Level
    ) -> tuple[torch.Tensor, float]:
        """The calibrated probabilities [C] after the stages run so far (``outputs``: every
        view run, in order) and the temperature applied."""
        return self.answers(prepared.policy, level).answer(outputs, prepared.stages_run)

    def answers(self, policy: StagedPolicy, level: Level) -> StagedAnswers:
        return StagedAnswers(policy, level, self.engine.head, self.temperatures)

    @torch.inference_mode()
    def goes_on(self, prepared: PreparedViews, outputs: ViewOutputs, level: Level) -> bool:
        """Whether the image goes on to its next stage (its gate is recorded). False after
        the last stage."""
        if prepared.last_stage:
            return False
        record = self.answers(prepared.policy, level).gate(outputs, prepared.stages_run)
        prepared.gates.append(record)
        return record.went_on

    def next_stage(self, prepared: PreparedViews) -> None:
        self.preparer.next_stage(prepared)

    @torch.inference_mode()
    def predict(
        self,
        prepared: PreparedViews,
        outputs: ViewOutputs,
        request: ClassifyRequest,
        queue_wait_s: float,
        forward_s: float,
    ) -> Prediction:
        """The answer from every view run (``outputs``, in view order)."""
        t0 = time.perf_counter()
        engine = self.engine
        probs, temperature = self.answer(prepared, outputs, request.level)
        values, indices = probs.topk(min(request.top_k, probs.shape[0]))
        view_p, view_i = torch.softmax(outputs.logits.float(), dim=-1).max(dim=-1)
        labels = engine.model.labels
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
            top=top_classes(labels, values, indices),
            level=request.level,
            views=views,
            spec=str(prepared.policy),
            policy=str(request.spec),
            seed=prepared.seed,
            boxes=boxes,
            view_top1=top_classes(labels, view_p, view_i),
            probs=probs,
            view_equivalents=self.preparer.view_equivalents(views),
            agreement=float((view_i == indices[0]).float().mean()),
            temperature=temperature,
            stages=stage_report(prepared),
            timings=timings,
        )

    def classify(self, data: bytes, request: ClassifyRequest) -> Prediction:
        """The whole path in this thread (CLI, evaluation, tests)."""
        prepared = self.prepare(data, request)
        t0 = time.perf_counter()
        outputs = self.engine.run_groups(prepared.groups)
        while self.goes_on(prepared, outputs, request.level):
            self.next_stage(prepared)
            outputs = ViewOutputs.concat([outputs, self.engine.run_groups(prepared.groups)])
        return self.predict(prepared, outputs, request, 0.0, time.perf_counter() - t0)


def stage_report(prepared: PreparedViews) -> list[StageReport] | None:
    """Each stage of a staged policy: its views, whether it ran, and the gate before it."""
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
            )
        )
    return out
