"""The embedded default model on the 100 real labelled photos."""

from __future__ import annotations

import pytest

from app.engine import Engine
from app.tta.views import parse_view_spec


@pytest.mark.slow
def test_center_crop_top1_on_real_photos(lite0_engine: Engine, samples) -> None:
    """A wrong key mapping, mean/std or padding variant drops this far below 85 %."""
    center = parse_view_spec("center")
    hits = 0
    for path in samples:
        pred = lite0_engine.classify(path.read_bytes(), center, top_k=1)
        hits += pred.top[0].synset == path.name.split("_")[0]
    assert hits / len(samples) >= 0.85, f"top-1 {hits}/{len(samples)}"
