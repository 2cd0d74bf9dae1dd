from __future__ import annotations

import torch

from app.runtime.engine import Engine
from app.tta.averaging import average_probabilities
from app.tta.views import parse_view_spec
from tests.helpers import image_bytes, preparer


@torch.no_grad()
def test_levels_match_their_definitions(tiny_engine: Engine) -> None:
    image = preparer(tiny_engine).image(image_bytes(150, 100, seed=4))[0]
    views, _, _ = preparer(tiny_engine).plan(
        image, parse_view_spec("fixed:5,random:6,mrandom:6"), 11
    )
    from app.tta.preprocess import cut_views

    out = tiny_engine.run_views(cut_views(image, views))
    head = tiny_engine.model.head
    feature = average_probabilities(out.features, out.logits, head, "feature")
    logit = average_probabilities(out.features, out.logits, head, "logit")
    softmax = average_probabilities(out.features, out.logits, head, "softmax")
    # a linear head commutes with the mean: feature == logit averaging
    torch.testing.assert_close(feature, logit, rtol=1e-5, atol=1e-6)
    per_view = torch.softmax(out.logits, dim=-1)
    torch.testing.assert_close(softmax, per_view.mean(0))
    assert not torch.allclose(softmax, logit)  # the levels are really different
    for p in (feature, logit, softmax):
        assert abs(float(p.sum()) - 1.0) < 1e-5
