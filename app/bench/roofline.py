"""The compute bound: how fast this device multiplies matrices, how much one view costs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from app.bench.timing import timed_loop
from app.repository import LoadedModel


def gemm_gflops(duration_s: float, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """Matmul throughput now, on this device (the compute bound's numerator)."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def one() -> int:
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1

    return 2 * n**3 / 1e9 * timed_loop(one, duration_s)


def model_gflops_per_view(model: LoadedModel) -> float:
    """Forward FLOPs of one view, counted by torch.utils.flop_counter (2 per multiply-add)."""
    size = model.cfg.input_size
    x = torch.zeros(1, 3, size, size, device=model.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.head(model.features(x))
    return counter.get_total_flops() / 1e9
