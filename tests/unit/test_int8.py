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
from app.runtime.tuning.report import Trial, TuningReport
from app.runtime.tuning.tuner import tuned_engine
from tests.helpers import make_image_folder, make_tiny_model

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None,
        reason="nncf and openvino are not installed (pip install -e '.[openvino]')",
    ),
    pytest.mark.skipif(not cpu_has_int8(), reason="this CPU has no int8 units (VNNI or AMX)"),
]


def _int8_trials(engine: Engine) -> list[Trial]:
    report = engine.tuning
    assert isinstance(report, TuningReport)
    return [t for t in report.trials if t.plan.dtype == "int8"]


def _int8_trial(engine: Engine) -> Trial:
    (trial,) = _int8_trials(engine)[:1]
    return trial


def test_forced_int8_without_a_quantized_model_is_a_clear_error(tmp_path: Path) -> None:
    from app.errors import BackendUnavailableError

    make_tiny_model(tmp_path / "models", "tiny")
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    assert "midserve quantize" in (int8_missing(model) or "")
    with pytest.raises(BackendUnavailableError, match="int8"):
        Engine(model, EngineOptions(dtype="int8", tune=False))


@pytest.mark.slow
def test_quantized_default_model_agrees_on_real_photos_and_the_tuner_follows_its_policy_score(
    tmp_path: Path,
) -> None:
    """The embedded default model quantized on one half of the sample photos: it keeps
    float32's answers view by view on the other half; the served policy is scored in int8
    and in the float path on that half, and the tuner times int8 exactly when it lost at
    most MAX_PHOTOS_LOST photos there."""
    import shutil

    from app.jobs.quantize.run import quantize
    from app.runtime.int8 import MAX_PHOTOS_LOST
    from tests.helpers import DEFAULT_MODEL, SAMPLES_DIR, SAMPLES_MISSING, copy_default_model

    if not SAMPLES_DIR.is_dir():
        pytest.skip(SAMPLES_MISSING)
    models = tmp_path / "models"
    copy_default_model(models, ignore=shutil.ignore_patterns("int8"))
    report = quantize(models, DEFAULT_MODEL, SAMPLES_DIR, 600, 0)
    assert report["agrees"], report
    top1 = report["top1"]
    assert abs(top1["int8"]["top1"] - top1["float32"]["top1"]) <= 2 / top1["int8"]["n"]
    served = report["served_policy"]
    assert served["n"] == top1["int8"]["n"] and set(served["top1"]) == {"int8", served["baseline"]}
    model = ModelRepository(models).load(DEFAULT_MODEL, "cpu")
    options = EngineOptions(tune=True, tune_seconds=5.0, tune_cache_dir=tmp_path / "cache")
    engine = tuned_engine(model, options)
    trials = _int8_trials(engine)
    if served["broken"] - served["fixed"] > MAX_PHOTOS_LOST:
        assert not trials and engine.plan.dtype != "int8"
    else:
        assert trials and trials[0].status == "measured" and trials[0].views_per_s


def test_int8_calibrated_on_blank_views_is_rejected(tmp_path: Path) -> None:
    """Calibrated on flat grey views, the quantizer's activation ranges are far too narrow:
    a real int8 network that answers differently on the held-out views, however fast."""
    import dataclasses

    from app.jobs.quantize.run import split_views, write_int8

    make_tiny_model(tmp_path / "models", "tiny")
    photos = make_image_folder(tmp_path / "photos", classes=4, per_class=10, size=(96, 80))
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    from app.jobs.quantize.run import photos as read_photos

    split = split_views(model, read_photos(photos, model, 600), 0)
    blank = [torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)] * 8
    report = write_int8(model, dataclasses.replace(split, calibration=blank))
    assert not report["agrees"]
    options = EngineOptions(tune=True, tune_seconds=0.5, tune_cache_dir=tmp_path / "cache")
    engine = tuned_engine(model, options)
    trial = _int8_trial(engine)
    assert trial.status == "rejected: disagrees with float32 on real views", trial.status
    assert trial.views_per_s is None and engine.plan.dtype != "int8"


def test_the_convolution_reading_the_pixels_stays_float_and_the_rest_is_int8(
    tmp_path: Path,
) -> None:
    """The stem's input is the network's largest rounding in int8: the job leaves that
    convolution in float, records it, and quantizes every other convolution."""
    import json

    import openvino as ov

    from app.jobs.quantize.run import photos as read_photos
    from app.jobs.quantize.run import split_views, write_int8
    from app.runtime.int8 import int8_folder

    make_tiny_model(tmp_path / "models", "tiny")
    photos = make_image_folder(tmp_path / "photos", classes=4, per_class=10, size=(96, 80))
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    report = write_int8(model, split_views(model, read_photos(photos, model, 600), 0))
    folder = int8_folder(model)
    assert folder is not None
    assert json.loads((folder / "int8.json").read_text())["float_layers"] == report["float_layers"]
    network = ov.Core().read_model(folder / "model.xml")
    convolutions = [op for op in network.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "GroupConvolution")]  # fmt: skip
    fed_by_fake_quantize = {
        op.get_friendly_name(): op.input_value(0).get_node().get_type_name() == "FakeQuantize"
        for op in convolutions
    }
    assert report["float_layers"] == [convolutions[0].get_friendly_name()]
    assert not fed_by_fake_quantize[report["float_layers"][0]]
    others = [v for k, v in fed_by_fake_quantize.items() if k not in report["float_layers"]]
    assert others and all(others)


def test_int8_that_loses_photos_with_the_served_policy_is_not_offered(tmp_path: Path) -> None:
    """A quantized network that agrees view by view, but whose served policy (gate included)
    answered more held-out photos wrongly than the float path: not a tuning candidate."""
    import json

    from app.jobs.quantize.run import photos as read_photos
    from app.jobs.quantize.run import split_views, write_int8, write_meta
    from app.runtime.int8 import MAX_PHOTOS_LOST, int8_folder, int8_not_offered

    make_tiny_model(tmp_path / "models", "tiny")
    photos = make_image_folder(tmp_path / "photos", classes=4, per_class=10, size=(96, 80))
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    report = write_int8(model, split_views(model, read_photos(photos, model, 600), 0))
    folder = int8_folder(model)
    assert folder is not None and (folder / "check_whole.npz").is_file()
    lost = MAX_PHOTOS_LOST + 1
    report["served_policy"] = {"policy": "center", "n": 20, "fixed": 1, "broken": 1 + lost}
    write_meta(folder, report)
    assert json.loads((folder / "int8.json").read_text())["served_policy"]["broken"] == 1 + lost
    why = int8_not_offered(model) or ""
    assert f"answered {lost} more of 20 held-out photos wrongly" in why
    assert int8_missing(model) is None  # forced, it still runs: the operator's choice
    options = EngineOptions(tune=True, tune_seconds=0.5, tune_cache_dir=tmp_path / "cache")
    engine = tuned_engine(model, options)
    assert engine.plan.dtype != "int8" and not _int8_trials(engine)


def test_quantize_json_report_is_all_of_stdout_and_says_whether_int8_is_offered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quantizer draws progress bars; with --json, stdout still parses as one report
    (a script reads it), and the report says what the tuner will do with the result."""
    import json

    from app.cli import main

    make_tiny_model(tmp_path / "models", "tiny")
    photos = make_image_folder(tmp_path / "photos", classes=4, per_class=10, size=(96, 80))
    argv = ["quantize", "--model", "tiny", "--models-dir", str(tmp_path / "models"),
            "--images", str(photos), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_images"] > 0 and "served_policy" in report
    model = ModelRepository(tmp_path / "models").load("tiny", "cpu")
    from app.runtime.int8 import int8_not_offered

    assert report["not_offered"] == int8_not_offered(model)
