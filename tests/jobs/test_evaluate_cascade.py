"""The cascade search of ``midserve evaluate``: two tiny real models, two labelled folders;
searched cascades replay as the served pipeline answers them, and a written cascade is what
``views=auto`` then serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.errors import InvalidRequestError
from app.jobs.evaluate.cascade import later_stage_models, run_cascade_search
from app.jobs.evaluate.configs import EvalOptions, parse_configs
from app.local_pipeline import local_pipeline
from app.model_config import load_model_config
from app.repository import ModelRepository
from app.request import ClassifyRequest
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions
from app.tta.stages import parse_policy
from tests.helpers import image_bytes, make_tiny_model

FIRSTS = "center@softmax;center@96@softmax;full@96,mfull@96@softmax"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cascade-models")
    make_tiny_model(root, "tiny", num_classes=3, seed=1)  # input 64, resize 80, bilinear
    make_tiny_model(root, "strong", num_classes=3, seed=2, input_size=96, crop_pct=0.9,
                    interpolation="bicubic")  # fmt: skip
    make_tiny_model(root, "other_classes", num_classes=5, seed=3)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = []
    for k, sizes in enumerate([[(90, 64), (64, 120), (70, 70)], [(100, 100), (120, 80)]]):
        root = tmp_path_factory.mktemp(f"kind{k}") / f"kind{k}"
        for n in range(12):
            w, h = sizes[n % len(sizes)]
            cls = n % 3
            (root / str(cls)).mkdir(parents=True, exist_ok=True)
            data = image_bytes(w, h, seed=100 * k + n)
            (root / str(cls) / f"img{n}.png").write_bytes(data)
        out.append(root)
    return out


def _options(repo: Path, out: Path, budget: float | None = None) -> EvalOptions:
    return EvalOptions(
        model="tiny", data=Path("."), out=out, configs=parse_configs([FIRSTS]), models_dir=repo,
        device="cpu", dtype="float32", workers=0, progress=False, write_model_results=False,
        policy_budget=budget, stage_budgets=(2.0, 6.0),
    )  # fmt: skip


def _settings(repo: Path) -> Settings:
    return Settings(models_dir=repo, device="cpu", dtype="float32", tune=False, threads=1)


def test_later_stage_models_are_the_others_with_the_same_classes(repo: Path) -> None:
    r = ModelRepository(repo)
    assert later_stage_models(r, "tiny", ["auto"]) == ["strong"]
    assert later_stage_models(r, "tiny", ["none"]) == []
    with pytest.raises(InvalidRequestError, match="not another model"):
        later_stage_models(r, "tiny", ["tiny"])
    with pytest.raises(InvalidRequestError, match="other classes"):
        later_stage_models(r, "tiny", ["other_classes"])


def test_cascades_are_searched_pooled_and_per_folder_and_replay_as_served(
    repo: Path, folders: list[Path], tmp_path: Path
) -> None:
    report = run_cascade_search(_options(repo, tmp_path), folders, ["strong"], _settings(repo))
    assert report["folders"] == ["kind0", "kind1"]
    assert report["fit_images"] + report["test_images"] == 24
    assert report["view_cost"]["strong"]["source"] == "gflops"  # untuned: FLOPs per view
    plain = {p["policy"]: p for p in report["plain"]}
    strong = "strong:full:1,mfull:1@softmax"
    assert strong in plain and strong in report["references"]
    # a later-stage model's compute is its own view-equivalents times the cost of its view
    ratio = report["view_cost"]["strong"]["ratio"]
    assert ratio > 1.5  # 96 px views of the same network against 64 px ones
    assert plain["strong:center:1@softmax"]["pooled"]["view_equivalents"] == pytest.approx(ratio)
    for p in report["plain"]:
        kinds = p["kinds"]
        assert sum(k["images"] for k in kinds.values()) == p["pooled"]["images"]
    cascades = [g for g in report["gated"] if g["model"] == "cascade"]
    assert cascades, "the wide budget must be able to reach the later-stage model"
    md = (tmp_path / "cascades.md").read_text()
    assert "kind0 top-1 %" in md and (tmp_path / "cascades.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "cascades.json").read_text())
    assert saved["gated"][0]["policy"] == report["gated"][0]["policy"]


def test_a_written_cascade_is_what_auto_then_serves(
    repo: Path, folders: list[Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    models = tmp_path_factory.mktemp("writable")
    for name in ("tiny", "strong"):
        (models / name).mkdir()
        for f in (repo / name).iterdir():
            (models / name / f.name).write_bytes(f.read_bytes())
    opts = _options(models, tmp_path, budget=6.0)
    report = run_cascade_search(opts, folders, ["auto"], _settings(models))
    written = report["policy_written"]
    cfg = load_model_config(models / "tiny")
    assert cfg.auto_views == str(parse_policy(written["spec"]))
    assert cfg.calibration == written["temperatures"]
    # the served pipeline answers the written policy as the search scored it
    options = EngineOptions.from_settings(_settings(models))
    r = ModelRepository(models)
    pipeline = local_pipeline(r, load_engine(r, "tiny", options), options)
    policy = parse_policy(cfg.auto_views)
    photo = next(folders[0].rglob("*.png")).read_bytes()
    pred = pipeline.classify(photo, ClassifyRequest(parse_policy("auto"), "softmax", 3, 0))
    assert pred.spec == str(policy)
    assert torch.isclose(pred.probs.sum(), torch.tensor(1.0), atol=1e-5)
    if policy.cascade and pred.stages and pred.stages[1].ran:
        assert "strong" in pred.answered_by
    assert np.isfinite(written["fit_top1"])


def test_a_model_with_other_classes_is_refused_as_a_later_stage(
    repo: Path, folders: list[Path], tmp_path: Path
) -> None:
    options = EngineOptions.from_settings(_settings(repo))
    r = ModelRepository(repo)
    pipeline = local_pipeline(r, load_engine(r, "tiny", options), options)
    photo = next(folders[0].rglob("*.png")).read_bytes()
    request = ClassifyRequest(parse_policy("center|margin<1|other_classes:center"), top_k=3)
    with pytest.raises(InvalidRequestError, match="other classes"):
        pipeline.classify(photo, request)
