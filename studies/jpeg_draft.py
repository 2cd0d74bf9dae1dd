"""Reduced-scale JPEG decoding (``EngineOptions.jpeg_draft``): time saved and predictions kept.

    PYTHONPATH=. .venv/bin/python studies/jpeg_draft.py [--scale 6] [--images 100]

The sample photos are about 500 px, too small for a reduced-scale decode to apply, so this
makes large JPEGs from them: each photo upscaled ``--scale`` times (bicubic) and saved at
quality 92, about 3000 x 2250 px at the default, like a phone photo. That is a stand-in: an
upscaled photo has no more detail than the original, so agreement here is an upper bound
on what real large photos would show. Reports the median pre-forward time (decode, resize,
views) per image with and without, and top-1 agreement and max probability difference of
the served path (10 views, same seeds).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

import torch
from PIL import Image

from app.bench import SAMPLES
from app.config import default_models_dir
from app.pipeline import ImagePipeline
from app.repository import ModelRepository
from app.request import ClassifyRequest
from app.runtime.engine import Engine
from app.runtime.plan import EngineOptions
from app.tta.views import default_policy


def enlarge(data: bytes, scale: float) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    big = img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--data", type=Path, default=SAMPLES)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--scale", type=float, default=6.0)
    args = parser.parse_args()
    files = sorted(p for p in args.data.glob("*") if p.is_file())[: args.images]
    if not files:
        raise SystemExit(f"no photos in {args.data}")
    model = ModelRepository(default_models_dir()).load(args.model, torch.device("cpu"))
    options = EngineOptions()  # dtype unset: bf16 where native, else float32
    whole = ImagePipeline(Engine(model, options))
    draft = ImagePipeline(Engine(model, options.with_changes(jpeg_draft=True)))
    spec = default_policy(10)
    times: dict[str, list[float]] = {"whole": [], "draft": []}
    agree, max_diff = 0, 0.0
    for i, path in enumerate(files):
        data = enlarge(path.read_bytes(), args.scale)
        preds = {}
        for name, pipeline in (("whole", whole), ("draft", draft)):
            request = ClassifyRequest(spec, seed=i)
            prepared = pipeline.prepare(data, request)
            times[name].append(sum(prepared.timings.values()))
            preds[name] = pipeline.classify(data, request)
        agree += preds["whole"].top[0].index == preds["draft"].top[0].index
        max_diff = max(max_diff, float((preds["whole"].probs - preds["draft"].probs).abs().max()))
    w, d = statistics.median(times["whole"]), statistics.median(times["draft"])
    result = {
        "images": len(files),
        "size_example": list(prepared.image.original_size),
        "prepare_ms_whole": round(1000 * w, 2),
        "prepare_ms_draft": round(1000 * d, 2),
        "speedup": round(w / d, 2),
        "top1_agreement": agree / len(files),
        "max_prob_diff": round(max_diff, 4),
        "dtype": whole.engine.dtype_name,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
