"""Quantize one model's network to int8 and write it, with its check views, into the entry."""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import BackendUnavailableError, DataError
from app.jobs.datasets import LabelledImage, read_labelled_folder, scan_unlabelled
from app.jobs.evaluate.staged import fit_half
from app.jobs.evaluate.tables import paired
from app.local_pipeline import local_pipeline
from app.preparer import ImagePreparer
from app.repository import LoadedModel, ModelRepository
from app.request import ClassifyRequest, check_level
from app.runtime.backends import OpenVinoForward, openvino_model
from app.runtime.engine import Engine, ViewOutputs
from app.runtime.int8 import (
    CHECK_VIEWS,
    CHECK_WHOLE,
    INT8_FOLDER,
    META,
    MODEL_XML,
    int8_not_offered,
    weights_key,
)
from app.runtime.machine import cores, cpu_has_native_bf16
from app.runtime.plan import DtypeName, EngineOptions
from app.runtime.tuning.agreement import (
    normalised,
    real_outputs,
    real_view_agreement,
    reference_outputs,
)
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


@dataclass
class Split:
    """The fit half's views (calibration), and the held-out half: its center crops and
    whole images (uint8 [1, 3, H, W] each, the check views), labels and photos."""

    calibration: list[torch.Tensor]
    check_center: list[torch.Tensor]
    check_whole: list[torch.Tensor]
    targets: list[int]
    held_out: list[LabelledImage]


def split_views(model: LoadedModel, items: list[LabelledImage], seed: int) -> Split:
    """Views of ``items`` split by file name as evaluation splits them (``fit_half``): the
    held-out half is the one the served policy was scored on. Unreadable photos are skipped."""
    prep = ImagePreparer(model.cfg, torch.device("cpu"), DecodeLimits(), jpeg_draft=True)
    split = Split([], [], [], [], [])
    for item in items:
        try:
            views = views_of(prep, item.path.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", item.path, exc)
            continue
        if fit_half(item.path.name, seed):
            split.calibration.extend(views)
        elif len(split.check_center) < MAX_CHECK_VIEWS:
            split.check_center.append(views[0])
            split.check_whole.extend(views[1:])
            split.targets.append(item.target)
            split.held_out.append(item)
    if not split.calibration or not split.check_center:
        raise DataError(f"need photos in both halves; got {len(items)} usable photos")
    return split


CONVOLUTIONS = ("Convolution", "GroupConvolution")


def pixel_convolutions(ov_float: Any) -> list[str]:
    """The convolutions that read the network's input (the stem), kept in float.

    Quantizing their input puts the three channels' normalised pixels on one 8-bit scale,
    the network's largest rounding: on the default model the stem alone in float cut the
    mean probability difference on the fit half from 0.031 to 0.019 and kept every held-out
    photo under the served policy, for one layer of 50 (docs/benchmarks.md, "int8")."""
    found: list[str] = []
    seen: set[str] = set()
    frontier = list(ov_float.get_parameters())
    while frontier:
        node = frontier.pop()
        for output in node.outputs():
            for target in output.get_target_inputs():
                nxt = target.get_node()
                name = nxt.get_friendly_name()
                if name in seen:
                    continue
                seen.add(name)
                if nxt.get_type_name() in CONVOLUTIONS:
                    found.append(name)
                else:
                    frontier.append(nxt)
    return sorted(found)


def quantized_network(model: LoadedModel, ov_float: Any, calibration: list[torch.Tensor]
                      ) -> tuple[Any, list[str]]:  # fmt: skip
    """(the int8 network, the layers left in float)."""
    import nncf

    items = [normalised(model, v).numpy() for v in calibration]
    keep_float = pixel_convolutions(ov_float)
    quantized = nncf.quantize(
        ov_float,
        nncf.Dataset(items),
        subset_size=len(items),
        fast_bias_correction=False,
        ignored_scope=nncf.IgnoredScope(names=keep_float),
    )
    return quantized, keep_float


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
    split = split_views(model, items, seed)
    report = write_int8(model, split)
    if all(t >= 0 for t in split.targets):
        report["served_policy"] = served_policy_row(
            model, split.held_out, ModelRepository(models_dir)
        )
        write_meta(Path(report["folder"]), report)
    return {
        **report,
        "calibration_images": sum(fit_half(i.path.name, seed) for i in items),
        "not_offered": int8_not_offered(model),  # what the tuner will say of it here
    }


def write_int8(model: LoadedModel, split: Split) -> dict[str, Any]:
    """Quantize on the split's calibration views, check on its held-out center crops and
    whole images, write the entry's ``int8/`` atomically (a half-written folder is never
    read) and return the report."""
    import nncf
    import openvino as ov

    entry = model.cfg.folder
    if entry is None or model.cfg.bn_sets:
        raise BackendUnavailableError(
            f"model {model.cfg.name} has no entry folder of its own, or has BN sets"
        )
    ov_float = openvino_model(model, cache_root(None))
    quantized, float_layers = quantized_network(model, ov_float, split.calibration)
    check = torch.cat(split.check_center)
    cfg = model.cfg
    forward = OpenVinoForward(quantized, "int8", 1, cores(), cfg.mean, cfg.std)
    reference, out = real_outputs(
        model, lambda b: ViewOutputs(*forward(b)), [check, *split.check_whole]
    )
    mean_diff, top1, ok = real_view_agreement(reference, out)
    folder = entry / INT8_FOLDER
    tmp = folder.with_name(f".{INT8_FOLDER}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(quantized, tmp / MODEL_XML, compress_to_fp16=False)
    np.save(tmp / CHECK_VIEWS, nhwc(check))
    whole = {f"v{i:04d}": nhwc(v) for i, v in enumerate(split.check_whole)}
    np.savez(tmp / CHECK_WHOLE, **whole)  # type: ignore[arg-type]
    report: dict[str, Any] = {
        "folder": str(folder),
        "weights": weights_key(model),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nncf": nncf.__version__,
        "openvino": ov.__version__,
        "calibration_views": len(split.calibration),
        "float_layers": float_layers,
        "check_views": int(check.shape[0]) + len(whole),
        "top1_agreement": top1,
        "mean_prob_diff": mean_diff,
        "agrees": ok,
    }
    if all(t >= 0 for t in split.targets):
        report["top1"] = top1_rows(model, ov_float, quantized, check, split.targets)
    write_meta(tmp, report)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return report


def nhwc(views: torch.Tensor) -> np.ndarray:
    return views.permute(0, 2, 3, 1).contiguous().numpy()


def write_meta(folder: Path, report: dict[str, Any]) -> None:
    """``int8.json``, replaced whole: a reader never sees half of it."""
    tmp = folder / f".{META}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True))
    tmp.replace(folder / META)


def served_policy_row(
    model: LoadedModel, held_out: list[LabelledImage], repository: ModelRepository
) -> dict[str, Any]:
    """The served policy (``views=auto``, gate included) run whole on the held-out photos
    through the pipeline, int8 against the float path served without it (bf16 where the
    CPU has it natively, else float32): int8's rounding moves the gate's probabilities and
    the whole-image views, which per-view agreement does not show. The tuner refuses int8
    when it loses more than MAX_PHOTOS_LOST photos here. A cascade's later-stage models
    (``repository``'s) run as loaded, on the float path, in both."""
    cfg = model.cfg
    text = cfg.auto_views or cfg.default_views
    level = check_level(cfg.default_level)
    request = ClassifyRequest(spec=parse_policy(text), level=level, top_k=1, seed=0)
    float_dtype: DtypeName = "bfloat16" if cpu_has_native_bf16() else "float32"
    right: dict[str, np.ndarray] = {}
    view_eq: dict[str, float] = {}
    int8: DtypeName = "int8"
    for dtype in (float_dtype, int8):
        options = EngineOptions(backend="openvino", dtype=dtype, tune=False, forward_workers=1)
        pipeline = local_pipeline(repository, Engine(model, options), EngineOptions(tune=False))
        answers = [pipeline.classify(item.path.read_bytes(), request) for item in held_out]
        right[dtype] = np.array(
            [a.top[0].index == i.target for a, i in zip(answers, held_out, strict=True)]
        )
        view_eq[dtype] = float(np.mean([a.view_equivalents for a in answers]))
    p = paired(right["int8"], right[float_dtype])
    return {
        "policy": text, "n": len(held_out), "baseline": float_dtype,
        "top1": {k: float(v.mean()) for k, v in right.items()}, "view_equivalents": view_eq,
        "diff": p.diff, "lo": p.ci_low, "hi": p.ci_high, "fixed": p.fixed, "broken": p.broken,
    }  # fmt: skip
