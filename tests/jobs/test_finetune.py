"""FixRes fine-tuning on a tiny real timm network and a tiny generated ImageFolder."""

from __future__ import annotations

import io
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import DataError, InvalidRequestError
from app.jobs.finetune.data import FixResTransform
from app.jobs.finetune.options import FinetuneOptions
from app.jobs.finetune.run import run_finetune
from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, classify, make_image_folder, make_tiny_model, read_weights

TEST_SIZE = 96  # a multiple of test_efficientnet's total stride (32); the parent runs at 64


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_tiny_model(root, "tiny")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("train"))


def options(repo: Path, data: Path, **kw) -> FinetuneOptions:
    base = dict(
        model="tiny",
        data=data,
        models_dir=repo,
        out="tiny_fixres",
        test_size=TEST_SIZE,
        epochs=2,
        batch_size=8,
        lr=0.05,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return FinetuneOptions(**base)  # type: ignore[arg-type]


def test_only_classifier_and_last_bn_change(repo: Path, data: Path) -> None:
    result = run_finetune(options(repo, data))
    before = read_weights(repo / "tiny")
    after = read_weights(result.folder)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if k.startswith(("classifier.", "bn2."))}
    assert changed <= trained, f"frozen tensors changed: {sorted(changed - trained)}"
    assert {"classifier.weight", "classifier.bias", "bn2.weight", "bn2.bias"} <= changed
    # the last batch-norm re-estimated its running statistics at the new resolution
    assert not torch.allclose(before["bn2.running_mean"], after["bn2.running_mean"])
    assert not torch.allclose(before["bn2.running_var"], after["bn2.running_var"])
    assert int(after["bn2.num_batches_tracked"]) == int(before["bn2.num_batches_tracked"]) + 8
    doc = tomllib.loads((result.folder / "model.toml").read_text())
    assert doc["model"]["parent"] == "tiny"
    assert doc["preprocess"]["input_size"] == TEST_SIZE
    assert doc["preprocess"]["crop_pct"] == pytest.approx(0.8)  # unchanged: resize scales
    prov = doc["provenance"]
    assert prov["epochs"] == 2 and prov["test_size"] == TEST_SIZE and prov["images"] == 32
    assert prov["resize_size"] == 120 and prov["trainable_modules"] == ["classifier", "bn2"]
    assert 0.0 <= prov["train_top1"] <= 1.0


def test_loss_falls_on_learnable_task(repo: Path, data: Path) -> None:
    result = run_finetune(options(repo, data, epochs=6, lr=0.2, lr_step=10, val=data))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.history[-1]["top1"] > 0.5  # chance is 0.25 over the 4 used classes
    assert result.val_top1 is not None and result.val_top1_before is not None
    assert result.val_top1 > result.val_top1_before


def test_output_loads_in_engine_and_matches_training_crop(repo: Path, data: Path) -> None:
    result = run_finetune(options(repo, data, epochs=1))
    model = ModelRepository(repo).load("tiny_fixres", "cpu")
    assert model.cfg.input_size == TEST_SIZE and model.cfg.parent == "tiny"
    engine = Engine(model, FLOAT32)
    image_path = data / "2" / "0.png"
    pred = classify(engine, image_path.read_bytes(), parse_view_spec("center"), top_k=10)
    assert pred.views[0].size == TEST_SIZE
    # the crop the job trains and evaluates on is the crop the server classifies
    crop = FixResTransform(result.cfg, "center")(
        Image.open(image_path).convert("RGB"), np.random.default_rng(0)
    )
    with torch.no_grad():
        probs = torch.softmax(model.network(crop[None]), -1)[0]
    torch.testing.assert_close(pred.probs, probs, atol=1e-5, rtol=1e-4)


def test_output_is_served_over_http(repo: Path, data: Path, monkeypatch) -> None:
    import app

    if not (Path(app.__file__).parent / "main.py").is_file():
        pytest.skip("the HTTP server (app/main.py) is not in this checkout")
    from fastapi.testclient import TestClient

    from app import main
    from app.config import get_settings

    run_finetune(options(repo, data, epochs=1))
    monkeypatch.setenv("MIDSERVE_MODELS_DIR", str(repo))
    monkeypatch.setenv("MIDSERVE_MODELS", '["tiny_fixres"]')
    monkeypatch.setenv("MIDSERVE_DEVICE", "cpu")
    get_settings.cache_clear()
    try:
        with TestClient(main.create_app()) as client:
            paths = client.get("/openapi.json").json()["paths"]
            listing = [
                p for p, ops in paths.items() if "models" in p and "{" not in p and "get" in ops
            ]
            assert listing, f"no model listing route among {sorted(paths)}"
            assert "tiny_fixres" in client.get(listing[0]).text
    finally:
        get_settings.cache_clear()


def test_resume_continues_where_it_stopped(repo: Path, data: Path, tmp_path: Path) -> None:
    straight = run_finetune(
        options(repo, data, out="straight", epochs=2, lr_step=1, augment="test2")
    )
    run_finetune(options(repo, data, out="resumed", epochs=1, lr_step=1, augment="test2"))
    resumed = run_finetune(
        options(repo, data, out="resumed", epochs=2, lr_step=1, augment="test2", resume=True)
    )
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0]
    a, b = read_weights(straight.folder), read_weights(resumed.folder)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    with pytest.raises(InvalidRequestError, match="other settings"):
        run_finetune(options(repo, data, out="resumed", epochs=3, lr=0.01, resume=True))


def test_bn_only_changes_running_statistics_only(repo: Path, tmp_path: Path) -> None:
    flat = tmp_path / "unlabelled"
    make_image_folder(flat, classes=2, per_class=6, seed=3)
    for p in list(flat.rglob("*.png")):  # a plain folder of images is enough
        p.rename(flat / f"{p.parent.name}_{p.name}")
    result = run_finetune(options(repo, flat, out="tiny_bn", bn_only=True, batch_size=4))
    before, after = read_weights(repo / "tiny"), read_weights(result.folder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.endswith(stats) for k in changed), sorted(changed)
    bns = {k.rsplit(".", 1)[0] for k in before if k.endswith("running_mean")}
    assert {k.rsplit(".", 1)[0] for k in changed} == bns  # every batch-norm re-estimated
    assert result.images == 12 and result.cfg.provenance["job"] == "bn-only"


def test_bn_set_adds_the_statistics_to_the_model_for_its_resolution(
    repo: Path, tmp_path: Path
) -> None:
    """--bn-only --bn-set: no new entry; the source lists a set its 96 px views run with."""
    flat = tmp_path / "unlabelled"
    make_image_folder(flat, classes=2, per_class=4, seed=5)
    entries = sorted(p.name for p in repo.iterdir())
    result = run_finetune(options(repo, flat, bn_only=True, bn_set=True, batch_size=4))
    assert sorted(p.name for p in repo.iterdir()) == entries  # no new model entry
    assert result.cfg.bn_sets == {TEST_SIZE: f"bn/{TEST_SIZE}.safetensors"}
    engine = Engine(ModelRepository(repo).load("tiny", "cpu"), FLOAT32)
    assert engine.bn_sets == [TEST_SIZE]
    with pytest.raises(InvalidRequestError, match="own input size"):
        run_finetune(options(repo, flat, bn_only=True, bn_set=True, test_size=64))
    # a new entry fine-tuned from it does not inherit the parent's sets
    child = run_finetune(options(repo, flat, out="tiny_child", bn_only=True, batch_size=4))
    assert child.cfg.bn_sets == {}
    ModelRepository(repo).load("tiny_child", "cpu")
    with pytest.raises(InvalidRequestError, match="needs --bn-only"):
        run_finetune(options(repo, flat, bn_set=True))


def test_flat_folder_with_val_txt_trains_and_validates(
    repo: Path, data: Path, tmp_path: Path
) -> None:
    """The evaluate layouts work for finetune too: a flat folder plus val.txt."""
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for p in sorted(data.rglob("*.png")):
        name = f"img_{p.parent.name}_{p.stem}.png"
        shutil.copy(p, flat / name)
        lines.append(f"{name} {p.parent.name}")
    (flat / "val.txt").write_text("\n".join(lines) + "\n")
    result = run_finetune(options(repo, flat, out="tiny_flat", epochs=1, val=flat))
    assert result.images == 32 and result.cfg.provenance["val_images"] == 32
    assert result.val_top1 is not None


# -- bad input ----------------------------------------------------------------------------------
def test_empty_data_folder_is_refused(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        run_finetune(options(repo, tmp_path / "empty"))
    with pytest.raises(DataError, match="no image files"):
        run_finetune(options(repo, tmp_path / "empty", bn_only=True))
    with pytest.raises(DataError, match="does not exist"):
        run_finetune(options(repo, tmp_path / "missing"))


def test_class_folders_must_match_model_classes(repo: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", classes=2, per_class=1)
    (tmp_path / "d" / "0").rename(tmp_path / "d" / "cat")
    with pytest.raises(DataError, match="do not match the model's classes: cat"):
        run_finetune(options(repo, tmp_path / "d"))
    with pytest.raises(DataError, match="exactly one per model class"):
        run_finetune(options(repo, tmp_path / "d", class_order="sorted"))


def test_unreadable_images_are_skipped_and_counted(repo: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=2, per_class=4)
    (root / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    buf = io.BytesIO()
    Image.new("RGB", (80, 70), "red").save(buf, format="JPEG")
    (root / "1" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    result = run_finetune(options(repo, root, epochs=1, batch_size=4))
    assert result.skipped == 2 and result.images == 10
    assert result.history[-1]["images"] == 8
    assert result.cfg.provenance["skipped_images"] == 2


def test_test_size_must_fit_the_network_stride(repo: Path, data: Path) -> None:
    with pytest.raises(InvalidRequestError, match="not a multiple of .* total stride 32"):
        run_finetune(options(repo, data, test_size=100))


def test_bad_options_are_refused(repo: Path, data: Path) -> None:
    with pytest.raises(InvalidRequestError, match="part 'fc' is unknown"):
        run_finetune(options(repo, data, train="classifier,fc"))
    with pytest.raises(InvalidRequestError, match="not a valid model name"):
        run_finetune(options(repo, data, out="../escape"))
    run_finetune(options(repo, data, epochs=1))
    with pytest.raises(InvalidRequestError, match="already exists"):
        run_finetune(options(repo, data, epochs=1))


def test_train_parts_name_the_right_modules(repo: Path, data: Path) -> None:
    """head-conv and blocks:N add the conv before the last BN and the last N blocks."""
    result = run_finetune(
        options(repo, data, epochs=1, train="classifier,last-bn,head-conv,blocks:1")
    )
    modules = result.cfg.provenance["trainable_modules"]
    assert modules[:3] == ["classifier", "bn2", "conv_head"]
    assert modules[3:] and all(m.startswith("blocks.4.") for m in modules[3:])
    before, after = read_weights(repo / "tiny"), read_weights(result.folder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "conv_head.weight" in changed and any(k.startswith("blocks.4.") for k in changed)
    allowed = ("classifier.", "bn2.", "conv_head.", "blocks.4.")
    assert all(k.startswith(allowed) for k in changed), sorted(changed)
    with pytest.raises(InvalidRequestError, match="blocks:9 asked, the network has 5 blocks"):
        run_finetune(options(repo, data, out="x", train="classifier,blocks:9"))


@pytest.mark.parametrize("augment", ["test", "test2", "train"])
def test_augmentations_give_test_size_crops(repo: Path, augment: str) -> None:
    from app.model_config import load_model_config

    cfg = load_model_config(repo / "tiny").with_changes(input_size=TEST_SIZE)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), np.uint8))
    transform = FixResTransform(cfg, augment)  # type: ignore[arg-type]
    crops = [transform(img, np.random.default_rng(s)) for s in range(4)]
    assert all(c.shape == (3, TEST_SIZE, TEST_SIZE) for c in crops)
    again = transform(img, np.random.default_rng(0))
    assert torch.equal(crops[0], again)  # randomness comes from the given generator only
    distinct = {c.sum().item() for c in crops}
    assert (len(distinct) == 1) == (augment == "test")
