"""``midserve import-fixres``: a published FixRes checkpoint -> a model-repository entry.

Published FixRes checkpoints are ``{"model": {"module.<name>": tensor, ...}, ...}`` (saved
from DistributedDataParallel). The import strips ``module.``, insists that every tensor
matches the timm architecture one to one (missing, extra and mis-shaped keys are named),
and writes plain safetensors, so serving never unpickles anything.
"""

from __future__ import annotations

import argparse
import hashlib
from datetime import UTC, datetime
from pathlib import Path

from app.errors import InvalidRequestError, ModelLoadError
from app.model_config import ModelConfig, WeightsSource
from app.repository import build_network, map_state_dict, read_checkpoint

FIXRES_STATE_KEY = "model"
FIXRES_PREFIX = "module."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_fixres(
    checkpoint: Path,
    arch: str,
    test_size: int,
    out: str,
    models_dir: Path,
    *,
    num_classes: int = 1000,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    labels: str = "imagenet-1k",
    force: bool = False,
) -> ModelConfig:
    """Convert, check strictly, and write ``models_dir/out`` (model.toml + weights)."""
    from app.jobs.finetune import _write_output, check_output, check_test_size

    if not checkpoint.is_file():
        raise ModelLoadError(f"checkpoint {checkpoint} does not exist")
    folder = check_output(models_dir, out, force, resume=False)
    source = WeightsSource(
        kind="file",
        path=str(checkpoint),
        key_mapping="strip-prefix",
        strip_prefix=FIXRES_PREFIX,
        state_dict_key=FIXRES_STATE_KEY,
    )
    cfg = ModelConfig(
        name=out,
        arch=arch,
        weights=WeightsSource(kind="file", path="weights.safetensors"),
        num_classes=num_classes,
        input_size=test_size,
        crop_pct=crop_pct,
        interpolation=interpolation,  # type: ignore[arg-type]
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        labels=labels,
        description=f"FixRes {arch} at {test_size}px, imported from {checkpoint.name}",
    )
    network = build_network(cfg)
    check_test_size(test_size, network, arch)
    tensors = read_checkpoint(checkpoint, FIXRES_STATE_KEY)
    state = map_state_dict(tensors, network.state_dict(), source)  # names every mismatch
    network.load_state_dict(state, strict=True)
    cfg = cfg.with_changes(
        provenance={
            "job": "import-fixres",
            "source": str(checkpoint),
            "source_sha256": _sha256(checkpoint),
            "test_size": test_size,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return _write_output(network, cfg, cfg, folder)


def cmd_import_fixres(args: argparse.Namespace) -> int:
    models_dir = args.models_dir
    if models_dir is None:
        from app.config import Settings

        models_dir = Settings().models_dir
    if not 0.1 <= args.crop_pct <= 1.0:
        raise InvalidRequestError("--crop-pct must be in [0.1, 1]")
    cfg = import_fixres(
        args.checkpoint,
        args.arch,
        args.test_size,
        args.out,
        models_dir,
        num_classes=args.num_classes,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        force=args.force,
    )
    print(f"wrote {cfg.folder} ({cfg.arch}, {cfg.input_size}px, resize {cfg.resize_size})")
    return 0


def register_import(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-fixres",
        help="turn a published FixRes checkpoint into a model-repository entry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
