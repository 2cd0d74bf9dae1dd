"""Views with a resolution: whole-image and multi-scale views, planned, cut and batched."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.errors import InvalidRequestError, LimitExceededError
from app.metrics import Metrics
from app.pipeline import ImagePipeline
from app.request import ClassifyRequest
from app.runtime.engine import Engine, ViewOutputs
from app.serving.batching import ViewBatcher
from app.tta.views import (
    ViewGeometry,
    full_shape,
    parse_view_spec,
    plan_image_views,
    plan_views,
)
from tests.helpers import classify, image_bytes, preparer

LITE0 = ViewGeometry(input_size=224, crop_pct=0.875, resize_size=256, stride=32)


def test_spec_grammar_takes_sizes_and_keeps_old_specs() -> None:
    spec = parse_view_spec("center, full@288, mfull@288, fixed@320:5")
    assert spec.parts == (("center", 1), ("full@288", 1), ("mfull@288", 1), ("fixed@320", 5))
    assert str(parse_view_spec(str(spec))) == str(spec)
    assert parse_view_spec("fixed:5,mfixed:5").parts == (("fixed", 5), ("mfixed", 5))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("full@0", "between"),
        ("full@9999", "between"),
        ("full@abc", "positive integer"),
        ("full@-5", "positive integer"),
        ("full:2", "at most 1"),
        ("wide@256", "unknown view kind"),
    ],
)
def test_bad_sizes_are_refused_with_a_reason(text: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        parse_view_spec(text)


def test_full_views_keep_aspect_and_round_the_long_side_to_the_stride() -> None:
    assert full_shape(640, 480, 256, 32) == (352, 256)  # 341.3 -> 352
    assert full_shape(480, 640, 288, 32) == (288, 384)
    assert full_shape(500, 500, 256, 32) == (256, 256)
    views = plan_image_views(parse_view_spec("full@256,mfull@256"), 640, 480, LITE0, seed=0)
    assert [(v.width, v.height, v.flip, v.x, v.y) for v in views] == [
        (352, 256, False, 0, 0),
        (352, 256, True, 0, 0),
    ]
    assert all(v.resized == (352, 256) for v in views)


def test_crops_at_the_model_scale_plan_what_plan_views_plans() -> None:
    spec = parse_view_spec("fixed:5,mfixed:5,random:4,mrandom:3")
    mixed = plan_image_views(spec, 640, 480, LITE0, seed=9)
    assert mixed == plan_views(spec, 341, 256, 224, seed=9)


def test_crops_at_another_scale_come_from_the_image_resized_for_them() -> None:
    views = plan_image_views(parse_view_spec("center@288,center"), 640, 480, LITE0, seed=0)
    big, small = views
    assert (big.width, big.height, big.resized) == (288, 288, (438, 329))  # 329 = 288 / 0.875
    assert (small.width, small.resized) == (224, (341, 256))


def test_mixed_shapes_give_each_view_its_own_output(tiny_engine: Engine) -> None:
    """A spec of several shapes equals its parts run apart, view by view."""
    data = image_bytes(150, 100, seed=3)
    mixed = classify(tiny_engine, data, parse_view_spec("center,full@96,mfull@96,fixed@72:2"))
    assert [v.kind for v in mixed.views] == [
        "center",
        "full@96",
        "mfull@96",
        "fixed@72",
        "fixed@72",
    ]
    prepared = preparer(tiny_engine).views(data, parse_view_spec("full@96"), 0)
    assert prepared.groups[0].batch.shape == (1, 3, 96, 160)  # 144 rounded to the stride 32
    alone = {
        text: classify(tiny_engine, data, parse_view_spec(text), level="logit")
        for text in ("center", "full@96", "mfull@96")
    }
    for i, text in enumerate(("center", "full@96", "mfull@96")):
        got, want = mixed.view_top1[i], alone[text].view_top1[0]
        assert got.index == want.index and got.prob == pytest.approx(want.prob, abs=1e-5)
    # boxes are in the uploaded image's pixels: the whole image for full views
    assert mixed.boxes[1] == [0.0, 0.0, 150.0, 100.0]


def test_pixel_budget_counts_view_equivalents(tiny_engine: Engine) -> None:
    prep = preparer(tiny_engine)
    with pytest.raises(LimitExceededError, match="pixels"):
        prep.views(image_bytes(150, 100), parse_view_spec("full@512,mfull@512"), 0, max_views=40)
    ok = prep.views(image_bytes(150, 100), parse_view_spec("full@96"), 0, max_views=40)
    assert prep.view_equivalents(ok.views) == pytest.approx(96 * 160 / 64**2)
    request = ClassifyRequest(parse_view_spec("full@512"))
    with pytest.raises(LimitExceededError):  # the pipeline applies its own budget
        ImagePipeline(tiny_engine, max_views=10).prepare(image_bytes(150, 100), request)


class ShapeRecorder:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches: list[tuple[int, tuple[int, int]]] = []

    def __call__(self, batch: torch.Tensor) -> ViewOutputs:
        self.batches.append((int(batch.shape[0]), (int(batch.shape[2]), int(batch.shape[3]))))
        return self.engine.run_views(batch)


def test_equal_shapes_share_forwards_across_requests(tiny_engine: Engine) -> None:
    """Concurrent requests of crops and whole-image views: every forward runs one shape, the
    whole-image views of all requests share forwards, and each request gets its own rows."""
    run = ShapeRecorder(tiny_engine)
    prep = preparer(tiny_engine)
    spec = parse_view_spec("center,full@64,mfull@64,fixed:3")
    prepared = [prep.views(image_bytes(150, 100, seed=i), spec, i) for i in range(4)]

    async def go() -> list[ViewOutputs]:
        b = ViewBatcher("tiny", run, max_batch_views=64, max_wait_s=0.2, max_queue_views=500,
                        metrics=Metrics(), view_pixels=64 * 64)  # fmt: skip
        b.start()
        outs = await asyncio.gather(*(b.submit(p.groups, 10) for p in prepared))
        await b.stop()
        return [o for o, _ in outs]

    outs = asyncio.run(go())
    assert all(len({shape}) == 1 for _, shape in run.batches)
    full_forwards = [n for n, shape in run.batches if shape == (64, 96)]
    assert sum(full_forwards) == 8 and len(full_forwards) < 4  # shared across requests
    for p, out in zip(prepared, outs, strict=True):
        direct = tiny_engine.run_groups(p.groups)
        torch.testing.assert_close(out.logits, direct.logits, rtol=1e-4, atol=1e-5)


def test_batch_size_is_bounded_in_pixels(tiny_engine: Engine) -> None:
    run = ShapeRecorder(tiny_engine)
    big = torch.randn(6, 3, 128, 128)  # 4 view-equivalents each at 64 px

    async def go() -> None:
        b = ViewBatcher("tiny", run, max_batch_views=8, max_wait_s=0.0, max_queue_views=100,
                        metrics=Metrics(), view_pixels=64 * 64)  # fmt: skip
        b.start()
        await b.submit(big, 10)
        await b.stop()

    asyncio.run(go())
    assert [n for n, _ in run.batches] == [2, 2, 2]


def test_auto_serves_the_policy_measured_for_the_model(tmp_path) -> None:
    from app.errors import ModelConfigError
    from app.model_config import load_model_config, write_model_config
    from app.repository import ModelRepository
    from tests.helpers import FLOAT32, make_tiny_model

    cfg = make_tiny_model(tmp_path, "tiny")
    write_model_config(cfg.with_changes(auto_views="center,full@96,mfull@96"), tmp_path / "tiny")
    engine = Engine(ModelRepository(tmp_path).load("tiny", "cpu"), FLOAT32)
    pred = classify(engine, image_bytes(150, 100), parse_view_spec("auto"), seed=0)
    assert pred.policy == "auto" and pred.spec == "center:1,full@96:1,mfull@96:1"
    text = (tmp_path / "tiny" / "model.toml").read_text()
    (tmp_path / "tiny" / "model.toml").write_text(text.replace("full@96", "full@0"))
    with pytest.raises(ModelConfigError, match="policy.auto"):
        load_model_config(tmp_path / "tiny")
