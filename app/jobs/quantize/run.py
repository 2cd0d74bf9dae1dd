"""Quantize one model's network to int8 and write it, with its check views, into the entry."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import BackendUnavailableError, DataError
from app.jobs.datasets import LabelledImage, read_labelled_folder, scan_unlabelled
from app.jobs.evaluate.staged import fit_half
from app.jobs.evaluate.tables import paired
from app.pipeline import ImagePreparer
from app.repository import LoadedModel, ModelRepository
from app.runtime.backends import OpenVinoForward, openvino_model
from app.runtime.engine import ViewOutputs
from app.runtime.int8 import CHECK_VIEWS, INT8_FOLDER, META, MODEL_XML, weights_key
from app.runtime.machine import cores
from app.runtime.tuning.agreement import normalised, real_view_agreement, reference_outputs
from app.runtime.tuning.cache import cache_root
from app.tta.limits import DecodeLimits
from app.tta.stages import parse_policy

log = logging.getLogger(__name__)

CALIBRATION_POLICY = "center,full"  # the views served policies cut: crops and whole images
MAX_CHECK_VIEWS = 64


def photos(folder: Path, model: LoadedModel, limit: int) -> list[LabelledImage]:
    """Labelled where the folder says how (ImageNet layouts), else unlabelled."""
    try:
        items = read_labelled_folder(folder, model.labels).items
    except DataError:
        items = scan_unlabelled(folder)
    return items[:limit]


def views_of(prep: ImagePreparer, data: bytes) -> list[torch.Tensor]:
    """uint8 views [1, 3, H, W] of one photo: its center crop, then the whole image."""
    prepared = prep.views(data, parse_policy(CALIBRATION_POLICY), seed=0)
    return [g.batch for g in prepared.groups]  # one group per shape: the crop first


def split_views(
    model: LoadedModel, items: list[LabelledImage], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """(calibration views of the fit half, check center crops of the held-out half, their
    labels); unreadable photos are skipped with a log line."""
    prep = ImagePreparer(model.cfg, torch.device("cpu"), DecodeLimits(), jpeg_draft=True)
    calibration: list[torch.Tensor] = []
    check: list[torch.Tensor] = []
    targets: list[int] = []
    for item in items:
        try:
            views = views_of(prep, item.path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", item.path, exc)
            continue
        if fit_half(item.path.as_posix(), seed):
            calibration.extend(views)
        elif len(check) < MAX_CHECK_VIEWS:
            check.append(views[0])
            targets.append(item.target)
    if not calibration or not check:
        raise DataError(f"need photos in both halves; got {len(items)} usable photos")
    return calibration, check, targets


def quantized_network(model: LoadedModel, ov_float: Any, calibration: list[torch.Tensor]) -> Any:
    import nncf

    items = [normalised(model, v).numpy() for v in calibration]
    return nncf.quantize(
        ov_float, nncf.Dataset(items), subset_size=len(items), fast_bias_correction=False
    )


def top1_rows(model: LoadedModel, ov_float: Any, quantized: Any, check: torch.Tensor,
              targets: list[int]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Top-1 of float32 (torch), bf16 and int8 (OpenVINO) on the held-out crops, with int8's
    paired difference to each."""
    cfg = model.cfg
    runs = {"float32": reference_outputs(model, normalised(model, check)).logits}
    for name, net, dtype in (("bfloat16", ov_float, "bfloat16"), ("int8", quantized, "int8")):
        forward = OpenVinoForward(net, dtype, 1, cores(), cfg.mean, cfg.std)
        runs[name] = forward(check)[1]
    y = torch.tensor(targets)
    right = {name: (logits.argmax(-1) == y).numpy() for name, logits in runs.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, ok in right.items():
        row: dict[str, Any] = {"top1": float(ok.mean()), "n": int(ok.size)}
        if name != "int8":
            p = paired(right["int8"], ok)
            row["vs_int8"] = {"diff": p.diff, "lo": p.ci_low, "hi": p.ci_high,
                              "fixed": p.fixed, "broken": p.broken}  # fmt: skip
        rows[name] = row
    return rows


def quantize(models_dir: Path, name: str, images: Path, max_images: int, seed: int
             ) -> dict[str, Any]:  # fmt: skip
    """Calibrate, quantize, check, and write ``<entry>/int8/``; returns the report."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"quantize needs nncf and openvino: {exc}") from exc
    model = ModelRepository(models_dir).load(name, "cpu")
    items = photos(images, model, max_images)
    calibration, check, targets = split_views(model, items, seed)
    report = write_int8(model, calibration, check, targets)
    return {**report, "calibration_images": sum(fit_half(i.path.as_posix(), seed) for i in items)}


def write_int8(model: LoadedModel, calibration: list[torch.Tensor], check_list: list[torch.Tensor],
               targets: list[int]) -> dict[str, Any]:  # fmt: skip
    """Quantize on ``calibration``, check on ``check_list`` (uint8 views), write the entry's
    ``int8/`` atomically (a half-written folder is never read) and return the report."""
    import nncf
    import openvino as ov

    entry = model.cfg.folder
    if entry is None or model.cfg.bn_sets:
        raise BackendUnavailableError(
            f"model {model.cfg.name} has no entry folder of its own, or has BN sets"
        )
    ov_float = openvino_model(model, cache_root(None))
    quantized = quantized_network(model, ov_float, calibration)
    check = torch.cat(check_list)
    cfg = model.cfg
    forward = OpenVinoForward(quantized, "int8", 1, cores(), cfg.mean, cfg.std)
    f, logits = forward(check)
    reference = reference_outputs(model, normalised(model, check))
    mean_diff, top1, ok = real_view_agreement(reference, ViewOutputs(f, logits))
    folder = entry / INT8_FOLDER
    tmp = folder.with_name(f".{INT8_FOLDER}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(quantized, tmp / MODEL_XML, compress_to_fp16=False)
    np.save(tmp / CHECK_VIEWS, check.permute(0, 2, 3, 1).contiguous().numpy())
    report: dict[str, Any] = {
        "folder": str(folder),
        "weights": weights_key(model),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nncf": nncf.__version__,
        "openvino": ov.__version__,
        "calibration_views": len(calibration),
        "check_views": int(check.shape[0]),
        "top1_agreement": top1,
        "mean_prob_diff": mean_diff,
        "agrees": ok,
    }
    if all(t >= 0 for t in targets):
        report["top1"] = top1_rows(model, ov_float, quantized, check, targets)
    (tmp / META).write_text(json.dumps(report, indent=1, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return report
