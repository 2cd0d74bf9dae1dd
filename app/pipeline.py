"""The per-image pipeline that the server, the CLI and evaluation share:
prepare (decode once, resize once, plan views, cut them as slices of one tensor)
-> forward (the engine, directly or through the server's cross-request batcher)
-> predict (average at the asked level, top-k, view boxes, timings).

The engine only turns views into features and logits; averaging and ranking happen here,
and the edges (the JSON API, the CLI) only translate a ``Prediction``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch

from app.errors import LimitExceededError
from app.labels import LabelSet
from app.model_config import ModelConfig
from app.request import ClassifyRequest, Level
from app.runtime.engine import Engine, ViewOutputs
from app.schemas import ImageResult, TopClass, ViewBox
from app.tta.adaptive import resolve_spec
from app.tta.averaging import average_probabilities
from app.tta.limits import DecodeLimits
from app.tta.preprocess import (
    PreparedImage,
    ViewGroup,
    cut_view_groups,
    decode_image,
    prepare_image,
)
from app.tta.views import (
    View,
    ViewGeometry,
    ViewSpec,
    boxes_in_original,
    parse_view_spec,
    plan_image_views,
    view_equivalents,
)

# a reduced-scale JPEG decode keeps the shorter side at least this many times the resize size
JPEG_DRAFT_MARGIN = 2


@dataclass
class PreparedViews:
    """An image decoded, resized, planned and cut into views: ready for a forward pass."""

    image: PreparedImage
    views: list[View]
    seed: int
    spec: ViewSpec  # as used: ``auto`` resolved for this image
    groups: list[ViewGroup]  # the views by shape, stacked channels_last
    timings: dict[str, float]  # seconds: decode, preprocess


@dataclass
class Prediction:
    """One image's answer, with its averaged probabilities kept for accuracy metrics."""

    top: list[TopClass]
    level: Level
    views: list[View]
    spec: str  # what was run (``auto`` resolved for this image)
    policy: str  # what was asked for: the spec, or "auto"
    seed: int
    boxes: list[list[float]]
    view_top1: list[TopClass]
    probs: torch.Tensor  # [C]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def ranked(self, k: int = 5) -> list[int]:
        """The ``k`` most probable class indices, best first (accuracy metrics)."""
        return self.probs.topk(min(k, self.probs.shape[0])).indices.tolist()

    def result(self, index: int = 0, file: str | None = None) -> ImageResult:
        return ImageResult(
            index=index,
            file=file,
            top=self.top,
            level=self.level,
            views=len(self.views),
            spec=self.spec,
            policy=self.policy,
            seed=self.seed,
            view_boxes=[
                ViewBox(kind=v.kind, flip=v.flip, box=b)
                for v, b in zip(self.views, self.boxes, strict=True)
            ],
            view_top1=self.view_top1,
            timings_ms={k: round(v * 1000.0, 3) for k, v in self.timings.items()},
        )


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
        stride: int = 32,
    ) -> None:
        self.cfg, self.device, self.limits = cfg, device, limits
        self.geometry = ViewGeometry(cfg.input_size, cfg.crop_pct, cfg.resize_size, stride)
        self.measured_auto = parse_view_spec(cfg.auto_views) if cfg.auto_views else None
        # opt-in: large JPEGs decoded at 1/2-1/8 scale, still at least twice the resize size
        self.draft_min_side = JPEG_DRAFT_MARGIN * cfg.resize_size if jpeg_draft else 0

    def image(self, data: bytes) -> tuple[PreparedImage, float]:
        """The decoded image, ready to be resized once per resolution; (image, decode s)."""
        t0 = time.perf_counter()
        decoded = decode_image(data, self.limits, self.draft_min_side)
        image = prepare_image(
            decoded.image, self.cfg, self.device, decoded.format, decoded.original_size
        )
        return image, time.perf_counter() - t0

    def plan(
        self, image: PreparedImage, spec: ViewSpec, seed: int | None
    ) -> tuple[list[View], int, ViewSpec]:
        """View boxes, the seed used (drawn when missing, so the answer can be reproduced)
        and the spec used (``auto`` resolved for this image's size)."""
        seed = secrets.randbits(31) if seed is None else seed
        w, h = image.resized_size
        used = resolve_spec(spec, w, h, self.cfg.input_size, self.measured_auto)
        views = plan_image_views(used, *image.decoded_size, self.geometry, seed)
        return views, seed, used

    def views(
        self, data: bytes, spec: ViewSpec, seed: int | None, max_views: int = 0
    ) -> PreparedViews:
        """Decode, plan, resize and cut; ``max_views`` (0: none) bounds both the count and
        the pixels (in views of the model's input size), checked per image, since ``auto``
        and whole-image shapes are only known once the image's size is."""
        image, decode_s = self.image(data)
        t0 = time.perf_counter()
        views, used_seed, used = self.plan(image, spec, seed)
        if max_views:
            self.check_budget(views, max_views)
        groups = cut_view_groups(image, views)
        image.source = None  # every tensor the views need is made: free the decoded pixels
        timings = {"decode": decode_s, "preprocess": time.perf_counter() - t0}
        return PreparedViews(image, views, used_seed, used, groups, timings)

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
            engine.cfg, engine.device, o.limits, o.jpeg_draft, engine.model.stride
        )

    def prepare(self, data: bytes, request: ClassifyRequest) -> PreparedViews:
        request.checked(self.engine.cfg.num_classes)
        return self.preparer.views(data, request.spec, request.seed, self.max_views)

    @torch.inference_mode()
    def predict(
        self,
        prepared: PreparedViews,
        outputs: ViewOutputs,
        request: ClassifyRequest,
        queue_wait_s: float,
        forward_s: float,
    ) -> Prediction:
        t0 = time.perf_counter()
        engine = self.engine
        probs = average_probabilities(outputs.features, outputs.logits, engine.head, request.level)
        values, indices = probs.topk(min(request.top_k, probs.shape[0]))
        view_p, view_i = torch.softmax(outputs.logits.float(), dim=-1).max(dim=-1)
        labels = engine.model.labels
        image = prepared.image
        boxes = boxes_in_original(prepared.views, image.resized_size, image.original_size)
        timings = {
            **prepared.timings,
            "queue_wait": queue_wait_s,
            "forward": forward_s,
            "postprocess": time.perf_counter() - t0,
        }
        return Prediction(
            top=top_classes(labels, values, indices),
            level=request.level,
            views=prepared.views,
            spec=str(prepared.spec),
            policy=str(request.spec),
            seed=prepared.seed,
            boxes=boxes,
            view_top1=top_classes(labels, view_p, view_i),
            probs=probs,
            timings=timings,
        )

    def classify(self, data: bytes, request: ClassifyRequest) -> Prediction:
        """The whole path in this thread (CLI, evaluation, tests)."""
        prepared = self.prepare(data, request)
        t0 = time.perf_counter()
        outputs = self.engine.run_groups(prepared.groups)
        return self.predict(prepared, outputs, request, 0.0, time.perf_counter() - t0)


def top_classes(labels: LabelSet, probs: torch.Tensor, indices: torch.Tensor) -> list[TopClass]:
    """Classes with their ids, names and probabilities, in the order given."""
    return [
        TopClass(index=int(i), synset=labels.ids[i], label=labels.names[i], prob=float(p))
        for p, i in zip(probs.tolist(), indices.tolist(), strict=True)
    ]
