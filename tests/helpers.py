"""Shared test helpers: tiny real models written into a real model repository."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from app.model_config import ModelConfig, WeightsSource, write_model_config
from app.pipeline import ImagePipeline, Prediction
from app.preparer import ImagePreparer
from app.request import ClassifyRequest
from app.runtime.engine import Engine
from app.runtime.plan import EngineOptions
from app.tta.views import ViewSpec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = PROJECT_ROOT.parent / "shared" / "data" / "imagenet-samples"
SAMPLES_MISSING = "shared/data/imagenet-samples is absent (../shared beside the checkout)"
DEFAULT_MODEL = "tf_efficientnet_lite0"  # the embedded default model (real ImageNet weights)


def copy_default_model(root: Path, ignore: Callable[..., Any] | None = None) -> list[str]:
    """The default model's repository entry copied under ``root``, with the later-stage
    models its own policies run (its default is a cascade); their names, default first."""
    from app.config import default_models_dir
    from app.repository import ModelRepository
    from app.tta.stages import parse_policy

    cfg = ModelRepository(default_models_dir()).config(DEFAULT_MODEL)
    later = [m for t in (cfg.default_views, cfg.auto_views) if t for m in parse_policy(t).models]
    names = [DEFAULT_MODEL, *dict.fromkeys(later)]
    for name in names:
        shutil.copytree(default_models_dir() / name, root / name, ignore=ignore)
    return names


# Distinct base colours: the class is learnable from colour alone, whatever the features.
PALETTE = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def make_tiny_model(
    root: Path,
    name: str = "tiny",
    *,
    arch: str = "test_efficientnet",
    num_classes: int = 10,
    input_size: int = 64,
    crop_pct: float = 0.8,
    seed: int = 0,
    interpolation: str = "bilinear",
) -> ModelConfig:
    """A real timm network with seeded random weights, saved as a model-repository entry."""
    torch.manual_seed(seed)
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    # Random init zeroes residual gammas and leaves BN statistics at 0/1, so features are
    # near zero and outputs near uniform. Give every BN gamma 1 and estimate its statistics
    # on noise, so features and logits have a realistic spread (logit std about 1).
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.momentum = None  # cumulative average over the calibration batches
        net.train()
        for _ in range(4):
            net(torch.randn(16, 3, input_size, input_size))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
    net.eval()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(folder / "weights.safetensors"),
    )
    cfg = ModelConfig(
        name=name,
        arch=arch,
        weights=WeightsSource(kind="file", path="weights.safetensors"),
        num_classes=num_classes,
        input_size=input_size,
        crop_pct=crop_pct,
        interpolation=interpolation,  # type: ignore[arg-type]
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        labels="none",
        default_views="fixed:5,mfixed:5",
    )
    write_model_config(cfg, folder)
    return cfg


def image_bytes(
    width: int = 120,
    height: int = 90,
    fmt: str = "PNG",
    mode: str = "RGB",
    seed: int = 0,
    **save_kwargs: object,
) -> bytes:
    """A random-noise image encoded in ``fmt``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def make_image_folder(
    root: Path, classes: int = 4, per_class: int = 8, seed: int = 0, size=(80, 70)
) -> Path:
    """root/<class id>/<n>.png: noisy images tinted by class colour (a training set)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 40, size=(size[1], size[0], 3))
            arr = np.clip(np.array(PALETTE[c % len(PALETTE)]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(folder / f"{i}.png")
    return root


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "weights.safetensors"))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m app.cli ARGS`` with this environment (plus ``env``), its output captured."""
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        check=False,
    )


def run_bench(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """``midserve bench ARGS``, which must exit 0: its JSON report (the last line it
    prints) and its stderr (the tables)."""
    res = run_cli("bench", *args, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def sample_files() -> list[Path]:
    return sorted(SAMPLES_DIR.glob("*.JPEG")) if SAMPLES_DIR.is_dir() else []


# Engines in tests run in float32 unless a test says otherwise: results then do not depend on
# whether this CPU has native bfloat16.
FLOAT32 = EngineOptions(dtype="float32")


def classify(engine: Engine, data: bytes, spec: ViewSpec, **request: Any) -> Prediction:
    """The real per-image pipeline (prepare -> forward -> predict) for one image."""
    return ImagePipeline(engine).classify(data, ClassifyRequest(spec, **request))


def preparer(engine: Engine) -> ImagePreparer:
    return ImagePipeline(engine).preparer


def assert_same_top(got: list[dict[str, Any]], want: list[Any]) -> None:
    """The same classes in the same order, probabilities equal within float32 rounding: two
    requests' views may run in forwards of different sizes or on different workers (and the
    OpenVINO backend differs from torch by about 1e-6), so equal answers are not equal bits.
    ``want``: another answer's ``top`` or a local prediction's."""

    def pairs(top: list[Any]) -> list[tuple[int, float]]:
        return [(t["index"], t["prob"]) if isinstance(t, dict) else (t.index, t.prob) for t in top]

    got_pairs, want_pairs = pairs(got), pairs(want)
    assert [i for i, _ in got_pairs] == [i for i, _ in want_pairs]
    torch.testing.assert_close(
        torch.tensor([p for _, p in got_pairs]),
        torch.tensor([p for _, p in want_pairs]),
        rtol=1e-4,
        atol=1e-5,
    )
