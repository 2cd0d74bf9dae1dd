"""The passes over the data: train (SGD on the trainable parts), top-1, batch-norm
recalibration. Every pass gives each process its share and sums the counts."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from app.errors import MidserveError
from app.jobs.datasets import LabelledImage
from app.jobs.distributed import DistContext
from app.jobs.finetune.checkpoints import checkpoint_path, resume, save_checkpoint
from app.jobs.finetune.data import FixResTransform, ImageDataset, collate
from app.jobs.finetune.options import Augment, FinetuneOptions, FinetuneResult, default_lr
from app.jobs.finetune.trainable import global_batch_stats, select_trainable, set_fixres_modes
from app.model_config import ModelConfig

log = logging.getLogger(__name__)


def make_loader(
    dataset: ImageDataset | Subset,
    batch: int,
    workers: int,
    sampler: DistributedSampler | None = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
    )


@dataclass(frozen=True)
class ShardedPass:
    """A pass without gradients over samples at ``cfg``'s size: this process reads every
    world-th sample (no padding duplicates), ``batch`` at a time."""

    cfg: ModelConfig
    ctx: DistContext
    batch: int
    workers: int = 0

    def batches(self, samples: list[LabelledImage], augment: Augment) -> DataLoader:
        dataset = ImageDataset(samples, FixResTransform(self.cfg, augment))
        share = Subset(dataset, list(range(self.ctx.rank, len(dataset), self.ctx.world)))
        return make_loader(share, self.batch, self.workers)


@torch.no_grad()
def evaluate_top1(
    network: nn.Module, samples: list[LabelledImage], run: ShardedPass
) -> tuple[float, int, int]:
    """Center-crop top-1 (the server's single-view path) -> (top-1, images, skipped)."""
    ctx = run.ctx
    was_training = network.training
    network.eval()
    correct = seen = skipped = 0
    for b in run.batches(samples, "center"):
        skipped += b.skipped
        if not len(b.labels):
            continue
        logits = network(b.images.to(ctx.device))
        correct += int((logits.argmax(-1).cpu() == b.labels).sum())
        seen += len(b.labels)
    network.train(was_training)
    c, n, s = ctx.sum([correct, seen, skipped])
    return (c / n if n else float("nan")), int(n), int(s)


@torch.no_grad()
def recalibrate_batch_norm(
    network: nn.Module, samples: list[LabelledImage], run: ShardedPass
) -> tuple[int, int]:
    """Re-estimate every batch-norm's running statistics at ``run.cfg.input_size``; no labels.

    Running statistics restart from zero and become the plain average over batches
    (momentum None), with every batch-norm in train mode and everything else in eval mode.
    Returns (images used, images skipped).
    """
    bns = [m for m in network.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    network.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    ctx = run.ctx
    used = skipped = 0
    for b in run.batches(samples, "test"):
        skipped += b.skipped
        if len(b.labels):
            network(b.images.to(ctx.device))
            used += len(b.labels)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
        bn.eval()
    if ctx.distributed:  # average the per-process estimates, weighted by batch counts
        for bn in bns:
            assert bn.running_mean is not None and bn.running_var is not None
            nb = bn.num_batches_tracked.to(torch.float64)  # type: ignore[union-attr]
            rm, rv = bn.running_mean.double(), bn.running_var.double()
            packed = ctx.sum_tensor_(torch.cat([rm * nb, rv * nb, nb[None]]))
            c = bn.running_mean.numel()
            total = packed[-1].clamp_min(1)
            bn.running_mean.copy_(packed[:c] / total)
            bn.running_var.copy_(packed[c : 2 * c] / total)
            bn.num_batches_tracked.fill_(int(packed[-1]))  # type: ignore[union-attr]
    u, s = ctx.sum([used, skipped])
    if not u:
        raise MidserveError("no readable image to recalibrate batch-norm statistics with")
    return int(u), int(s)


def amp(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on GPUs that have it (no loss scaling needed); float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    network: nn.Module,
    opts: FinetuneOptions,
    ctx: DistContext,
    target: ModelConfig,
    samples: list[LabelledImage],
    folder: Path,
    settings: dict[str, Any],
    result: FinetuneResult,
) -> None:
    """SGD on the trainable parts for ``opts.epochs``, a checkpoint after each epoch;
    ``settings`` (the output's provenance) and ``result`` are filled in."""
    parts = select_trainable(network, opts.train, target.input_size)
    params = set_fixres_modes(network, parts)
    lr = opts.lr if opts.lr is not None else default_lr(opts.batch_size)
    lr_step = opts.lr_step or max(1, math.ceil(opts.epochs / 2))
    settings.update(
        {
            "epochs": opts.epochs,
            "batch_size": opts.batch_size,
            "lr": lr,
            "lr_step": lr_step,
            "momentum": opts.momentum,
            "weight_decay": opts.weight_decay,
            "augment": opts.augment,
            "train": opts.train,
            "trainable_modules": list(parts.modules),
            "label_smoothing": opts.label_smoothing,
        }
    )
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=0.1)
    ckpt_dir = opts.checkpoint_dir or folder / "checkpoints"
    start_epoch = 0
    if opts.resume:
        start_epoch = resume(ckpt_dir, network, optimizer, scheduler, settings, result)
    model: nn.Module = network
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(network, device_ids=device_ids, broadcast_buffers=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
    dataset = ImageDataset(samples, FixResTransform(target, opts.augment), seed=opts.seed)  # type: ignore[arg-type]
    sampler: DistributedSampler = DistributedSampler(
        dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=opts.seed
    )
    local_batch = opts.batch_size // ctx.world
    last_bn = network.get_submodule(parts.last_bn)
    assert isinstance(last_bn, _BatchNorm)
    for epoch in range(start_epoch, opts.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        set_fixres_modes(network, parts)
        loader = make_loader(dataset, local_batch, opts.workers, sampler)
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {epoch + 1}/{opts.epochs}",
            disable=not (opts.progress and ctx.is_main),
            unit="batch",
        )
        loss_sum = correct = seen = skipped = 0.0
        t0 = time.perf_counter()
        with global_batch_stats(last_bn, ctx):
            for b in loader:
                skipped += b.skipped
                # every process must take the same steps: skip a step where any has no image
                if ctx.sum([float(len(b.labels) == 0)])[0] > 0:
                    bar.update(1)
                    continue
                x, y = b.images.to(ctx.device), b.labels.to(ctx.device)
                with amp(ctx.device):
                    logits = model(x)
                    loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += float((logits.argmax(-1) == y).sum())
                seen += len(y)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.4f}",
                    acc=f"{correct / seen:.3f}",
                    img_s=f"{seen * ctx.world / max(elapsed, 1e-9):.1f}",
                )
                bar.update(1)
        bar.close()
        scheduler.step()
        loss_sum, correct, seen, skipped = ctx.sum([loss_sum, correct, seen, skipped])
        elapsed = time.perf_counter() - t0
        stats = {
            "epoch": float(epoch + 1),
            "loss": loss_sum / seen if seen else float("nan"),
            "top1": correct / seen if seen else float("nan"),
            "images": seen,
            "skipped": skipped,
            "images_per_s": seen / max(elapsed, 1e-9),
        }
        result.history.append(stats)
        if ctx.is_main:
            log.info(
                "epoch %d/%d: loss %.4f, top-1 %.3f, %d images (%d skipped), %.1f images/s",
                epoch + 1,
                opts.epochs,
                stats["loss"],
                stats["top1"],
                seen,
                skipped,
                stats["images_per_s"],
            )
            save_checkpoint(
                checkpoint_path(ckpt_dir, epoch + 1),
                epoch + 1,
                network,
                optimizer,
                scheduler,
                settings,
                result,
            )
        ctx.barrier()
    network.eval()
    last = result.history[-1] if result.history else {}
    result.skipped = int(last.get("skipped", 0))  # per pass: every epoch reads every file
    settings.update(
        {
            "train_loss": round(float(last.get("loss", float("nan"))), 6),
            "train_top1": round(float(last.get("top1", float("nan"))), 6),
            "skipped_images": result.skipped,
            "checkpoints": str(ckpt_dir),
        }
    )
