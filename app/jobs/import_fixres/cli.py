"""``midserve import-fixres`` arguments; the conversion is imported only when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import app.jobs.import_fixres as job
from app.cli_args import add_job_parser, settings_from_args
from app.errors import InvalidRequestError


def cmd_import_fixres(args: argparse.Namespace) -> int:
    from app.jobs.import_fixres.run import import_fixres

    if not 0.1 <= args.crop_pct <= 1.0:
        raise InvalidRequestError("--crop-pct must be in [0.1, 1]")
    cfg = import_fixres(
        args.checkpoint,
        args.arch,
        args.test_size,
        args.out,
        settings_from_args(args).models_dir,
        num_classes=args.num_classes,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        force=args.force,
    )
    print(f"wrote {cfg.folder} ({cfg.arch}, {cfg.input_size}px, resize {cfg.resize_size})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "turn a published FixRes checkpoint into a model-repository entry"
    p = add_job_parser(subparsers, "import-fixres", summary, job.__doc__)
    p.add_argument("checkpoint", type=Path, help="FixRes .pth ({'model': {'module.*': ...}})")
    p.add_argument("--arch", required=True, help="timm architecture, e.g. resnet50")
    p.add_argument("--test-size", type=int, required=True, help="e.g. 384 for FixRes ResNet-50")
    p.add_argument("--out", required=True, help="new model name")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--crop-pct", type=float, default=0.875, help="FixRes resizes to size/0.875")
    p.add_argument("--interpolation", default="bilinear", choices=["bicubic", "bilinear"])
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out model")
    p.set_defaults(handler=cmd_import_fixres)
