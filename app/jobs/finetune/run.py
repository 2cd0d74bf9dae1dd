"""One fine-tuning (or batch-norm recalibration) run, from options to a new model entry."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.errors import InvalidRequestError
from app.jobs.datasets import read_labelled_folder, scan_unlabelled
from app.jobs.distributed import DistContext, distributed_context
from app.jobs.finetune.loop import ShardedPass, evaluate_top1, recalibrate_batch_norm, train
from app.jobs.finetune.options import AUGMENTS, FinetuneOptions, FinetuneResult
from app.jobs.model_writer import WEIGHTS_FILE, check_output, write_model_entry
from app.jobs.resolution import check_test_size
from app.labels import load_labels
from app.model_config import ModelConfig, WeightsSource, load_model_config
from app.repository import ModelRepository, load_network
from app.runtime.bn_sets import write_bn_set


def resolve_source(model: str, models_dir: Path | None) -> tuple[ModelConfig, Path]:
    """(source config, output root): a repository name, or a model.toml / model folder path."""
    path = Path(model)
    if path.suffix == ".toml" or (path.is_dir() and (path / "model.toml").is_file()):
        folder = path.parent if path.suffix == ".toml" else path
        cfg = load_model_config(folder.resolve())
        return cfg, models_dir or folder.resolve().parent
    models_dir = models_dir or Settings().models_dir
    return ModelRepository(models_dir).config(model), models_dir


def check_options(opts: FinetuneOptions, world: int) -> None:
    if opts.augment not in AUGMENTS:
        raise InvalidRequestError(f"--augment must be one of {', '.join(AUGMENTS)}")
    if opts.batch_size < world or opts.batch_size % world:
        raise InvalidRequestError(
            f"--batch-size {opts.batch_size} must be a positive multiple of the process "
            f"count {world}"
        )
    if opts.bn_set and not opts.bn_only:
        raise InvalidRequestError("--bn-set writes re-estimated statistics: it needs --bn-only")
    if opts.epochs < 1 and not opts.bn_only:
        raise InvalidRequestError("--epochs must be at least 1")
    if not 0.0 <= opts.label_smoothing < 1.0:
        raise InvalidRequestError("--label-smoothing must be in [0, 1)")


def run_finetune(opts: FinetuneOptions) -> FinetuneResult:
    with distributed_context(opts.device) as ctx:
        return finetune_in(opts, ctx)


def finetune_in(opts: FinetuneOptions, ctx: DistContext) -> FinetuneResult:
    """The run in this process (one of ``ctx.world``); rank 0 writes the entry."""
    source, root = resolve_source(opts.model, opts.models_dir)
    labels = load_labels(source.labels, source.num_classes, source.folder)
    size = opts.test_size or source.input_size
    out_name = opts.out or f"{source.name}_{'bn' if opts.bn_only else 'fixres'}{size}"
    check_options(opts, ctx.world)
    if opts.bn_set and size == source.input_size:
        raise InvalidRequestError(
            f"--bn-set at {size}px: that is {source.name}'s own input size and statistics"
        )
    # a batch-norm set goes into the source's own folder; anything else is a new entry
    folder = (
        source.folder
        if opts.bn_set and source.folder
        else check_output(root, out_name, opts.force, opts.resume)
    )
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
    sharded = ShardedPass(target, ctx, opts.batch_size // ctx.world, opts.workers)
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
        top1, _, _ = evaluate_top1(network, val_samples, sharded)
        result.val_top1_before = top1
    if opts.bn_only:
        used, skipped = recalibrate_batch_norm(network, train_samples, sharded)
        result.skipped = skipped
        settings.update(
            {"images_used": used, "skipped_images": skipped, "batch_size": opts.batch_size}
        )
    else:
        train(network, opts, ctx, target, train_samples, folder, settings, result)
    if val_samples:
        top1, n_val, _ = evaluate_top1(network, val_samples, sharded)
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
        weights=WeightsSource(kind="file", path=WEIGHTS_FILE),
        parent=source.name,
        description=f"{source.name}, {what}",
        provenance=settings,
        # the parent's batch-norm sets and measured policy belong to the parent's weights
        bn_sets={},
        auto_views="",
    )
    if ctx.is_main and opts.bn_set:
        result.cfg = write_bn_set(source, network, size)
    elif ctx.is_main:
        result.cfg = write_model_entry(network, out_cfg, source, folder)
    ctx.barrier()
    return result
