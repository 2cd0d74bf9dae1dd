"""This process's place in a torchrun job, shared by finetune and evaluate.

Without torchrun (no WORLD_SIZE, or 1) everything here is a no-op on one device, so the
jobs have one code path for one process and for N.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from app.runtime.engine import pick_device


@dataclass
class DistContext:
    """Rank, world size and device of this process (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats_group: Any = None  # a process group for finetune's cross-process batch-norm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over processes (float64; counts stay exact)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def sum_tensor_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@contextlib.contextmanager
def distributed_context(device: str | None) -> Iterator[DistContext]:
    """Join the torchrun process group when launched by torchrun; leave it on exit.

    Each process takes GPU ``LOCAL_RANK`` on CUDA; nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        yield DistContext(device=dev)
        return
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    try:
        yield DistContext(rank=rank, world=world, device=dev, stats_group=dist.new_group())
    finally:
        dist.destroy_process_group()
