"""How close serving comes to the forward alone, and what the work around it costs per
upload size: the served settings against the older per-image path (whole-image resizes,
float32 views normalised on the host, full-size JPEG decodes, no int8), two real servers
measured in interleaved rounds of one run, beside the served plan's raw forward."""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from PIL import Image

from app.bench.server_load import HttpRound, http_load, summarize_rounds
from app.runtime.engine import Engine
from app.runtime.tuning.tuner import measure
from app.serve_process import serve_process

PREVIOUS = {"MIDSERVE_INT8": "false"}
PREVIOUS_PATHS = ["--previous-paths"]  # whole-image float32 views, full-size JPEG decodes
TEN_VIEWS = "fixed:5,mfixed:5"
ROUNDS = 3


def resized_jpegs(images: list[bytes], size: tuple[int, int], count: int) -> list[bytes]:
    """The photos re-encoded at ``size`` (quality 90): a phone photo's 12 MP, a thumbnail."""
    out = []
    for data in images[:count]:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def ceiling_phase(models_dir: Path, model_name: str, engine: Engine, images: list[bytes],
                  duration_s: float, env: dict[str, str], out: dict[str, Any]) -> None:  # fmt: skip
    """Rounds of: the served plan's raw forward (``engine``, tuned as the served server
    tunes: ``env`` gives it the same budget and cache), then each workload on both servers."""
    uploads = {
        "imagenet": images,
        "12mp": resized_jpegs(images, (4000, 3000), 8),
        "thumbnail": resized_jpegs(images, (160, 120), 40),
    }
    workloads = {  # (uploads, views, concurrency)
        "ten_views_c1": ("imagenet", TEN_VIEWS, 1),
        "ten_views_c8": ("imagenet", TEN_VIEWS, 8),
        "center_c8": ("imagenet", "center", 8),
        "center_12mp_c8": ("12mp", "center", 8),
        "center_thumbnail_c8": ("thumbnail", "center", 8),
    }
    out["served_plan"] = engine.plan.describe()
    raw: list[float] = []
    rounds: dict[str, list[HttpRound]] = {
        f"{w}_{s}": [] for w in workloads for s in ("served", "previous")
    }
    with serve_process(models_dir, model_name, env=env, ready_timeout_s=180) as (served, _), \
         serve_process(models_dir, model_name, env={**env, **PREVIOUS}, ready_timeout_s=180,
                       extra_args=PREVIOUS_PATHS) as (previous, _):  # fmt: skip
        for r in range(ROUNDS):
            raw.append(measure(engine, engine.plan, duration_s / ROUNDS))
            for name, (kind, views, c) in workloads.items():
                for side, base in (("served", served), ("previous", previous)):
                    rounds[f"{name}_{side}"].append(http_load(
                        base, model_name, uploads[kind], {"views": views, "seed": "0"}, c,
                        duration_s / ROUNDS, 1.0 if r == 0 else 0.2,
                    ))  # fmt: skip
    out["raw_served_plan_views_per_s"] = round(statistics.median(raw), 2)
    table = {k: {m: round(v, 2) for m, v in summarize_rounds(r).items()} for k, r in rounds.items()}
    out["ceiling_http"] = table
    ceiling = out["raw_served_plan_views_per_s"]
    for level in ("c1", "c8"):
        out[f"ten_views_{level}_of_raw_forward"] = round(
            table[f"ten_views_{level}_served"]["views_per_s"] / ceiling, 3
        )
    for name in workloads:
        a, b = table[f"{name}_served"], table[f"{name}_previous"]
        out[f"{name}_served_vs_previous"] = round(
            a["requests_per_s"] / max(b["requests_per_s"], 1e-9), 3
        )
