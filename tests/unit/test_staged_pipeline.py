"""Staged policies through the real pipeline on the tiny model: the gate, the answer, and
calibration, against one-shot runs of the same views; cascades (a later stage on a second
tiny model) against each model's own answers."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import pytest
import torch

from app.answers import StagedAnswers
from app.local_pipeline import local_pipeline
from app.pipeline import ImagePipeline, Prediction
from app.repository import ModelRepository
from app.request import ClassifyRequest, Level
from app.runtime.cost import gflops_per_view
from app.runtime.engine import Engine, ViewOutputs
from app.tta.calibration import calibrate
from app.tta.stages import parse_policy
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, image_bytes, make_tiny_model

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


@pytest.mark.parametrize("level", ["softmax", "logit", "feature"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_one_views_top1_is_its_own_uncalibrated_softmax(
    tiny_engine: Engine, level: Level, temperature: float
) -> None:
    """One view's own top-1 (which the answer shares when uncalibrated, and predict then
    takes from the answer) is its softmax's largest probability, whatever the calibration."""
    cfg = tiny_engine.cfg.with_changes(calibration={f"center:1@{level}": temperature})
    engine = Engine(dataclasses.replace(tiny_engine.model, cfg=cfg), tiny_engine.options)
    pipeline = ImagePipeline(engine)
    request = ClassifyRequest(parse_view_spec("center"), level, top_k=3, seed=0)
    prepared = pipeline.prepare(IMAGES[4], request)
    outputs = engine.run_groups(prepared.groups)
    pred = pipeline.predict(prepared, [outputs], request, 0.0, 0.0)
    p, i = torch.softmax(outputs.logits.float(), dim=-1).max(dim=-1)
    assert pred.temperature == temperature
    assert [(v.index, v.prob) for v in pred.view_top1] == [(int(i), pytest.approx(float(p)))]
    assert pred.agreement == (1.0 if int(i) == pred.top[0].index else 0.0)


# -- cascades -----------------------------------------------------------------------------
C, D = 10, 6


def _outputs(n: int, seed: int) -> ViewOutputs:
    g = torch.Generator().manual_seed(seed)
    return ViewOutputs(torch.randn(n, D, generator=g), 2 * torch.randn(n, C, generator=g))


def _head(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(D, C)


def test_staged_answers_average_each_model_then_weigh_the_models_by_views() -> None:
    policy = parse_policy("center,fixed:2|margin<1|m2:full,mfull")
    own, other = _outputs(3, 0), _outputs(2, 1)  # stage 1 on the requested model, 2 on m2
    heads = {None: _head(0), "m2": _head(1)}
    answers = {
        level: StagedAnswers(policy, level, heads, {}) for level in ("softmax", "logit", "feature")
    }
    with torch.no_grad():
        probs, temperature = answers["softmax"].answer([own, other], 2)
        every = torch.softmax(torch.cat([own.logits, other.logits]), dim=-1).mean(0)
        assert torch.allclose(probs, every, atol=1e-6) and temperature == 1.0
        probs, _ = answers["logit"].answer([own, other], 2)
        per_model = [torch.softmax(o.logits.mean(0), dim=-1) for o in (own, other)]
        assert torch.allclose(probs, (3 * per_model[0] + 2 * per_model[1]) / 5, atol=1e-6)
        probs, _ = answers["feature"].answer([own, other], 2)
        pooled = [
            torch.softmax(h(o.features.mean(0)), dim=-1)
            for h, o in ((heads[None], own), (heads["m2"], other))
        ]
        assert torch.allclose(probs, (3 * pooled[0] + 2 * pooled[1]) / 5, atol=1e-6)
        # after the first stage: the requested model's views alone
        first, _ = answers["logit"].answer([own], 1)
        assert torch.allclose(first, per_model[0], atol=1e-6)


def test_staged_answers_of_a_cascade_answer_last_gate_and_calibrate() -> None:
    own, other = _outputs(1, 2), _outputs(2, 3)
    heads = {None: _head(0), "m2": _head(1)}
    last = StagedAnswers(parse_policy("center|margin<1|m2:full,mfull|last"), "softmax", heads, {})
    probs, _ = last.answer([own, other], 2)
    assert torch.allclose(probs, torch.softmax(other.logits, dim=-1).mean(0), atol=1e-6)
    # the requested model's temperature for the views averaged, a later stage's keyed
    # with its model; another model's own calibration does not apply
    policy = parse_policy("center|prob<1|m2:full,mfull")
    key = "center:1,m2:full:1,mfull:1@softmax"
    calibrated = StagedAnswers(policy, "softmax", heads, {key: 0.5})
    plain = StagedAnswers(policy, "softmax", heads, {})
    probs, temperature = calibrated.answer([own, other], 2)
    assert temperature == 0.5
    assert torch.allclose(probs, calibrate(plain.answer([own, other], 2)[0], 0.5), atol=1e-6)
    # the gate before stage 2 sees the requested model's answer alone; agreement counts
    # every view run so far, of every model
    record = plain.gate([own], 1)
    assert record.value == pytest.approx(float(torch.softmax(own.logits[0], dim=-1).max()))
    assert record.went_on
    agree = StagedAnswers(
        parse_policy("center|prob<1|m2:full,mfull|agree<0.9|fixed:2"), "softmax", heads, {}
    )
    answer, _ = agree.answer([own, other], 2)
    views_top1 = torch.cat([own.logits, other.logits]).argmax(-1)
    expected = float((views_top1 == answer.argmax()).float().mean())
    assert agree.gate([own, other], 2).value == pytest.approx(expected)
    stopped = StagedAnswers(parse_policy("center|prob<0|m2:full"), "softmax", heads, {})
    assert stopped.stages_to_run([own, other]) == 1


@pytest.fixture(scope="module")
def cascade_repo(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny; tiny2: other input size, crop_pct, interpolation and weights, same classes;
    tiny3: tiny's interpolation (its resized copies are shared with tiny's), other sizes."""
    root = tmp_path_factory.mktemp("cascade-models")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    make_tiny_model(root, "tiny2", input_size=80, crop_pct=0.875, seed=1, interpolation="bicubic")
    make_tiny_model(root, "tiny3", input_size=72, crop_pct=0.9, seed=2)
    return root


@functools.cache
def _engine(repo: Path, name: str) -> Engine:
    return Engine(ModelRepository(repo).load(name, "cpu"), FLOAT32)


@functools.cache
def _cascading(repo: Path) -> ImagePipeline:
    """tiny's pipeline, a cascade's later-stage models loaded from the repository on use."""
    options = FLOAT32.with_changes(tune=False, warmup=False)
    return local_pipeline(ModelRepository(repo), _engine(repo, "tiny"), options)


def _cascade(repo: Path, data: bytes, views: str, level: Level = "softmax") -> Prediction:
    request = ClassifyRequest(parse_policy(views), level, top_k=3, seed=3)
    return _cascading(repo).classify(data, request)


def _alone(repo: Path, name: str, data: bytes, views: str, level: Level = "softmax") -> Prediction:
    request = ClassifyRequest(parse_view_spec(views), level, top_k=3, seed=3)
    return ImagePipeline(_engine(repo, name)).classify(data, request)


@pytest.mark.parametrize("other", ["tiny2", "tiny3"])
def test_a_cascades_last_stage_answers_as_its_model_alone(cascade_repo: Path, other: str) -> None:
    for data in IMAGES[5:7]:
        last = _cascade(cascade_repo, data, f"center|margin<1|{other}:fixed:2,full|last")
        own = _alone(cascade_repo, other, data, "fixed:2,full")
        assert last.answered_by == [other] and last.views[1:] == own.views
        assert torch.allclose(last.probs, own.probs, atol=1e-6)


def test_a_cascade_answers_from_each_models_own_views(cascade_repo: Path) -> None:
    data = IMAGES[4]
    last = _cascade(cascade_repo, data, "center|margin<1|tiny2:center|last")
    own = _alone(cascade_repo, "tiny2", data, "center")
    assert last.answered_by == ["tiny2"] and last.views[1] == own.views[0]
    assert torch.allclose(last.probs, own.probs, atol=1e-6)
    levels: tuple[Level, ...] = ("softmax", "logit")
    for level in levels:
        both = _cascade(cascade_repo, data, "center|margin<1|tiny2:full,mfull|margin<1|full", level)
        first = _alone(cascade_repo, "tiny", data, "center,full", level)
        second = _alone(cascade_repo, "tiny2", data, "full,mfull", level)
        assert both.answered_by == ["tiny", "tiny2"]
        assert [s.model for s in both.stages or []] == ["tiny", "tiny2", "tiny"]
        assert torch.allclose(both.probs, (2 * first.probs + 2 * second.probs) / 4, atol=1e-6)
    # compute in tiny's views: tiny2's own pixels times its FLOPs per view over tiny's
    configs = ModelRepository(cascade_repo)
    ratio = gflops_per_view(configs.config("tiny2")) / gflops_per_view(configs.config("tiny"))
    assert ratio > 1  # 80 px views of a network alike cost more than 64 px ones
    assert last.stages is not None
    assert last.stages[1].view_equivalents == pytest.approx(own.view_equivalents * ratio, abs=1e-4)
    assert last.view_equivalents == pytest.approx(1.0 + own.view_equivalents * ratio, abs=1e-4)
