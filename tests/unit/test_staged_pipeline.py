"""Staged policies through the real pipeline on the tiny model: the gate, the answer, and
calibration, against one-shot runs of the same views."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from app.pipeline import ImagePipeline
from app.request import ClassifyRequest
from app.runtime.engine import Engine
from app.tta.calibration import calibrate
from app.tta.stages import parse_policy
from app.tta.views import parse_view_spec
from tests.helpers import image_bytes

SECOND = "full@96,mfull@96"
IMAGES = [image_bytes(90 + 7 * i, 70 + 5 * i, seed=i) for i in range(8)]


def _run(engine: Engine, data: bytes, views: str, seed: int = 3):  # noqa: ANN202
    policy = parse_policy(views)
    spec = policy if policy.staged else policy.first
    return ImagePipeline(engine).classify(data, ClassifyRequest(spec, top_k=3, seed=seed))


def _signals(engine: Engine, signal: str) -> list[float]:
    """Each image's stage-1 gate signal, with a threshold that lets every image go on."""
    out = []
    for data in IMAGES:
        pred = _run(engine, data, f"center|{signal}<1|{SECOND}")
        assert pred.stages is not None and pred.stages[1].ran
        out.append(pred.stages[1].signal)
    return out


@pytest.mark.parametrize("signal", ["prob", "margin"])
def test_the_gate_sends_on_exactly_the_images_below_its_threshold(
    tiny_engine: Engine, signal: str
) -> None:
    values = sorted(set(_signals(tiny_engine, signal)))
    assert len(values) >= 3, "the photos should not all look alike to the model"
    mid = len(values) // 2
    threshold = round((values[mid - 1] + values[mid]) / 2, 6)
    assert values[mid - 1] < threshold < values[mid]
    went_on = 0
    for data, value in zip(IMAGES, _signals(tiny_engine, signal), strict=True):
        pred = _run(tiny_engine, data, f"center|{signal}<{threshold}|{SECOND}")
        assert pred.stages is not None
        assert pred.stages[1].ran == (value < threshold)
        assert len(pred.views) == (3 if value < threshold else 1)
        went_on += pred.stages[1].ran
    assert 0 < went_on < len(IMAGES)


def test_a_stopped_image_answers_as_its_first_stage_alone(tiny_engine: Engine) -> None:
    staged = _run(tiny_engine, IMAGES[0], f"center|margin<0|{SECOND}")  # nothing goes on
    alone = _run(tiny_engine, IMAGES[0], "center")
    assert staged.stages is not None and not staged.stages[1].ran
    assert torch.equal(staged.probs, alone.probs)
    assert staged.view_equivalents == alone.view_equivalents == 1.0


def test_a_second_stage_answers_as_a_one_shot_run_of_the_same_views(tiny_engine: Engine) -> None:
    for data in IMAGES[:3]:
        staged = _run(tiny_engine, data, f"center,random:2|margin<1|{SECOND},mrandom:1")
        joined = _run(tiny_engine, data, f"center,random:2,{SECOND},mrandom:1")
        assert staged.views == joined.views  # one plan, the same random positions
        assert torch.allclose(staged.probs, joined.probs, atol=1e-6)
        assert staged.spec == "center:1,random:2|margin<1|full@96:1,mfull@96:1,mrandom:1"
        last = _run(tiny_engine, data, f"center|margin<1|{SECOND}|last")
        second = _run(tiny_engine, data, SECOND)
        assert torch.allclose(last.probs, second.probs, atol=1e-6)
        assert len(last.views) == 3  # the center ran, but only the last stage answers


def test_the_models_temperature_for_the_views_averaged_is_applied(tiny_engine: Engine) -> None:
    plain = _run(tiny_engine, IMAGES[1], "center")
    cfg = tiny_engine.cfg.with_changes(calibration={"center:1@softmax": 0.5})
    model = dataclasses.replace(tiny_engine.model, cfg=cfg)
    calibrated_engine = Engine(model, tiny_engine.options)
    calibrated = _run(calibrated_engine, IMAGES[1], "center")
    assert calibrated.temperature == 0.5 and plain.temperature == 1.0
    assert torch.allclose(calibrated.probs, calibrate(plain.probs, 0.5), atol=1e-6)
    other = _run(calibrated_engine, IMAGES[1], "fixed:5")  # no temperature for these views
    assert other.temperature == 1.0


def test_agreement_is_the_share_of_views_whose_top1_is_the_answer(tiny_engine: Engine) -> None:
    pred = _run(tiny_engine, IMAGES[2], "fixed:5,mfixed:5")
    answer = pred.top[0].index
    assert pred.agreement == pytest.approx(sum(v.index == answer for v in pred.view_top1) / 10)
    assert pred.view_equivalents == 10.0
    assert str(parse_view_spec("fixed:5,mfixed:5")) == pred.spec and pred.stages is None
