"""import-fixres: a checkpoint in the published FixRes format becomes a served model entry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from app.errors import InvalidRequestError, WeightsMismatchError
from app.jobs.import_fixres.run import import_fixres
from app.repository import ModelRepository
from tests.helpers import PROJECT_ROOT


def write_fixres_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """As FixRes publishes them: {"model": {"module.<name>": tensor}} (saved from DDP)."""
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():  # non-trivial running statistics, so a mix-up would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_round_trip(resnet_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ckpt = write_fixres_checkpoint(tmp_path / "fixres.pth", resnet_state)
    root = tmp_path / "models"
    cfg = import_fixres(ckpt, "test_resnet", 128, "fix", root, num_classes=10, labels="none")
    assert cfg.input_size == 128 and cfg.resize_size == 146 and cfg.interpolation == "bilinear"
    model = ModelRepository(root).load("fix", "cpu")
    loaded = model.network.state_dict()
    assert loaded.keys() == resnet_state.keys()
    for k, v in resnet_state.items():
        assert torch.equal(loaded[k], v), k
    assert model.cfg.provenance["job"] == "import-fixres"
    assert len(model.cfg.provenance["source_sha256"]) == 64


def test_missing_or_extra_key_is_refused_with_names(
    resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    missing = dict(resnet_state)
    del missing["layer4.0.bn1.running_var"]
    ckpt = write_fixres_checkpoint(tmp_path / "missing.pth", missing)
    with pytest.raises(
        WeightsMismatchError, match=r"missing keys \(1\): layer4\.0\.bn1\.running_var"
    ):
        import_fixres(ckpt, "test_resnet", 128, "m", tmp_path, num_classes=10, labels="none")
    extra = {**resnet_state, "fc.extra_scale": torch.ones(1)}
    ckpt = write_fixres_checkpoint(tmp_path / "extra.pth", extra)
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(1\): fc\.extra_scale"):
        import_fixres(ckpt, "test_resnet", 128, "e", tmp_path, num_classes=10, labels="none")
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_bad_test_size_and_unpublished_format(
    resnet_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ckpt = write_fixres_checkpoint(tmp_path / "fixres.pth", resnet_state)
    with pytest.raises(InvalidRequestError, match="total stride 32"):
        import_fixres(ckpt, "test_resnet", 100, "x", tmp_path, num_classes=10, labels="none")
    plain = tmp_path / "plain.pth"
    torch.save(resnet_state, plain)
    from app.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no 'model' entry"):
        import_fixres(plain, "test_resnet", 128, "x", tmp_path, num_classes=10, labels="none")


def test_cli_reports_a_clear_error(tmp_path: Path) -> None:
    """The command line answers bad input with one error line, not a traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "import-fixres",
            str(tmp_path / "nope.pth"),
            "--arch",
            "resnet50",
            "--test-size",
            "384",
            "--out",
            "fix",
            "--models-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "nope.pth does not exist" in proc.stderr and "Traceback" not in proc.stderr
