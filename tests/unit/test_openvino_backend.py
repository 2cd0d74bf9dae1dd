"""The OpenVINO backend on the tiny real model: same outputs as torch, any view shape."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.plan import EngineOptions
from app.runtime.tuning.agreement import agreement, probe_batch, reference_outputs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed (pip install -e '.[openvino]')",
)


def test_openvino_float32_matches_torch_at_any_shape(tiny_repo: Path, tmp_path: Path) -> None:
    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    options = EngineOptions(dtype="float32", tune_cache_dir=tmp_path)
    plan = dataclasses.replace(options.forward_plan("cpu"), backend="openvino")
    engine = Engine(model, options, plan)
    assert engine.plan.backend == "openvino" and engine.fusion is None
    probes = probe_batch(model.cfg.input_size)
    _, top1, ok = agreement(reference_outputs(model, probes), engine.run_views(probes))
    assert ok and top1 == 1.0
    wide = torch.randn(3, 3, 64, 96)  # a whole-image view: another shape, no new conversion
    out, ref = engine.run_views(wide), reference_outputs(model, wide)
    assert torch.allclose(out.logits, ref.logits, atol=1e-3)
    assert list(tmp_path.glob("openvino/*.xml"))  # converted once, kept for the next load
    again = Engine(model, options, plan)
    assert torch.allclose(again.run_views(wide).logits, out.logits)


def test_uint8_views_are_normalised_in_the_openvino_graph(tiny_repo: Path, tmp_path: Path) -> None:
    """Served views arrive as uint8 NHWC: OpenVINO normalises them in its own graph and
    computes what torch computes on the same pixels."""
    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    options = EngineOptions(dtype="float32", tune_cache_dir=tmp_path)
    ov_engine = Engine(
        model, options, dataclasses.replace(options.forward_plan("cpu"), backend="openvino")
    )
    torch_engine = Engine(model, options.with_changes(fuse=False))
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (4, 64, 80, 3), dtype=torch.uint8, generator=g).permute(
        0, 3, 1, 2
    )
    a, b = ov_engine.run_views(pixels), torch_engine.run_views(pixels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-3, rtol=1e-3)
    mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.cfg.std).view(1, 3, 1, 1) * 255
    floats = ov_engine.run_views((pixels.float() - mean) / std)  # the float input, same answer
    torch.testing.assert_close(floats.logits, a.logits, atol=1e-3, rtol=1e-3)
