"""The CUDA paths on the tiny real model. They run wherever CUDA is present and skip on a
CPU-only machine; `python -m pytest tests/gpu -q` on a GPU host checks the device paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.fusion import fuse_for_inference
from app.runtime.plan import EngineOptions
from app.runtime.tuning.agreement import agreement, probe_batch, reference_outputs
from app.runtime.tuning.tuner import tuned_engine
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, classify, image_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

SPEC = parse_view_spec("center,fixed:5,full@96,mfull@96")


@pytest.fixture(autouse=True)
def full_float32() -> object:
    """TF32 off while comparing with float32 references: its rounding is not a bug."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def models(tiny_repo: Path) -> tuple:
    repo = ModelRepository(tiny_repo)
    return repo.load("tiny", "cpu"), repo.load("tiny", "cuda")


def test_the_cuda_engine_answers_as_the_cpu_engine_in_float32(models: tuple) -> None:
    """Decode and views on the host, normalise and forward on the device: same answer."""
    cpu, cuda = models
    on_cpu, on_gpu = Engine(cpu, FLOAT32), Engine(cuda, FLOAT32.with_changes(device="cuda"))
    assert on_gpu.device.type == "cuda" and on_gpu.chunk_views >= 32
    for seed in range(3):
        data = image_bytes(150, 100, seed=seed)
        a = classify(on_cpu, data, SPEC, level="feature", top_k=3, seed=seed)
        b = classify(on_gpu, data, SPEC, level="feature", top_k=3, seed=seed)
        torch.testing.assert_close(a.probs, b.probs, rtol=1e-3, atol=1e-4)
        assert a.boxes == b.boxes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_autocast_agrees_with_float32(models: tuple, dtype: str) -> None:
    _, cuda = models
    engine = Engine(cuda, EngineOptions(device="cuda", dtype=dtype))  # type: ignore[arg-type]
    probes = probe_batch(cuda.cfg.input_size).cuda()
    max_diff, top1, ok = agreement(reference_outputs(cuda, probes), engine.run_views(probes))
    assert ok, (dtype, max_diff, top1)


def test_the_rewrites_apply_on_cuda_at_every_shape(models: tuple) -> None:
    _, cuda = models
    fused, report = fuse_for_inference(cuda.network, cuda.cfg.input_size, torch.float32)
    assert report.applied and report.folded_norms > 0, report.describe()
    with torch.no_grad():
        for h, w in [(64, 64), (96, 160), (65, 67)]:
            x = torch.randn(2, 3, h, w, device="cuda")
            torch.testing.assert_close(fused(x), cuda.network(x), rtol=1e-3, atol=1e-3)


def test_the_tuner_picks_an_agreeing_cuda_plan(models: tuple, tmp_path: Path) -> None:
    _, cuda = models
    options = EngineOptions(device="cuda", tune=True, tune_seconds=2.0,
                            tune_cache_dir=str(tmp_path))  # fmt: skip
    engine = tuned_engine(cuda, options)
    assert engine.device.type == "cuda" and engine.tuning is not None
    chosen = engine.tuning.chosen
    assert chosen.dtype in ("float32", "float16", "bfloat16") and chosen.chunk_views >= 32
