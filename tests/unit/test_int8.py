"""int8 on the tiny real model: quantized by the job, offered to the tuner only where it
agrees with float32 on real held-out views, rejected where its calibration was wrong."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.int8 import int8_missing
from app.runtime.machine import cpu_has_int8
from app.runtime.plan import EngineOptions
from app.runtime.tuning.report import TuningReport
from app.runtime.tuning.tuner import tuned_engine
from tests.helpers import make_image_folder, make_tiny_model

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None,
        reason="nncf and openvino are not installed (pip install -e '.[openvino]')",
    ),
    pytest.mark.skipif(not cpu_has_int8(), reason="this CPU has no int8 units (VNNI or AMX)"),
]


def _int8_trial(engine: Engine):
    report = engine.tuning
    assert isinstance(report, TuningReport)
    (trial,) = [t for t in report.trials if t.plan.dtype == "int8"][:1]
    return trial


def test_forced_int8_without_a_quantized_model_is_a_clear_error(tmp_path: Path) -> None:
    from app.errors import BackendUnavailableError

    make_tiny_model(tmp_path / "models", "tiny")
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    assert "midserve quantize" in (int8_missing(model) or "")
    with pytest.raises(BackendUnavailableError, match="int8"):
        Engine(model, EngineOptions(dtype="int8", tune=False))


@pytest.mark.slow
def test_quantized_default_model_agrees_on_real_photos_and_is_offered(tmp_path: Path) -> None:
    """The embedded default model quantized on one half of the sample photos: it keeps
    float32's answers on the other half, and the tuner times it as a candidate."""
    import shutil

    from app.config import default_models_dir
    from app.jobs.quantize.run import quantize
    from tests.helpers import DEFAULT_MODEL, SAMPLES_DIR, SAMPLES_MISSING

    if not SAMPLES_DIR.is_dir():
        pytest.skip(SAMPLES_MISSING)
    models = tmp_path / "models"
    shutil.copytree(default_models_dir() / DEFAULT_MODEL, models / DEFAULT_MODEL,
                    ignore=shutil.ignore_patterns("int8"))  # fmt: skip
    report = quantize(models, DEFAULT_MODEL, SAMPLES_DIR, 600, 0)
    assert report["agrees"], report
    top1 = report["top1"]
    assert abs(top1["int8"]["top1"] - top1["float32"]["top1"]) <= 2 / top1["int8"]["n"]
    model = ModelRepository(models).load(DEFAULT_MODEL, "cpu")
    options = EngineOptions(tune=True, tune_seconds=5.0, tune_cache_dir=tmp_path / "cache")
    trial = _int8_trial(tuned_engine(model, options))
    assert trial.status == "measured" and trial.views_per_s, trial.status


def test_int8_calibrated_on_blank_views_is_rejected(tmp_path: Path) -> None:
    """Calibrated on flat grey views, the quantizer's activation ranges are far too narrow:
    a real int8 network that answers differently on the held-out views, however fast."""
    from app.jobs.quantize.run import split_views, write_int8

    make_tiny_model(tmp_path / "models", "tiny")
    photos = make_image_folder(tmp_path / "photos", classes=4, per_class=10, size=(96, 80))
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    from app.jobs.quantize.run import photos as read_photos

    _, check, targets = split_views(model, read_photos(photos, model, 600), 0)
    blank = [torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)] * 8
    report = write_int8(model, blank, check, targets)
    assert not report["agrees"]
    options = EngineOptions(tune=True, tune_seconds=0.5, tune_cache_dir=tmp_path / "cache")
    engine = tuned_engine(model, options)
    trial = _int8_trial(engine)
    assert trial.status == "rejected: disagrees with float32 on real views", trial.status
    assert trial.views_per_s is None and engine.plan.dtype != "int8"
