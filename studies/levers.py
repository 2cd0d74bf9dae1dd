"""Measure the engine's speed levers one by one, in one run (ratios, not absolutes).

    .venv/bin/python studies/levers.py [--duration 2] [--chunk 8] [--compile]

The default model's raw forward (network only, ready tensors) under each lever: layout
(NCHW vs channels_last), dtype (float32 vs bfloat16 autocast), the inference rewrites of
app/runtime/fusion.py (folded norms + static SAME padding, then fused activations), one intra-op
thread instead of two, and optionally torch.compile. The machine's speed drifts, so the
rows run in interleaved rounds and each reports its median.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from app.bench.timing import timed_loop
from app.config import default_models_dir
from app.repository import ModelRepository
from app.runtime.fusion import fuse_for_inference

ROUNDS = 3


def forward_rate(net: nn.Module, x: torch.Tensor, dtype: torch.dtype, threads: int = 0,
                 duration: float = 2.0) -> Callable[[], float]:  # fmt: skip
    """A measurement: views/s of ``net`` on ``x`` under ``dtype`` autocast."""

    def one() -> int:
        with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            net(x)
        return int(x.shape[0])

    def measure() -> float:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads or saved)
        try:
            return timed_loop(one, duration)
        finally:
            torch.set_num_threads(saved)

    return measure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per row and round")
    parser.add_argument("--chunk", type=int, default=8, help="views per forward")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    model = ModelRepository(default_models_dir()).load(args.model, "cpu")
    size, d = model.cfg.input_size, args.duration
    x_cl = torch.randn(args.chunk, 3, size, size).contiguous(memory_format=torch.channels_last)
    x_nchw = x_cl.contiguous()
    fp32, bf16 = torch.float32, torch.bfloat16
    plain_cl = model.network  # the repository loads channels_last
    plain_nchw = copy.deepcopy(plain_cl).to(memory_format=torch.contiguous_format)
    folded, _ = fuse_for_inference(plain_cl, size)  # norms folded, SAME padding static
    served_bf16, report = fuse_for_inference(plain_cl, size, bf16)  # + activations fused
    served_fp32, _ = fuse_for_inference(plain_cl, size, fp32)
    rows: dict[str, Callable[[], float]] = {
        "fp32 NCHW": forward_rate(plain_nchw, x_nchw, fp32, duration=d),
        "fp32 channels_last": forward_rate(plain_cl, x_cl, fp32, duration=d),
        "bf16 channels_last": forward_rate(plain_cl, x_cl, bf16, duration=d),
        "bf16 + folded norms, static padding": forward_rate(folded, x_cl, bf16, duration=d),
        "bf16 + fused activations (served)": forward_rate(served_bf16, x_cl, bf16, duration=d),
        "fp32 + all rewrites": forward_rate(served_fp32, x_cl, fp32, duration=d),
        "bf16 served, 1 thread": forward_rate(served_bf16, x_cl, bf16, threads=1, duration=d),
    }
    extra: dict[str, float] = {}
    if args.compile:
        compiled = torch.compile(served_bf16)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", bf16):  # dynamo does not trace inference_mode
            compiled(x_cl)
        extra["compile warm-up seconds"] = time.perf_counter() - t0

        def compiled_rate() -> float:
            def one() -> int:
                with torch.no_grad(), torch.autocast("cpu", bf16):
                    compiled(x_cl)
                return args.chunk

            return timed_loop(one, d)

        rows["bf16 served, torch.compile"] = compiled_rate
    results: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(ROUNDS):
        for name, measure in rows.items():
            results[name].append(measure())
    medians = {k: statistics.median(v) for k, v in results.items()}
    base = medians["fp32 NCHW"]
    print(f"{args.model}, {args.chunk} views per forward, {torch.get_num_threads()} threads")
    print(f"rewrites: {report.describe()}")
    for k, v in medians.items():
        print(f"{k:<40} {v:8.1f} views/s  x{v / base:.2f} vs fp32 NCHW")
    for k, v in extra.items():
        print(f"{k:<40} {v:8.1f}")
    print(json.dumps({**{k: round(v, 1) for k, v in medians.items()}, **extra}))


if __name__ == "__main__":
    main()
