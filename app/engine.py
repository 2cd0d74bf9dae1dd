"""Images + view plan -> averaged predictions. No HTTP in here.

The request path: decode once, resize once, normalise once, cut every view as a slice of
that one tensor, stack views on the batch dimension, run the network in chunks sized for
the device, then average per image at the chosen level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from app.errors import InvalidRequestError
from app.fusion import FusionReport, fuse_for_inference
from app.model_config import ModelConfig
from app.repository import LoadedModel
from app.tta.adaptive import resolve_spec
from app.tta.averaging import LEVELS, Level, average_probabilities
from app.tta.preprocess import (
    DecodeLimits,
    PreparedImage,
    cut_views,
    decode_image,
    prepare_image,
)
from app.tta.views import View, ViewSpec, boxes_in_original, plan_views

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Views per forward: on a 2-core EPYC, lite0 runs fastest at 4-10 views per pass (bench/levers.py);
# larger batches fall out of cache. GPUs want large batches.
DEFAULT_CHUNK_VIEWS = {"cpu": 8, "cuda": 128}
# a reduced-scale JPEG decode keeps the shorter side at least this many times the resize size
JPEG_DRAFT_MARGIN = 2


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bfloat16 convolutions run natively (oneDNN), not emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, device: torch.device) -> str:
    """``auto``: bfloat16 on CPUs with native bf16 (measured: same top-1 as float32 on all
    100 sample photos at 1 and 10 views, max probability difference 0.04, about 2x faster),
    float32 elsewhere; an explicit dtype is kept."""
    if requested != "auto":
        return requested
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when there is one (or when asked for), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class TopClass:
    index: int
    synset: str
    label: str
    prob: float


@dataclass
class ViewOutputs:
    """Per-view network outputs for one image (rows in view order)."""

    features: torch.Tensor  # [N, D]
    logits: torch.Tensor  # [N, C]


@dataclass
class Prediction:
    top: list[TopClass]
    level: str
    views: list[View]
    spec: str
    seed: int
    boxes: list[list[float]]
    view_top1: list[TopClass]
    probs: torch.Tensor  # [C], kept for evaluation and accuracy metrics
    policy: str  # what was asked for: the spec, or "auto" (then spec is what auto chose)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "top": [t.__dict__ for t in self.top],
            "level": self.level,
            "views": len(self.views),
            "spec": self.spec,
            "policy": self.policy,
            "seed": self.seed,
            "view_boxes": [
                {"kind": v.kind, "flip": v.flip, "box": b}
                for v, b in zip(self.views, self.boxes, strict=True)
            ],
            "view_top1": [t.__dict__ for t in self.view_top1],
            "timings_ms": {k: round(v * 1000.0, 3) for k, v in self.timings.items()},
        }


def check_level(level: str) -> Level:
    if level not in LEVELS:
        raise InvalidRequestError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


@dataclass
class PreparedViews:
    """An image decoded, resized, planned and cut into views: ready for a forward pass."""

    image: PreparedImage
    views: list[View]
    seed: int
    spec: ViewSpec  # as used: ``auto`` resolved for this image
    batch: torch.Tensor  # [N, 3, S, S], channels_last
    timings: dict[str, float]  # seconds: decode, resize, views


class Engine:
    """One model on one device, ready to classify prepared images."""

    def __init__(
        self,
        model: LoadedModel,
        dtype: str = "float32",
        chunk_views: int = 0,
        limits: DecodeLimits | None = None,
        compile: bool = False,
        fuse: bool = True,
        jpeg_draft: bool = False,
    ) -> None:
        dtype = resolve_dtype(dtype, model.device)
        if dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be auto or one of {', '.join(DTYPES)}")
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        # batch norms folded, SAME paddings static, activations fused: about 2.2x the
        # end-to-end throughput on CPU (app/fusion.py, `midserve bench` fusion_speedup); the
        # caller's network is left as it is (fine-tuning trains its batch norms)
        self.fusion: FusionReport | None = None
        if fuse:
            network, self.fusion = fuse_for_inference(
                model.network, model.cfg.input_size, self.dtype
            )
            model = dataclasses.replace(model, network=network)
        self.model = model
        self.device = model.device
        self.chunk_views = chunk_views or DEFAULT_CHUNK_VIEWS.get(self.device.type, 32)
        self.limits = limits or DecodeLimits()
        # opt-in: large JPEGs decoded at 1/2-1/8 scale, still at least twice the resize size
        self.draft_min_side = JPEG_DRAFT_MARGIN * self.cfg.resize_size if jpeg_draft else 0
        # torch.compile'd forward (opt-in): one static shape, so partial chunks are padded
        # to chunk_views and compiled once, at warm-up rather than on a request.
        self._compiled: Any = torch.compile(self._forward, dynamic=False) if compile else None

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    # -- preprocessing (thread-safe, CPU bound; the server runs it off the event loop) --
    def prepare(self, data: bytes) -> PreparedImage:
        """Decode and resize once: the image every view is cut from."""
        return self._decode_and_resize(data)[0]

    def _decode_and_resize(self, data: bytes) -> tuple[PreparedImage, float, float]:
        """(image, decode seconds, resize seconds); the one decode path, so the reduced-scale
        JPEG setting holds wherever an image enters."""
        t0 = time.perf_counter()
        decoded = decode_image(data, self.limits, self.draft_min_side)
        t1 = time.perf_counter()
        image = prepare_image(
            decoded.image, self.model.cfg, self.device, decoded.format, decoded.original_size
        )
        return image, t1 - t0, time.perf_counter() - t1

    def plan(
        self, image: PreparedImage, spec: ViewSpec, seed: int | None
    ) -> tuple[list[View], int, ViewSpec]:
        """View boxes for this image, the seed used (drawn when missing, so the answer can be
        reproduced) and the spec used (``auto`` resolved for this image's size)."""
        seed = secrets.randbits(31) if seed is None else seed
        w, h = image.resized_size
        size = self.model.cfg.input_size
        used = resolve_spec(spec, w, h, size)
        return plan_views(used, w, h, size, seed), seed, used

    def prepare_views(self, data: bytes, spec: ViewSpec, seed: int | None) -> PreparedViews:
        """Decode, resize, plan and cut: everything before the forward pass, CPU bound and
        thread-safe (the server runs it off the event loop)."""
        image, decode_s, resize_s = self._decode_and_resize(data)
        t0 = time.perf_counter()
        views, used_seed, used = self.plan(image, spec, seed)
        batch = cut_views(image, views)
        timings = {"decode": decode_s, "resize": resize_s, "views": time.perf_counter() - t0}
        return PreparedViews(image, views, used_seed, used, batch, timings)

    # -- the forward pass -------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _chunks(self, batch: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, batch.shape[0], self.chunk_views):
            yield batch[start : start + self.chunk_views]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.features(x)
        return f, self.model.head(f)

    def run_views(self, batch: torch.Tensor) -> ViewOutputs:
        """Features and logits of a stack of views [N, 3, S, S], chunked for the device."""
        feats, logits = [], []
        compiled = self._compiled
        # dynamo does not trace under inference_mode; no_grad is its equivalent there
        grad_off = torch.no_grad() if compiled is not None else torch.inference_mode()
        with grad_off, self._autocast():
            for chunk in self._chunks(batch):
                n = int(chunk.shape[0])
                x = chunk.to(self.device)
                if compiled is not None and n < self.chunk_views:
                    pad = x.new_zeros((self.chunk_views - n, *x.shape[1:]))
                    x = torch.cat([x, pad])
                x = x.contiguous(memory_format=torch.channels_last)
                f, out = (compiled or self._forward)(x)
                feats.append(f[:n].float())
                logits.append(out[:n].float())
        return ViewOutputs(torch.cat(feats), torch.cat(logits))

    @torch.inference_mode()
    def summarize(
        self,
        outputs: ViewOutputs,
        level: Level,
        top_k: int,
    ) -> tuple[torch.Tensor, list[TopClass], list[TopClass]]:
        """Averaged probabilities, their top-k, and each view's own top-1."""
        with self._autocast():
            probs = average_probabilities(outputs.features, outputs.logits, self.model.head, level)
        probs = probs.float().cpu()
        labels = self.model.labels
        k = min(top_k, probs.shape[0])
        values, indices = probs.topk(k)
        top = [
            TopClass(int(i), labels.ids[i], labels.names[i], float(v))
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        view_probs = torch.softmax(outputs.logits.float(), dim=-1).cpu()
        best_p, best_i = view_probs.max(dim=-1)
        view_top1 = [
            TopClass(int(i), labels.ids[i], labels.names[i], float(p))
            for p, i in zip(best_p.tolist(), best_i.tolist(), strict=True)
        ]
        return probs, top, view_top1

    def check_top_k(self, top_k: int) -> int:
        n = self.model.cfg.num_classes
        if not 1 <= top_k <= n:
            raise InvalidRequestError(f"top_k must be between 1 and {n}, got {top_k}")
        return top_k

    # -- the whole path, for the CLI, evaluation and tests ------------------------------
    def classify(
        self,
        data: bytes,
        spec: ViewSpec,
        level: str = "softmax",
        top_k: int = 5,
        seed: int | None = None,
    ) -> Prediction:
        lvl = check_level(level)
        self.check_top_k(top_k)
        p = self.prepare_views(data, spec, seed)
        t0 = time.perf_counter()
        outputs = self.run_views(p.batch)
        t1 = time.perf_counter()
        prediction = self.predict(p.image, p.views, p.seed, p.spec, outputs, lvl, top_k)
        prediction.policy = str(spec)
        prediction.timings = {
            "decode_resize": p.timings["decode"] + p.timings["resize"],
            "views": p.timings["views"],
            "forward": t1 - t0,
            "postprocess": time.perf_counter() - t1,
        }
        return prediction

    def predict(
        self,
        image: PreparedImage,
        views: list[View],
        seed: int,
        spec: ViewSpec,
        outputs: ViewOutputs,
        level: Level,
        top_k: int,
    ) -> Prediction:
        probs, top, view_top1 = self.summarize(outputs, level, top_k)
        boxes = boxes_in_original(views, image.resized_size, image.original_size)
        return Prediction(top, level, views, str(spec), seed, boxes, view_top1, probs, str(spec))
