"""Batch-norm sets per resolution: written, loaded strictly, selected by view resolution."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.errors import ModelLoadError, WeightsMismatchError
from app.repository import ModelRepository
from app.runtime.bn_sets import bn_state, nearest_resolution, with_bn_set, write_bn_set
from app.runtime.engine import Engine
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, classify, image_bytes, make_tiny_model


def _recalibrated(network: torch.nn.Module, size: int) -> torch.nn.Module:
    """Batch-norm statistics re-estimated on noise at another resolution (label-free)."""
    out = copy.deepcopy(network)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        out.train()
        out(2.0 * torch.randn(8, 3, size, size) + 0.3)
    return out.eval()


@pytest.fixture()
def repo_with_set(tmp_path: Path) -> Path:
    cfg = make_tiny_model(tmp_path, "tiny")
    model = ModelRepository(tmp_path).load("tiny", "cpu")
    write_bn_set(cfg.with_changes(folder=tmp_path / "tiny"), _recalibrated(model.network, 96), 96)
    return tmp_path


def test_a_set_is_listed_and_selected_by_the_views_resolution(repo_with_set: Path) -> None:
    model = ModelRepository(repo_with_set).load("tiny", "cpu")
    assert model.cfg.bn_sets == {96: "bn/96.safetensors"}
    engine = Engine(model, FLOAT32)
    assert engine.bn_sets == [96]
    assert engine.variant_for(64, 64) is engine.model
    assert engine.variant_for(96, 160) is engine.variants[96]  # shorter side 96
    # views at 96 px run with the set: the same outputs as a network loaded with it
    with_set = with_bn_set(model.network, repo_with_set / "tiny" / "bn/96.safetensors")
    no_sets = dataclasses.replace(model, cfg=model.cfg.with_changes(bn_sets={}))
    plain = Engine(no_sets, FLOAT32.with_changes(fuse=False))
    reference = Engine(dataclasses.replace(no_sets, network=with_set), FLOAT32)
    data = image_bytes(150, 100, seed=1)
    spec = parse_view_spec("full@96")
    got = classify(engine, data, spec, level="logit", seed=0).probs
    want = classify(reference, data, spec, level="logit", seed=0).probs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the set changes the answer (its statistics differ), crops at 64 px do not use it
    assert not torch.allclose(got, classify(plain, data, spec, level="logit", seed=0).probs)
    crops = parse_view_spec("fixed:5")
    torch.testing.assert_close(
        classify(engine, data, crops, seed=0).probs,
        classify(plain, data, crops, seed=0).probs,
        rtol=1e-4,
        atol=1e-5,
    )


def test_sets_load_strictly(repo_with_set: Path) -> None:
    path = repo_with_set / "tiny" / "bn" / "96.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path))
    with pytest.raises(WeightsMismatchError, match="missing"):
        Engine(ModelRepository(repo_with_set).load("tiny", "cpu"), FLOAT32)
    save_file({**tensors, "extra.running_mean": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        Engine(ModelRepository(repo_with_set).load("tiny", "cpu"), FLOAT32)
    path.unlink()
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(ModelRepository(repo_with_set).load("tiny", "cpu"), FLOAT32)


def test_nearest_resolution() -> None:
    assert nearest_resolution([224, 288, 320], 256) == 224  # a tie goes to the smaller
    assert nearest_resolution([224, 288, 320], 300) == 288
    assert nearest_resolution([224, 288, 320], 1000) == 320


def test_bn_state_holds_every_norm_and_nothing_else(tiny_repo: Path) -> None:
    network = ModelRepository(tiny_repo).load("tiny", "cpu").network
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    state = bn_state(network)
    assert len(state) == 4 * len(norms)
    assert {k.rsplit(".", 1)[1] for k in state} == {"weight", "bias", "running_mean", "running_var"}
