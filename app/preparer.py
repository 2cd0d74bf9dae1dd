"""Preparing one image for a pipeline: decode once, plan every stage's views (a cascade's
other models with their own geometry), resize once per resolution and cut the first stage;
later stages are cut from the same decoded image when their gate lets the image go on.
CPU-bound, thread-safe and free of any network, so the server's preparation pool and
evaluation's DataLoader workers run it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from app.answers import GateRecord
from app.errors import InvalidRequestError, LimitExceededError
from app.model_config import ModelConfig
from app.tta.adaptive import resolve_spec
from app.tta.decode import SERVED_JPEG, JpegDecoding, decode_picture
from app.tta.limits import DecodeLimits
from app.tta.preprocess import PreparedImage, Resizer, ViewGroup, cut_view_groups, prepare_image
from app.tta.stages import StagedPolicy, parse_policy
from app.tta.views import (
    DEFAULT_STRIDE,
    View,
    ViewGeometry,
    ViewSpec,
    plan_image_views,
    resized_shape,
    view_equivalents,
)

if TYPE_CHECKING:
    from app.pipeline import ImagePipeline

# a reduced-scale JPEG decode keeps the shorter side at least this many times the largest
# resize the policy's views ask for (docs/benchmarks.md, the ceiling run)
JPEG_DRAFT_MARGIN = 2


@dataclass(frozen=True)
class StageModel:
    """Another model a later stage of a cascade runs on, as the requested model sees it:
    its pipeline (preprocessing, engine, head) and what one of its views (at its input
    size) costs in the requested model's view-equivalents, from the two engines' measured
    time per view (or their FLOPs; ``app.runtime.cost``)."""

    name: str
    pipeline: ImagePipeline
    cost_per_view: float
    cost_source: str = "measured"  # measured | gflops


StageModels = Callable[[str], StageModel]  # a model's name -> it, or a domain error


@dataclass
class PreparedViews:
    """An image decoded, resized, planned and cut into views: ready for a forward pass.

    Every stage's views are planned at once (so a staged run plans exactly what a one-shot
    run of the same views plans; a cascade's other models plan theirs with their own
    geometry); ``groups`` holds the current stage's views only, and a later stage is cut
    from the same decoded image when its gate lets the image go on."""

    image: PreparedImage
    views: list[View]  # every stage's views, in stage order
    seed: int
    policy: StagedPolicy  # as used: ``auto`` resolved for this image
    stage_ends: list[int]  # views[: stage_ends[k]] are the views of stages 1 .. k + 1
    groups: list[ViewGroup]  # the current stage's views by shape, stacked channels_last
    timings: dict[str, float]  # seconds: decode, preprocess
    stage_costs: list[float]  # each stage's view-equivalents, in the requested model's
    stage_models: dict[str, StageModel] = field(default_factory=dict)  # a cascade's others
    images: dict[str, PreparedImage] = field(default_factory=dict)  # theirs, once cut
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

    @property
    def current_model(self) -> str | None:
        """The model the current stage runs on (None: the requested one)."""
        return self.policy.stages[self.stages_run - 1].model

    @property
    def view_equivalents(self) -> float:
        """Compute of the stages run so far, in the requested model's view-equivalents."""
        return sum(self.stage_costs[: self.stages_run])


class ImagePreparer:
    """Bytes -> the decoded image, resized once per resolution its views ask for, and the
    views cut from those tensors, grouped by shape.

    CPU bound and thread-safe (the server runs it off the event loop); holds no network,
    so evaluation's DataLoader workers can carry it. ``stage_models`` finds the other
    models a cascade's later stages name (None: this preparer serves no cascade)."""

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        limits: DecodeLimits,
        jpeg_draft: bool,
        stride: int = DEFAULT_STRIDE,
        uint8: bool = True,
        stage_models: StageModels | None = None,
    ) -> None:
        self.cfg, self.device, self.limits = cfg, device, limits
        self.geometry = ViewGeometry(cfg.input_size, cfg.crop_pct, cfg.resize_size, stride)
        self.measured_auto = parse_policy(cfg.auto_views) if cfg.auto_views else None
        self.jpeg_draft, self.uint8 = jpeg_draft, uint8
        self.stage_models = stage_models
        self.resizer = Resizer.for_model(cfg, device, uint8)

    def stage_model(self, name: str) -> StageModel:
        if self.stage_models is None:
            raise InvalidRequestError(
                f"a later stage names model {name!r}, but no other model serves beside "
                f"{self.cfg.name!r} here"
            )
        return self.stage_models(name)

    def with_auto(self, policies: list[StagedPolicy]) -> list[StagedPolicy]:
        """The policies, and the model's measured policy when one of them is ``auto``."""
        if any(p.adaptive for p in policies) and self.measured_auto is not None:
            return [*policies, self.measured_auto]
        return list(policies)

    def others_for(self, policies: list[StagedPolicy]) -> dict[str, StageModel]:
        """The other models these policies' later stages run on (``auto``: the measured
        policy's), each found once."""
        names = [m for p in self.with_auto(policies) for m in p.models]
        return {m: self.stage_model(m) for m in dict.fromkeys(names)}

    def draft_side(
        self, policies: list[StagedPolicy], others: dict[str, StageModel] | None = None
    ) -> int:
        """The shorter side a large JPEG may be decoded down to (1/2-1/8 scale in the DCT)
        for these policies' views: twice the largest resize they ask for, a cascade's other
        models' (``others``, found when not given) included; 0: full size."""
        if not self.jpeg_draft:
            return 0
        if others is None:
            others = self.others_for(policies)
        sides = [self.cfg.resize_size]
        for p in self.with_auto(policies):
            if p.adaptive:
                continue
            sides.append(self.geometry.largest_resize(p.joined))
            for m in p.models:
                geometry = others[m].pipeline.preparer.geometry
                sides.append(geometry.largest_resize(p.views_on(m)))
        return JPEG_DRAFT_MARGIN * max(sides)

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
        self,
        image: PreparedImage,
        policy: ViewSpec | StagedPolicy,
        seed: int | None,
        others: dict[str, StageModel] | None = None,
    ) -> tuple[list[View], int, StagedPolicy]:
        """View boxes of every stage, in stage order, the seed used (drawn when missing, so
        the answer can be reproduced) and the policy used (``auto`` resolved for this
        image's size). A cascade's other models (``others``, found when not given) plan
        their stages' views with their own geometry, on the same decoded image and seed."""
        if isinstance(policy, ViewSpec):
            policy = StagedPolicy.single(policy)
        seed = secrets.randbits(31) if seed is None else seed
        used = self.resolve(policy, image)
        if others is None:
            others = self.others_for([used])
        size = image.decoded_size
        planned: dict[str | None, Iterator[View]] = {
            None: iter(plan_image_views(used.joined, *size, self.geometry, seed))
        }
        for m in used.models:
            geometry = others[m].pipeline.preparer.geometry
            planned[m] = iter(plan_image_views(used.views_on(m), *size, geometry, seed))
        views = [
            next(planned[stage.model]) for stage in used.stages for _ in range(stage.spec.total)
        ]
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
        others = self.others_for([policy])  # found once for the draft, plan and costs
        image, decode_s = self.image(data, self.draft_side([policy], others))
        t0 = time.perf_counter()
        views, used_seed, used = self.plan(image, policy, seed, others)
        ends = used.stage_ends
        others = {m: others[m] for m in used.models}
        costs = self.stage_costs(used, views, others)
        if max_views:
            self.check_budget(views, sum(costs), max_views)
        groups = cut_view_groups(image, views[: ends[0]])
        if len(ends) == 1:
            image.source = None  # every tensor the views need is made: free the decoded pixels
        timings = {"decode": decode_s, "preprocess": time.perf_counter() - t0}
        return PreparedViews(image, views, used_seed, used, ends, groups, timings, costs, others)

    def stage_costs(
        self, policy: StagedPolicy, views: list[View], others: dict[str, StageModel]
    ) -> list[float]:
        """Each stage's compute in this model's view-equivalents: another model's views
        in its own, times what one of its views costs in this model's."""
        out, start = [], 0
        for stage, end in zip(policy.stages, policy.stage_ends, strict=True):
            if stage.model is None:
                out.append(self.view_equivalents(views[start:end]))
            else:
                other = others[stage.model]
                own = other.pipeline.preparer.view_equivalents(views[start:end])
                out.append(own * other.cost_per_view)
            start = end
        return out

    def image_for(self, prepared: PreparedViews, model: str | None) -> PreparedImage:
        """The pixels a stage on ``model`` cuts its views from: the first stage's image
        when the model resizes alike (its resized copies are shared), else the same
        decoded image with that model's own resizing."""
        if model is None:
            return prepared.image
        if model not in prepared.images:
            other = prepared.stage_models[model].pipeline.preparer
            first = prepared.image
            if other.resizer == self.resizer:
                prepared.images[model] = first
            else:
                source = first.source
                if source is None:
                    raise ValueError("the decoded image was freed before the last stage")
                picture = source.numpy() if isinstance(source, torch.Tensor) else source
                w, h = first.decoded_size
                prepared.images[model] = PreparedImage(
                    first.original_size, first.format,
                    resized_shape(w, h, other.cfg.resize_size),
                    source=other.resizer.source(picture), resize=other.resizer,
                )  # fmt: skip
        return prepared.images[model]

    def next_stage(self, prepared: PreparedViews) -> None:
        """Cut the next stage's views from the image decoded for the first (no second
        decode; a cascade's next model with its own resizing); the decoded pixels are
        freed once the last stage is cut."""
        t0 = time.perf_counter()
        model = prepared.policy.stages[prepared.stages_run].model
        image = self.image_for(prepared, model)
        prepared.groups = cut_view_groups(image, prepared.next_stage_views)
        prepared.stages_run += 1
        if prepared.last_stage:
            for held in (prepared.image, *prepared.images.values()):
                held.source = None
        prepared.timings["preprocess"] += time.perf_counter() - t0

    def view_equivalents(self, views: list[View]) -> float:
        return view_equivalents(views, self.cfg.input_size)

    def check_budget(self, views: list[View], cost: float, max_views: int) -> None:
        if len(views) > max_views:
            raise LimitExceededError(f"{len(views)} views for this image; the limit is {max_views}")
        if cost > max_views:
            s = self.cfg.input_size
            raise LimitExceededError(
                f"the views of this image cover {cost:.1f} times the pixels of a {s}x{s} view; "
                f"the limit is {max_views} (use a smaller @size or fewer views)"
            )
