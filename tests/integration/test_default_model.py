"""The embedded default model on the 100 real labelled photos."""

from __future__ import annotations

import pytest

from app.runtime.engine import Engine
from app.runtime.plan import EngineOptions
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, classify


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_center_crop_top1_on_real_photos(lite0_engine: Engine, samples, dtype: str) -> None:
    """A wrong key mapping, mean/std or padding variant drops this far below 85 %; the
    ``auto`` dtype (bfloat16 on CPUs with native bf16) must hold the same line."""
    engine = Engine(lite0_engine.model, EngineOptions(dtype=dtype))
    center = parse_view_spec("center")
    hits = 0
    for path in samples:
        pred = classify(engine, path.read_bytes(), center, top_k=1)
        hits += pred.top[0].synset == path.name.split("_")[0]
    assert hits / len(samples) >= 0.85, f"top-1 {hits}/{len(samples)} ({engine.dtype_name})"


@pytest.mark.slow
def test_auto_dtype_follows_the_cpu(lite0_engine: Engine) -> None:
    from app.runtime.machine import cpu_has_native_bf16

    engine = Engine(lite0_engine.model, EngineOptions(dtype="auto"))
    assert engine.dtype_name == ("bfloat16" if cpu_has_native_bf16() else "float32")


@pytest.mark.slow
def test_fused_network_predicts_as_the_original_on_real_photos(samples) -> None:
    """Folded batch norms and static SAME padding are a rewrite, not an approximation:
    in float32 every photo keeps its top-1 and its probabilities to rounding."""
    from app.config import default_models_dir
    from app.repository import ModelRepository

    model = ModelRepository(default_models_dir()).load("tf_efficientnet_lite0", "cpu")
    fused, plain = Engine(model, FLOAT32), Engine(model, FLOAT32.with_changes(fuse=False))
    assert fused.fusion is not None and fused.fusion.applied
    assert (fused.fusion.folded_norms, fused.fusion.static_pads) == (49, 5)
    # ReLU6 after 33 of the 49 norms; the projection convolutions have no activation
    from app.runtime.fusion import pointwise_available

    assert fused.fusion.fused_activations == (33 if pointwise_available(model.device) else 0)
    center, ten = parse_view_spec("center"), parse_view_spec("fixed:5,mfixed:5")
    for i, path in enumerate(samples):
        data, spec = path.read_bytes(), ten if i % 10 == 0 else center
        a, b = classify(fused, data, spec, seed=i), classify(plain, data, spec, seed=i)
        assert a.top[0].index == b.top[0].index, path.name
        assert float((a.probs - b.probs).abs().max()) < 1e-4, path.name
