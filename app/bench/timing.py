"""In-process throughputs: the network alone, the served pipeline, the naive pipeline,
and how far a faster dtype's answers are from float32's."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from app.pipeline import ImagePipeline
from app.repository import LoadedModel
from app.request import ClassifyRequest, check_level
from app.runtime.engine import Engine
from app.runtime.plan import EngineOptions
from app.tta.views import ViewSpec


def timed_loop(fn: Callable[[], int], duration_s: float, min_iters: int = 3) -> float:
    """Units per second of ``fn`` (which returns the units it did), after one warm-up call."""
    fn()
    done, iters, start = 0, 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < duration_s:
        done += fn()
        iters += 1
    return done / (time.perf_counter() - start)


def raw_forward(engine: Engine, chunk: int, duration_s: float, views: int = 10) -> float:
    """The network alone on ready tensors: views/s at a given chunk size."""
    size = engine.cfg.input_size
    x = torch.randn(views, 3, size, size, device=engine.device)
    saved = engine.chunk_views
    engine.chunk_views = chunk
    try:
        return timed_loop(lambda: engine.run_views(x).logits.shape[0], duration_s)
    finally:
        engine.chunk_views = saved


def pipeline_rates(engine: Engine, images: list[bytes], spec: ViewSpec, level: str,
                   duration_s: float) -> tuple[float, float, float]:  # fmt: skip
    """decode -> views -> forward -> average on real JPEG bytes, one image at a time:
    (images/s, views/s, view-equivalents/s). Policies whose views differ in size compare
    by images and by pixels, not by view count."""
    pipeline = ImagePipeline(engine)
    calls, views, compute = 0, 0, 0.0

    def one() -> int:
        nonlocal calls, views, compute
        data = images[calls % len(images)]
        calls += 1
        request = ClassifyRequest(spec, check_level(level), top_k=5, seed=calls)
        planned = pipeline.classify(data, request).views
        views += len(planned)
        compute += pipeline.preparer.view_equivalents(planned)
        return 1

    images_per_s = timed_loop(one, duration_s)
    return images_per_s, images_per_s * views / calls, images_per_s * compute / calls


def engine_throughput(engine: Engine, images: list[bytes], spec: ViewSpec, level: str,
                      duration_s: float) -> float:  # fmt: skip
    """Views/s of the served pipeline (``pipeline_rates``)."""
    return pipeline_rates(engine, images, spec, level, duration_s)[1]


def naive_throughput(model: LoadedModel, images: list[bytes], views: int,
                     duration_s: float) -> float:  # fmt: skip
    """What a user writes with torchvision / ttach habits: per view a PIL crop, ToTensor,
    Normalize and one forward; NCHW; views are the 5 fixed crops and their mirrors."""
    cfg = model.cfg
    net = model.network.to(memory_format=torch.contiguous_format)
    resize = T.Resize(cfg.resize_size, interpolation=T.InterpolationMode(cfg.interpolation))
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    state = {"i": 0}

    def one() -> int:
        img = Image.open(io.BytesIO(images[state["i"] % len(images)])).convert("RGB")
        state["i"] += 1
        img = resize(img)
        crops = list(F.five_crop(img, cfg.input_size))
        crops += [F.hflip(c) for c in crops]
        probs = []
        with torch.no_grad():
            for crop in crops[:views]:
                probs.append(torch.softmax(net(to_tensor(crop).unsqueeze(0)), -1))
        torch.stack(probs).mean(0)
        return min(views, len(crops))

    try:
        return timed_loop(one, duration_s)
    finally:
        net.to(memory_format=torch.channels_last)


def dtype_agreement(model: LoadedModel, images: list[bytes], spec: ViewSpec,
                    served: EngineOptions) -> dict[str, float]:  # fmt: skip
    """Top-1 agreement and max probability difference of the served path (``served``: its
    dtype, fused network) against the plain float32 network."""
    ref = ImagePipeline(Engine(model, served.with_changes(dtype="float32", fuse=False)))
    fast = ImagePipeline(Engine(model, served))
    agree, max_diff = 0, 0.0
    for i, data in enumerate(images):
        a = ref.classify(data, ClassifyRequest(spec, top_k=1, seed=i))
        b = fast.classify(data, ClassifyRequest(spec, top_k=1, seed=i))
        agree += a.top[0].index == b.top[0].index
        max_diff = max(max_diff, float((a.probs - b.probs).abs().max()))
    return {"images": len(images), "top1_agreement": agree / len(images),
            "max_prob_diff": max_diff}  # fmt: skip
