"""JPEG decoders: libjpeg-turbo through simplejpeg against PIL's, in time and top-1.

    PYTHONPATH=. .venv/bin/python studies/jpeg_decoders.py [--repeats 3] [--big 12] [--no-top1]
        [--folders imagenet-samples ...]

Each way of decoding is an ``app.tta.preprocess.JpegDecoding`` plus the DCT-scaling margin
(the shorter side a large JPEG keeps: the margin times the largest resize the views ask
for; served: ``app.pipeline.JPEG_DRAFT_MARGIN``):

    pil           PIL's decoder and its draft (1/2, 1/4, 1/8), margin 2: the path before
    turbo         simplejpeg, the same scales and margin, the same pixels: served
    turbo-fast    as turbo with libjpeg's fast DCT and plain chroma upsampling
    turbo-8ths    as turbo, any n/8 scale (3/8, 5/8, 3/4, 7/8 too)
    turbo-m1      as turbo, margin 1: the smallest 1/2-1/8 scale still covering the resize
    turbo-8ths-m1 any n/8 scale, margin 1

Time: per image, the whole preparation as the server does it for the center crop (decode,
resize, views cut: ``ImagePreparer.views``), one thread, every way in turn on each image,
the best of ``--repeats``; the median and mean per folder, of the thread's CPU time (what
a busy shared machine leaves steady) and of the wall time. On the shared photos
(imagenet-samples: 100, imagenet-samples-extra: 450, ImageNet-size) and on ``--big`` photos
of imagenet-samples enlarged at run time to about 12 megapixels (quality 92: a phone photo's
size, not its detail, so their top-1 says little about real large photos).

Top-1: every photo of the three folders (imagenet-compatible-500 is PNG: decoded by PIL
either way, a control) and the enlarged ones, center crop and the model's ``auto`` policy,
float32 unless the CPU has native bf16; how many right per way, and how many answers differ
from ``pil``. Identical decoded pixels give identical answers, so each is forwarded once.
Also: the largest pixel difference between turbo and pil decoding a photo whole.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.config import default_models_dir
from app.jobs.datasets import read_labelled_folder
from app.local_pipeline import local_pipeline
from app.pipeline import ImagePipeline
from app.preparer import JPEG_DRAFT_MARGIN, ImagePreparer, StageModel
from app.repository import ModelRepository
from app.request import ClassifyRequest
from app.runtime.engine import Engine
from app.runtime.plan import EngineOptions
from app.tta.decode import PIL_JPEG, SERVED_JPEG, JpegDecoding, decode_picture
from app.tta.limits import DecodeLimits
from app.tta.preprocess import PreparedImage
from app.tta.stages import StagedPolicy, parse_policy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDERS = ("imagenet-samples", "imagenet-samples-extra", "imagenet-compatible-500")
WAYS: dict[str, tuple[JpegDecoding, int]] = {
    "pil": (PIL_JPEG, 2),
    "turbo": (SERVED_JPEG, 2),
    "turbo-fast": (JpegDecoding(fast=True), 2),
    "turbo-8ths": (JpegDecoding(scales="eighths"), 2),
    "turbo-m1": (SERVED_JPEG, 1),
    "turbo-8ths-m1": (JpegDecoding(scales="eighths"), 1),
}
POLICIES = ("center", "auto")


class WayPreparer(ImagePreparer):
    """The served preparer with one way of decoding JPEGs and one DCT-scaling margin."""

    def __init__(self, base: ImagePreparer, jpeg: JpegDecoding, margin: int) -> None:
        super().__init__(base.cfg, base.device, base.limits, base.jpeg_draft, uint8=base.uint8,
                         stage_models=base.stage_models)  # fmt: skip
        self.geometry = base.geometry
        self.jpeg, self.margin = jpeg, margin

    def draft_side(
        self, policies: list[StagedPolicy], others: dict[str, StageModel] | None = None
    ) -> int:
        return super().draft_side(policies, others) // JPEG_DRAFT_MARGIN * self.margin

    def image(
        self, data: bytes, draft_side: int = 0, jpeg: JpegDecoding = SERVED_JPEG
    ) -> tuple[PreparedImage, float]:
        return super().image(data, draft_side, self.jpeg)


def enlarge(data: bytes, pixels: float = 12e6) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    k = math.sqrt(pixels / (img.width * img.height))
    big = img.resize((round(img.width * k), round(img.height * k)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def prepare_times(
    ways: dict[str, ImagePipeline], images: list[bytes], repeats: int
) -> dict[str, dict[str, float]]:
    """ms per image, the best of ``repeats`` (ways interleaved), median and mean over the
    images: the thread's CPU time (steady on a shared machine) and the wall time."""
    center = parse_policy("center")
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    wall: dict[str, list[float]] = {name: [] for name in ways}
    for data in images:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, pipeline in ways.items():
                c0, t0 = time.thread_time(), time.perf_counter()
                pipeline.preparer.views(data, center, seed=0)
                runs[name].append((time.thread_time() - c0, time.perf_counter() - t0))
        for name, r in runs.items():
            cpu[name].append(1000 * min(c for c, _ in r))
            wall[name].append(1000 * min(w for _, w in r))
    return {
        n: {
            "cpu_median_ms": round(statistics.median(cpu[n]), 3),
            "cpu_mean_ms": round(statistics.mean(cpu[n]), 3),
            "wall_median_ms": round(statistics.median(wall[n]), 3),
            "wall_mean_ms": round(statistics.mean(wall[n]), 3),
        }
        for n in ways
    }


def pixel_difference(images: list[bytes]) -> dict[str, int]:
    """Whole-size decodes, turbo against pil: photos that differ, largest difference."""
    differ, largest = 0, 0
    for data in images:
        a = decode_picture(data, DecodeLimits(), 0, SERVED_JPEG).picture
        b = decode_picture(data, DecodeLimits(), 0, PIL_JPEG).picture
        d = int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        differ += d > 0
        largest = max(largest, d)
    return {"photos_differing": differ, "max_abs_diff": largest}


def top1(
    ways: dict[str, ImagePipeline], images: list[tuple[bytes, int]]
) -> dict[str, dict[str, int]]:
    """Per policy and way: photos right, and answers that differ from ``pil``'s."""
    out: dict[str, dict[str, int]] = {}
    for policy in POLICIES:
        request = ClassifyRequest(parse_policy(policy), seed=0)
        answers: dict[str, list[int]] = {name: [] for name in ways}
        cache: dict[bytes, int] = {}
        for data, _ in images:
            for name, pipeline in ways.items():
                prep = pipeline.preparer
                image, _ = prep.image(data, prep.draft_side([request.policy]))
                source = image.source
                raw = source.numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
                key = hashlib.blake2b(raw.tobytes() + str(raw.shape).encode()).digest()
                if key not in cache:
                    cache[key] = pipeline.classify(data, request).top[0].index
                answers[name].append(cache[key])
        targets = [t for _, t in images]
        for name, got in answers.items():
            out[f"{policy}/{name}"] = {
                "right": sum(g == t for g, t in zip(got, targets, strict=True)),
                "differ_from_pil": sum(g != p for g, p in zip(got, answers["pil"], strict=True)),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", type=int, default=12, help="photos enlarged to 12 MP")
    parser.add_argument("--no-top1", action="store_true")
    parser.add_argument("--folders", nargs="*", default=list(FOLDERS), help="of shared/data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repository = ModelRepository(default_models_dir())
    model = repository.load(args.model, torch.device("cpu"))
    options = EngineOptions()  # dtype unset: bf16 where native, else float32
    engine = Engine(model, options)
    ways = {}
    for name, (jpeg, margin) in WAYS.items():
        # a cascade's later model cuts its views from the image this preparer decoded
        pipeline = local_pipeline(repository, engine, options)
        pipeline.preparer = WayPreparer(pipeline.preparer, jpeg, margin)
        ways[name] = pipeline

    def photos(folder: str) -> list[tuple[bytes, int]]:
        labels_file = args.data / folder / "labels.csv"
        found = read_labelled_folder(
            args.data / folder, model.labels, labels_file if labels_file.is_file() else None
        )
        return [(item.path.read_bytes(), item.target) for item in found.items]

    labelled = {folder: photos(folder) for folder in args.folders}
    samples = photos(FOLDERS[0])
    step = max(1, len(samples) // max(args.big, 1))
    if args.big:  # --big 0: the shared photos only
        labelled["12mp"] = [(enlarge(d), t) for d, t in samples[::step][: args.big]]
    result: dict[str, object] = {"dtype": engine.dtype_name, "threads": 1}
    for folder, images in labelled.items():
        row: dict[str, object] = {"photos": len(images)}
        if folder != FOLDERS[2]:  # the PNG folder: no JPEG to time
            row["prepare"] = prepare_times(ways, [d for d, _ in images], args.repeats)
            row["pixels"] = pixel_difference([d for d, _ in images])
        if not args.no_top1:
            row["top1"] = top1(ways, images)
        result[folder] = row
        print(folder, json.dumps(row), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
