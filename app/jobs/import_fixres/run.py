"""Convert a FixRes checkpoint, check it strictly, write it as a model-repository entry."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from app.errors import ModelLoadError
from app.jobs.model_writer import WEIGHTS_FILE, check_output, write_model_entry
from app.jobs.resolution import check_test_size
from app.model_config import ModelConfig, WeightsSource
from app.repository import build_network, map_state_dict, read_checkpoint

FIXRES_STATE_KEY = "model"
FIXRES_PREFIX = "module."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def file_sha256(path: Path) -> str:
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
        weights=WeightsSource(kind="file", path=WEIGHTS_FILE),
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
            "source_sha256": file_sha256(checkpoint),
            "test_size": test_size,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    return write_model_entry(network, cfg, cfg, folder)
