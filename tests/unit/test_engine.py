from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from timm.data import create_transform

from app.api.results import image_result
from app.errors import InvalidRequestError
from app.model_config import ModelConfig
from app.runtime.engine import Engine
from app.tta.views import default_policy, parse_view_spec
from tests.helpers import FLOAT32, classify, image_bytes


def timm_eval_logits(engine: Engine, data: bytes) -> torch.Tensor:
    """What a user gets from timm's own eval transform for the same model config."""
    cfg: ModelConfig = engine.cfg
    transform = create_transform(
        input_size=(3, cfg.input_size, cfg.input_size),
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        is_training=False,
    )
    x = transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        return engine.model.network(x.contiguous(memory_format=torch.channels_last))[0]


@pytest.mark.parametrize(("w", "h"), [(150, 100), (77, 203), (64, 64)])
def test_center_view_equals_timm_eval_transform(tiny_engine: Engine, w: int, h: int) -> None:
    """The same answer as timm's PIL transform; the served resize is torch's, PIL's pixels
    within rounding, which on a noise image moves the tiny model's log-probabilities by
    up to about 0.01."""
    data = image_bytes(w, h, seed=w)
    pred = classify(tiny_engine, data, parse_view_spec("center"), level="logit", top_k=10)
    ours = torch.log(pred.probs)
    theirs = torch.log_softmax(timm_eval_logits(tiny_engine, data), dim=-1)
    assert int(ours.argmax()) == int(theirs.argmax())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02)


@pytest.mark.slow  # the real lite0 weights
def test_center_view_equals_timm_for_the_default_model(lite0_engine: Engine, samples) -> None:
    data = samples[3].read_bytes()
    pred = classify(lite0_engine, data, parse_view_spec("center"), level="logit", top_k=5)
    theirs = torch.softmax(timm_eval_logits(lite0_engine, data), dim=-1)
    assert int(pred.probs.argmax()) == int(theirs.argmax())
    torch.testing.assert_close(pred.probs, theirs, rtol=0, atol=1e-3)  # resize rounding


def test_chunking_does_not_change_results(tiny_repo) -> None:
    from app.repository import ModelRepository

    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    data = image_bytes(130, 90, seed=2)
    spec = default_policy(23)
    whole = classify(
        Engine(model, FLOAT32.with_changes(chunk_views=64)), data, spec, top_k=3, seed=5
    )
    chunked = classify(
        Engine(model, FLOAT32.with_changes(chunk_views=4)), data, spec, top_k=3, seed=5
    )
    torch.testing.assert_close(whole.probs, chunked.probs, rtol=1e-5, atol=1e-6)
    assert whole.boxes == chunked.boxes


def test_prediction_reports_views_boxes_and_seed(tiny_engine: Engine) -> None:
    data = image_bytes(200, 100, seed=9)
    pred = classify(tiny_engine, data, parse_view_spec("fixed:5,random:3"), top_k=3)
    again = classify(
        tiny_engine, data, parse_view_spec("fixed:5,random:3"), top_k=3, seed=pred.seed
    )
    assert pred.boxes == again.boxes and torch.equal(pred.probs, again.probs)
    body = image_result(pred)
    assert body["views"] == 8 and len(body["view_boxes"]) == 8 and len(body["view_top1"]) == 8
    assert len(body["top"]) == 3
    probs = [t["prob"] for t in body["top"]]
    assert probs == sorted(probs, reverse=True)
    # boxes are in the uploaded image's coordinates: inside 200 x 100, and square there
    for vb in body["view_boxes"]:
        x0, y0, x1, y1 = vb["box"]
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
        assert abs((x1 - x0) - (y1 - y0)) < 0.5
    assert set(body["timings_ms"]) == {
        "decode",
        "preprocess",
        "queue_wait",
        "forward",
        "postprocess",
    }


def test_bad_parameters_are_domain_errors(tiny_engine: Engine) -> None:
    data = image_bytes()
    with pytest.raises(InvalidRequestError, match="level"):
        classify(tiny_engine, data, parse_view_spec("center"), level="median")
    with pytest.raises(InvalidRequestError, match="top_k"):
        classify(tiny_engine, data, parse_view_spec("center"), top_k=0)
    with pytest.raises(InvalidRequestError, match="top_k"):
        classify(tiny_engine, data, parse_view_spec("center"), top_k=11)


@pytest.mark.slow
def test_compiled_forward_pads_partial_chunks_and_matches_eager(tiny_repo) -> None:
    from app.repository import ModelRepository

    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    eager = Engine(model, FLOAT32.with_changes(chunk_views=4))
    compiled = Engine(model, FLOAT32.with_changes(chunk_views=4, compile=True))
    batch = torch.randn(7, 3, 64, 64)  # one full chunk of 4, one partial of 3 (padded)
    a, b = eager.run_views(batch), compiled.run_views(batch)
    assert b.logits.shape == (7, 10) and b.features.shape == a.features.shape
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
