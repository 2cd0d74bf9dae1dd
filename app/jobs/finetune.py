"""FixRes: fine-tune at the test resolution, then write a model-repository entry the server serves.

FixRes (Touvron et al. 2019) raises the test resolution (the resize size scales with it, so
crop_pct is unchanged) and fine-tunes only the classifier and the batch-norm before global
pooling, at the test resolution, with test-time augmentation. The network stays in eval
mode except the parts being trained; the last batch-norm, in train mode, re-estimates its
running statistics at the new resolution. ``--bn-only`` is the label-free variant: every
batch-norm re-estimates its statistics from unlabelled images, no gradient step.

Runs as one process, or under ``torchrun --nproc_per_node N`` with DistributedDataParallel
(gloo on CPU, nccl on GPU). Under DDP the trained batch-norm uses statistics of the whole
global batch (summed across processes), so N processes compute what one process would.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, DistributedSampler, Subset

from app.errors import InvalidRequestError, MidserveError
from app.jobs.data import AUGMENTS, FixResTransform, ImageDataset, collate
from app.jobs.datasets import (
    CLASS_ORDERS,
    ClassOrder,
    LabelledImage,
    read_labelled_folder,
    scan_unlabelled,
)
from app.labels import load_labels
from app.model_config import ModelConfig, WeightsSource, load_model_config, write_model_config
from app.repository import MODEL_NAME_RE, ModelRepository, load_network

log = logging.getLogger(__name__)

TRAIN_PARTS = ("classifier", "last-bn", "head-conv")
DEFAULT_TRAIN = "classifier,last-bn"
FIXRES_LR_PER_512 = 0.008  # FixRes fine-tuning lr for ResNet-50 at batch 512
CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.pt$")
# Settings a resumed run must share with the checkpoint it continues.
RESUME_KEYS = ("parent", "test_size", "train", "augment", "batch_size", "lr", "label_smoothing")


@dataclass(frozen=True)
class FinetuneOptions:
    model: str  # a model name in the repository, or a model.toml / model folder path
    data: Path
    out: str = ""
    models_dir: Path | None = None  # where the source lives and the output goes
    val: Path | None = None
    test_size: int | None = None  # None: the source model's input size
    epochs: int = 10
    batch_size: int = 64  # global: split evenly across processes
    lr: float | None = None  # None: 0.008 x batch / 512 (FixRes)
    lr_step: int | None = None  # None: divide by 10 halfway (FixRes: every 30 of 60 epochs)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "test"
    train: str = DEFAULT_TRAIN
    label_smoothing: float = 0.0
    bn_only: bool = False
    class_order: ClassOrder = "ids"
    resume: bool = False
    checkpoint_dir: Path | None = None  # None: <out folder>/checkpoints
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    force: bool = False


@dataclass
class FinetuneResult:
    folder: Path
    cfg: ModelConfig
    history: list[dict[str, float]] = field(default_factory=list)
    val_top1_before: float | None = None
    val_top1: float | None = None
    images: int = 0
    skipped: int = 0


# -- processes ------------------------------------------------------------------------------
@dataclass
class DistContext:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats_group: Any = None  # a process group for the trained batch-norm's statistics

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
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


@contextlib.contextmanager
def distributed_context(device: str) -> Iterator[DistContext]:
    """Join the torchrun process group when launched by torchrun; leave it on exit."""
    from app.engine import pick_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistContext(device=pick_device(device))
        return
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    try:
        yield DistContext(rank=rank, world=world, device=dev, stats_group=dist.new_group())
    finally:
        dist.destroy_process_group()


# -- which parts train ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainableParts:
    modules: tuple[str, ...]  # module names whose parameters train (and run in train mode)
    last_bn: str
    classifier: str
    head_conv: str


def _module_name(network: nn.Module, target: nn.Module) -> str:
    for name, module in network.named_modules():
        if module is target:
            return name
    raise MidserveError("module not found in network")


def _execution_order(network: nn.Module, input_size: int) -> list[str]:
    """Names of batch-norm and conv modules in the order one forward pass runs them."""
    names = {id(m): n for n, m in network.named_modules()}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[id(mod)]))
        for m in network.modules()
        if isinstance(m, _BatchNorm | nn.Conv2d)
    ]
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    return order


def select_trainable(network: nn.Module, spec: str, input_size: int) -> TrainableParts:
    """Parse ``classifier,last-bn[,head-conv][,blocks:N]`` into module names of this network."""
    from timm.models._manipulate import group_parameters

    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InvalidRequestError(f"--train is empty; e.g. {DEFAULT_TRAIN}")
    blocks = 0
    for item in items:
        kind, _, count = item.partition(":")
        if kind == "blocks" and count.isdigit() and int(count) >= 1:
            blocks = int(count)
        elif item not in TRAIN_PARTS:
            raise InvalidRequestError(
                f"--train part {item!r} is unknown; parts: {', '.join(TRAIN_PARTS)}, blocks:N"
            )
    get_classifier = getattr(network, "get_classifier", None)
    classifier = get_classifier() if get_classifier else None
    if classifier is None or not any(True for _ in classifier.parameters()):
        raise InvalidRequestError("the network has no trainable classifier")
    classifier_name = _module_name(network, classifier)
    order = _execution_order(network, input_size)
    bn_names = [n for n in order if isinstance(network.get_submodule(n), _BatchNorm)]
    if not bn_names:
        raise InvalidRequestError("the network has no batch-norm layer; FixRes needs one")
    last_bn = bn_names[-1]
    before = order[: order.index(last_bn)]
    convs = [n for n in before if isinstance(network.get_submodule(n), nn.Conv2d)]
    head_conv = convs[-1] if convs else ""
    chosen: list[str] = []
    if "classifier" in items:
        chosen.append(classifier_name)
    if "last-bn" in items:
        chosen.append(last_bn)
    if "head-conv" in items:
        if not head_conv:
            raise InvalidRequestError("the network has no conv before its last batch-norm")
        chosen.append(head_conv)
    if blocks:
        named = {classifier_name, last_bn, head_conv}
        groups = group_parameters(network, network.group_matcher(coarse=False))  # type: ignore[operator]
        block_groups = []
        for ordinal, params in sorted(groups.items()):
            owners = {p.rsplit(".", 1)[0] for p in params}
            owners = {
                o for o in owners if not any(o == n or o.startswith(n + ".") for n in named if n)
            }
            if ordinal > 0 and owners:  # group 0 is the stem
                block_groups.append(sorted(owners))
        if blocks > len(block_groups):
            raise InvalidRequestError(
                f"blocks:{blocks} asked, the network has {len(block_groups)} blocks"
            )
        for block in block_groups[-blocks:]:
            chosen.extend(block)
    return TrainableParts(tuple(dict.fromkeys(chosen)), last_bn, classifier_name, head_conv)


def set_fixres_modes(network: nn.Module, parts: TrainableParts) -> list[nn.Parameter]:
    """Eval mode and frozen everywhere, except the trainable parts; returns their parameters."""
    network.eval()
    network.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in parts.modules:
        module = network.get_submodule(name)
        module.train()
        module.requires_grad_(True)
        params.extend(module.parameters())
    return params


def _cross_process_bn_forward(self: _BatchNorm, x: torch.Tensor, group: Any) -> torch.Tensor:
    """Batch-norm in train mode with statistics of the global batch (summed over processes)."""
    import torch.distributed.nn.functional as dist_fn

    if not self.training:
        return type(self).forward(self, x)
    dims = [d for d in range(x.dim()) if d != 1]
    xd = x.double()
    channels = x.shape[1]
    local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / channels])])
    total = dist_fn.all_reduce(local, group=group)  # differentiable: gradients flow back
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            nbt = float(self.num_batches_tracked)  # type: ignore[arg-type]
            m = self.momentum if self.momentum is not None else 1.0 / nbt
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)  # type: ignore[union-attr]
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    y = y.to(x.dtype)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if hasattr(self, "act"):  # timm's BatchNormAct2d: drop + activation after the norm
        drop = getattr(self, "drop", None)
        act: Any = self.act
        y = act(drop(y) if drop is not None else y)
    return y


@contextlib.contextmanager
def global_batch_stats(bn: _BatchNorm, ctx: DistContext) -> Iterator[None]:
    """Under DDP, make ``bn`` normalise with the whole global batch's statistics."""
    if not ctx.distributed:
        yield
        return
    bn.forward = types.MethodType(  # type: ignore[method-assign]
        lambda self, x: _cross_process_bn_forward(self, x, ctx.stats_group), bn
    )
    try:
        yield
    finally:
        del bn.forward


# -- data -------------------------------------------------------------------------------------
def _loader(
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


def _shard(dataset: ImageDataset, ctx: DistContext) -> Subset:
    """This process's share for evaluation: every world-th sample, no padding duplicates."""
    return Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world)))


@torch.no_grad()
def evaluate_top1(
    network: nn.Module,
    samples: list[LabelledImage],
    cfg: ModelConfig,
    ctx: DistContext,
    batch: int,
    workers: int = 0,
) -> tuple[float, int, int]:
    """Center-crop top-1 (the server's single-view path) -> (top-1, images, skipped)."""
    dataset = ImageDataset(samples, FixResTransform(cfg, "center"))
    was_training = network.training
    network.eval()
    correct = seen = skipped = 0
    for b in _loader(_shard(dataset, ctx), batch, workers):
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
    network: nn.Module,
    samples: list[LabelledImage],
    cfg: ModelConfig,
    ctx: DistContext,
    batch: int,
    workers: int = 0,
) -> tuple[int, int]:
    """Re-estimate every batch-norm's running statistics at ``cfg.input_size``; no labels.

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
    dataset = ImageDataset(samples, FixResTransform(cfg, "test"))
    used = skipped = 0
    for b in _loader(_shard(dataset, ctx), batch, workers):
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
            packed = torch.cat([rm * nb, rv * nb, nb[None]])
            torch.distributed.all_reduce(packed)
            c = bn.running_mean.numel()
            total = packed[-1].clamp_min(1)
            bn.running_mean.copy_(packed[:c] / total)
            bn.running_var.copy_(packed[c : 2 * c] / total)
            bn.num_batches_tracked.fill_(int(packed[-1]))  # type: ignore[union-attr]
    u, s = ctx.sum([used, skipped])
    if not u:
        raise MidserveError("no readable image to recalibrate batch-norm statistics with")
    return int(u), int(s)


# -- inputs -----------------------------------------------------------------------------------
def resolve_source(model: str, models_dir: Path | None) -> tuple[ModelConfig, Path]:
    """(source config, output root): a repository name, or a model.toml / model folder path."""
    path = Path(model)
    if path.suffix == ".toml" or (path.is_dir() and (path / "model.toml").is_file()):
        folder = path.parent if path.suffix == ".toml" else path
        cfg = load_model_config(folder.resolve())
        return cfg, models_dir or folder.resolve().parent
    if models_dir is None:
        from app.config import Settings

        models_dir = Settings().models_dir
    return ModelRepository(models_dir).config(model), models_dir


def network_stride(network: nn.Module) -> int:
    info = getattr(network, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info else 1
    except (KeyError, IndexError, TypeError):
        return 1


def check_test_size(size: int, network: nn.Module, arch: str) -> None:
    """FixRes sizes are multiples of the network's total stride (32 for ResNet/EfficientNet)."""
    stride = network_stride(network)
    if size < stride or size % stride:
        lower = max(stride, size // stride * stride)
        raise InvalidRequestError(
            f"test size {size} is not a multiple of {arch}'s total stride {stride}; "
            f"use e.g. {lower} or {lower + stride}"
        )


def check_output(root: Path, out: str, force: bool, resume: bool) -> Path:
    if not MODEL_NAME_RE.match(out):
        raise InvalidRequestError(
            f"--out {out!r} is not a valid model name (letters, digits, '_', '.', '-')"
        )
    folder = root / out
    if (folder / "model.toml").exists() and not (force or resume):
        raise InvalidRequestError(
            f"model {out!r} already exists in {root}; choose another --out or pass --force"
        )
    return folder


def default_lr(batch_size: int) -> float:
    return FIXRES_LR_PER_512 * batch_size / 512


# -- checkpoints ------------------------------------------------------------------------------
def latest_checkpoint(folder: Path) -> Path | None:
    found = []
    for p in folder.glob("epoch-*.pt") if folder.is_dir() else []:
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _write_output(
    network: nn.Module, cfg: ModelConfig, source: ModelConfig, folder: Path
) -> ModelConfig:
    """weights.safetensors first, model.toml last: a half-written folder is never listed."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tmp = folder / "weights.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "weights.safetensors")
    if source.labels not in ("imagenet-1k", "none") and source.folder is not None:
        shutil.copyfile(source.folder / source.labels, folder / source.labels)
    out = cfg.with_changes(folder=folder)
    write_model_config(out, folder)
    return out


# -- the job ----------------------------------------------------------------------------------
def _amp(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on GPUs that have it (no loss scaling needed); float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_finetune(opts: FinetuneOptions) -> FinetuneResult:
    with distributed_context(opts.device) as ctx:
        return _run(opts, ctx)


def _run(opts: FinetuneOptions, ctx: DistContext) -> FinetuneResult:
    source, root = resolve_source(opts.model, opts.models_dir)
    labels = load_labels(source.labels, source.num_classes, source.folder)
    size = opts.test_size or source.input_size
    out_name = opts.out or f"{source.name}_{'bn' if opts.bn_only else 'fixres'}{size}"
    folder = check_output(root, out_name, opts.force, opts.resume)
    if opts.augment not in AUGMENTS:
        raise InvalidRequestError(f"--augment must be one of {', '.join(AUGMENTS)}")
    if opts.batch_size < ctx.world or opts.batch_size % ctx.world:
        raise InvalidRequestError(
            f"--batch-size {opts.batch_size} must be a positive multiple of the process "
            f"count {ctx.world}"
        )
    if opts.epochs < 1 and not opts.bn_only:
        raise InvalidRequestError("--epochs must be at least 1")
    if not 0.0 <= opts.label_smoothing < 1.0:
        raise InvalidRequestError("--label-smoothing must be in [0, 1)")
    network = load_network(source)
    check_test_size(size, network, source.arch)
    target = source.with_changes(input_size=size)  # resize_size scales: crop_pct is unchanged
    if opts.bn_only:
        train_samples = scan_unlabelled(opts.data)
    else:
        train_samples = read_labelled_folder(opts.data, labels, class_order=opts.class_order).items
    val_samples = (
        read_labelled_folder(opts.val, labels, class_order=opts.class_order, what="val").items
        if opts.val
        else []
    )
    torch.manual_seed(opts.seed)
    network.to(ctx.device)
    local_batch = opts.batch_size // ctx.world
    result = FinetuneResult(folder=folder, cfg=target, images=len(train_samples))
    settings: dict[str, Any] = {
        "job": "bn-only" if opts.bn_only else "finetune",
        "parent": source.name,
        "parent_weights": source.weights.describe(),
        "parent_input_size": source.input_size,
        "test_size": size,
        "resize_size": target.resize_size,
        "crop_pct": target.crop_pct,
        "data": str(opts.data),
        "images": len(train_samples),
        "world_size": ctx.world,
        "seed": opts.seed,
    }
    if val_samples:
        top1, _, _ = evaluate_top1(network, val_samples, target, ctx, local_batch, opts.workers)
        result.val_top1_before = top1
    if opts.bn_only:
        used, skipped = recalibrate_batch_norm(
            network, train_samples, target, ctx, local_batch, opts.workers
        )
        result.skipped = skipped
        settings.update(
            {"images_used": used, "skipped_images": skipped, "batch_size": opts.batch_size}
        )
    else:
        _train(network, opts, ctx, target, train_samples, folder, settings, result)
    if val_samples:
        top1, n_val, _ = evaluate_top1(network, val_samples, target, ctx, local_batch, opts.workers)
        result.val_top1 = top1
        settings.update(
            {
                "val": str(opts.val),
                "val_images": n_val,
                "val_top1_before": round(float(result.val_top1_before or 0.0), 6),
                "val_top1": round(top1, 6),
            }
        )
    settings["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    what = (
        f"batch-norm statistics re-estimated at {size}px"
        if opts.bn_only
        else f"FixRes fine-tuned at {size}px"
    )
    out_cfg = target.with_changes(
        name=out_name,
        weights=WeightsSource(kind="file", path="weights.safetensors"),
        parent=source.name,
        description=f"{source.name}, {what}",
        provenance=settings,
    )
    if ctx.is_main:
        result.cfg = _write_output(network, out_cfg, source, folder)
    ctx.barrier()
    return result


def _train(
    network: nn.Module,
    opts: FinetuneOptions,
    ctx: DistContext,
    target: ModelConfig,
    samples: list[LabelledImage],
    folder: Path,
    settings: dict[str, Any],
    result: FinetuneResult,
) -> None:
    from tqdm import tqdm

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
        start_epoch = _resume(ckpt_dir, network, optimizer, scheduler, settings, result)
    model: nn.Module = network
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

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
        loader = _loader(dataset, local_batch, opts.workers, sampler)
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
                with _amp(ctx.device):
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
            _save_atomic(
                {
                    "epoch": epoch + 1,
                    "network": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": result.history,
                    "settings": {k: settings[k] for k in RESUME_KEYS},
                    "val_top1_before": result.val_top1_before,
                },
                ckpt_dir / f"epoch-{epoch + 1:03d}.pt",
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


def _resume(
    ckpt_dir: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: dict[str, Any],
    result: FinetuneResult,
) -> int:
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise InvalidRequestError(f"--resume: no epoch-NNN.pt checkpoint in {ckpt_dir}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise InvalidRequestError(f"--resume: cannot read {path}: {exc}") from exc
    saved = state.get("settings", {})
    differ = [k for k in RESUME_KEYS if saved.get(k) != settings.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in differ)
        raise InvalidRequestError(f"--resume: {path} was made with other settings ({detail})")
    network.load_state_dict(state["network"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    result.history = list(state.get("history", []))
    if result.val_top1_before is None and state.get("val_top1_before") is not None:
        result.val_top1_before = float(state["val_top1_before"])
    log.info("resuming from %s (epoch %d)", path, state["epoch"])
    return int(state["epoch"])


# -- command line ---------------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    opts = FinetuneOptions(
        model=args.model,
        data=args.data,
        out=args.out or "",
        models_dir=args.models_dir,
        val=args.val,
        test_size=args.test_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_step=args.lr_step,
        augment=args.augment,
        train=args.train,
        label_smoothing=args.label_smoothing,
        bn_only=args.bn_only,
        class_order=args.class_order,
        resume=args.resume,
        checkpoint_dir=args.checkpoint_dir,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        progress=args.progress,
        force=args.force,
    )
    result = run_finetune(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary(result))
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def _summary(result: FinetuneResult) -> str:
    cfg = result.cfg
    lines = [
        f"wrote {result.folder / 'model.toml'} ({cfg.input_size}px, resize {cfg.resize_size}, "
        f"crop_pct {cfg.crop_pct}, parent {cfg.parent})",
        f"images {result.images}, skipped unreadable {result.skipped}",
    ]
    if result.history:
        h = result.history[-1]
        lines.append(f"final train loss {_fmt(h['loss'])}, train top-1 {_fmt(h['top1'])}")
    if result.val_top1 is not None:
        lines.append(
            f"val top-1 at {cfg.input_size}px: before {_fmt(result.val_top1_before)}, "
            f"after {_fmt(result.val_top1)}"
        )
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """``midserve finetune`` and ``midserve import-fixres``."""
    from app.jobs.fixres_import import register_import

    p = subparsers.add_parser(
        "finetune",
        help="FixRes: fine-tune at a test resolution, write a new model-repository entry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name in the repository, or a model.toml path")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="labelled folder: class folders, or flat + val.txt / LOC_val_solution.csv, or "
        "<synset>_<name> files",
    )
    p.add_argument(
        "--val", type=Path, default=None, help="labelled folder for top-1 (same layouts as --data)"
    )
    p.add_argument("--test-size", type=int, default=None, help="new input size, e.g. 288, 320")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, all processes")
    p.add_argument("--lr", type=float, default=None, help="default 0.008 x batch / 512")
    p.add_argument("--lr-step", type=int, default=None, help="epochs per /10 (default half)")
    p.add_argument("--augment", default="test", choices=AUGMENTS)
    p.add_argument(
        "--train",
        default=DEFAULT_TRAIN,
        help="trainable parts: classifier, last-bn, head-conv, blocks:N (comma list)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--bn-only", action="store_true", help="label-free BN recalibration only")
    p.add_argument(
        "--class-order",
        default="ids",
        choices=CLASS_ORDERS,
        help="ids: folder names are label ids/synsets; sorted: i-th folder is class i",
    )
    p.add_argument("--out", default=None, help="new model name (default <model>_fixres<size>)")
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--force", action="store_true", help="replace an existing --out model")
    p.set_defaults(handler=cmd_finetune)
    register_import(subparsers)
