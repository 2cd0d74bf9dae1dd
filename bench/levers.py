"""Measure the engine's speed levers one by one, in one run (ratios, not absolutes).

    .venv/bin/python bench/levers.py [--duration 4] [--compile]

Layout (NCHW vs channels_last), dtype (float32 vs bfloat16 autocast), chunk size, thread
count and, optionally, torch.compile, each on the default model's raw forward at 10 views.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from app.bench import _timed_loop
from app.engine import Engine
from app.repository import ModelRepository, default_models_dir


def views_per_s(engine: Engine, x: torch.Tensor, duration: float) -> float:
    return _timed_loop(lambda: engine.run_views(x).logits.shape[0], duration)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    model = ModelRepository(default_models_dir()).load(args.model, "cpu")
    size = model.cfg.input_size
    x = torch.randn(10, 3, size, size)
    d = args.duration
    rows: dict[str, float] = {}
    fp32, bf16 = Engine(model, "float32", 10), Engine(model, "bfloat16", 10)
    rows["fp32 channels_last chunk10"] = views_per_s(fp32, x, d)
    model.network.to(memory_format=torch.contiguous_format)
    saved = torch.Tensor.contiguous

    def nchw(self: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format):
        return saved(self)

    torch.Tensor.contiguous = nchw  # type: ignore[method-assign]
    rows["fp32 NCHW chunk10"] = views_per_s(fp32, x, d)
    torch.Tensor.contiguous = saved  # type: ignore[method-assign]
    model.network.to(memory_format=torch.channels_last)
    rows["bf16 channels_last chunk10"] = views_per_s(bf16, x, d)
    for chunk in (1, 2, 5, 20):
        fp32.chunk_views = bf16.chunk_views = chunk
        xx = torch.randn(max(10, chunk), 3, size, size)
        rows[f"fp32 channels_last chunk{chunk}"] = views_per_s(fp32, xx, d)
        rows[f"bf16 channels_last chunk{chunk}"] = views_per_s(bf16, xx, d)
    fp32.chunk_views = bf16.chunk_views = 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows["fp32 channels_last chunk10 1 thread"] = views_per_s(fp32, x, d)
    torch.set_num_threads(threads)
    if args.compile:
        t0 = time.perf_counter()
        model.network = torch.compile(model.network)
        fp32.run_views(x)
        rows["compile warm-up seconds"] = time.perf_counter() - t0
        rows["fp32 channels_last chunk10 compiled"] = views_per_s(fp32, x, d)
        bf16.run_views(x)
        rows["bf16 channels_last chunk10 compiled"] = views_per_s(bf16, x, d)
    base = rows["fp32 NCHW chunk10"]
    for k, v in rows.items():
        ratio = "" if "seconds" in k else f"  x{v / base:.2f} vs fp32 NCHW"
        print(f"{k:<40} {v:8.2f}{ratio}")
    print(json.dumps({k: round(v, 2) for k, v in rows.items()}))


if __name__ == "__main__":
    main()
