"""``midserve finetune`` arguments; the training code is imported only when it runs."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import app.jobs.finetune as job
from app.cli_args import (
    add_engine_args,
    add_job_parser,
    settings_from_args,
)
from app.errors import InvalidRequestError
from app.jobs.args import add_class_order_arg
from app.jobs.finetune.options import AUGMENTS, DEFAULT_TRAIN, FinetuneOptions, FinetuneResult


def model_from_args(args: argparse.Namespace) -> str:
    """``--model``, or the positional model older command lines give; one of them."""
    given = {m for m in (args.model, args.model_positional) if m}
    if len(given) != 1:
        what = "two different models" if given else "no model"
        raise InvalidRequestError(f"finetune: {what} given; pass one --model")
    return given.pop()


def cmd_finetune(args: argparse.Namespace) -> int:
    from app.jobs.finetune.run import run_finetune

    opts = FinetuneOptions(
        model=model_from_args(args),
        data=args.data,
        out=args.out or "",
        models_dir=args.models_dir,  # None: a model path writes beside itself
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
        bn_set=args.bn_set,
        class_order=args.class_order,
        resume=args.resume,
        checkpoint_dir=args.checkpoint_dir,
        workers=args.workers,
        seed=args.seed,
        device=settings_from_args(args).device,
        progress=args.progress,
        force=args.force,
    )
    result = run_finetune(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(result))
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def summary(result: FinetuneResult) -> str:
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
    summary = "FixRes: fine-tune at a test resolution, write a new model-repository entry"
    p = add_job_parser(subparsers, "finetune", summary, job.__doc__)
    model_help = "model name in the repository, or a model.toml / model folder path"
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="the same as --model (older command lines)")  # fmt: skip
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
        "--bn-set",
        action="store_true",
        help="with --bn-only: add the statistics to the model itself, as the set its views "
        "at --test-size run with, instead of writing a new entry",
    )
    add_class_order_arg(p)
    p.add_argument("--out", default=None, help="new model name (default <model>_fixres<size>)")
    add_engine_args(p, dtype=False)  # training picks its precision: bf16 autocast on GPUs
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--force", action="store_true", help="replace an existing --out model")
    p.set_defaults(handler=cmd_finetune)
