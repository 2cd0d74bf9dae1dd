"""``midserve evaluate`` on a tiny real model and a tiny generated labelled folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from app.errors import DataError, EvalResultsError, InvalidRequestError
from app.eval_results import read_eval_results
from app.jobs.evaluate.configs import EvalOptions, image_seed, parse_configs, parse_sweep
from app.jobs.evaluate.records import read_records
from app.jobs.evaluate.run import run_evaluation
from app.jobs.evaluate.staged import plain_halves
from app.model_config import load_model_config
from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.tta.adaptive import auto_policy
from app.tta.averaging import average_probabilities
from app.tta.preprocess import cut_view_groups
from app.tta.stages import parse_policy
from app.tta.views import parse_view_spec
from tests.helpers import (
    FLOAT32,
    PROJECT_ROOT,
    classify,
    image_bytes,
    make_tiny_model,
    preparer,
)

# (class, width, height): square, 4:3 and elongated images, so every auto branch is hit
IMAGES = [(0, 64, 64), (0, 90, 64), (1, 64, 140), (1, 70, 70), (2, 100, 75), (2, 200, 80)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-models")
    make_tiny_model(root, "tiny", num_classes=3, seed=1)  # resize 80, crop 64
    make_tiny_model(root, "tiny_full", num_classes=3, crop_pct=1.0, seed=2)  # resize = crop
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-data") / "folder"
    for n, (cls, w, h) in enumerate(IMAGES):
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
        (root / str(cls) / f"img{n}.png").write_bytes(image_bytes(w, h, seed=n))
    return root


@pytest.fixture(scope="module")
def engines(repo: Path) -> dict[str, Engine]:
    r = ModelRepository(repo)
    return {name: Engine(r.load(name, "cpu"), FLOAT32) for name in ("tiny", "tiny_full")}


def _opts(repo: Path, data: Path, out: Path, configs: list[str], **kw: object) -> EvalOptions:
    return EvalOptions(
        model=str(kw.pop("model", "tiny")),
        data=data,
        out=out,
        configs=parse_configs(configs),
        models_dir=repo,
        device="cpu",
        dtype="float32",  # as the recomputations' engines (tests.helpers.FLOAT32)
        progress=False,
        **kw,  # type: ignore[arg-type]
    )


def _recompute(
    engine: Engine, data: Path, spec_text: str, levels: list[str], seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Top-1, top-5 and views per image for one spec at several levels, image by image."""
    hits: dict[str, list[tuple[bool, bool, int]]] = {lv: [] for lv in levels}
    for path in sorted(data.rglob("*.png")):
        target = int(path.parent.name)
        image = preparer(engine).image(path.read_bytes())[0]
        if spec_text == "auto":
            spec = auto_policy(*image.resized_size, engine.cfg.input_size)
        else:
            spec = parse_view_spec(spec_text)
        views, _, _ = preparer(engine).plan(
            image, spec, image_seed(seed, str(path.relative_to(data)))
        )
        outputs = engine.run_groups(cut_view_groups(image, views))
        for lv in levels:
            probs = average_probabilities(outputs.features, outputs.logits, engine.head, lv)  # type: ignore[arg-type]
            idx = probs.topk(3).indices.tolist()
            hits[lv].append((idx[0] == target, target in idx, len(views)))
    n = len(IMAGES)
    return {
        f"{spec_text}@{lv}": (
            sum(h[0] for h in hs) / n,
            sum(h[1] for h in hs) / n,
            sum(h[2] for h in hs) / n,
        )
        for lv, hs in hits.items()
    }


def _rows(report: dict) -> dict[str, dict]:
    return {r["config"]: r for r in report["rows"]}


def test_table_equals_a_per_image_recomputation(
    repo: Path, data: Path, engines: dict[str, Engine], tmp_path: Path
) -> None:
    configs = ["fixed:5,mfixed:5@feature", "fixed:5,mfixed:5@softmax", "random:3,mrandom:2@logit"]
    report = run_evaluation(_opts(repo, data, tmp_path / "out", configs))
    assert report is not None
    rows = _rows(report)
    assert list(rows) == ["center:1@softmax", *configs]
    expected = {
        **_recompute(engines["tiny"], data, "center:1", ["softmax"]),
        **_recompute(engines["tiny"], data, "fixed:5,mfixed:5", ["feature", "softmax"]),
        **_recompute(engines["tiny"], data, "random:3,mrandom:2", ["logit"]),
    }
    for config, row in rows.items():
        top1, top5, views = expected[config]
        assert row["images"] == len(IMAGES)
        assert row["top1"] == pytest.approx(top1) and row["top5"] == pytest.approx(top5)
        assert row["mean_views"] == views
    # one forward per image over the union: 5 fixed + 5 mirrored + 3 random + 2 mirrored
    # (the center crop is the first fixed crop), not 1 + 10 + 10 + 5 views
    assert report["timing"]["views_run"] == 15 * len(IMAGES)
    paired = rows["fixed:5,mfixed:5@softmax"]["paired"]
    center = rows["center:1@softmax"]["top1"]
    assert paired["diff"] == pytest.approx(rows["fixed:5,mfixed:5@softmax"]["top1"] - center)
    assert paired["ci_low"] <= paired["diff"] <= paired["ci_high"]


def test_resolution_views_and_their_compute_equal_a_recomputation(
    repo: Path, data: Path, engines: dict[str, Engine], tmp_path: Path
) -> None:
    """Whole-image and multi-scale configs share one pool per image, batched by shape, and
    each row's top-1 and compute match the serving pipeline run image by image."""
    configs = ["center,full@96,mfull@96@softmax", "center@80@logit", "full@64,mfull@64@softmax"]
    report = run_evaluation(_opts(repo, data, tmp_path / "out", configs))
    assert report is not None
    rows = _rows(report)
    for text in configs:
        spec, _, level = text.rpartition("@")
        top1, top5, views = _recompute(engines["tiny"], data, spec, [level])[text]
        name = parse_configs([text])[1].name
        assert rows[name]["top1"] == pytest.approx(top1) and rows[name]["top5"] == pytest.approx(
            top5
        )
        assert rows[name]["mean_views"] == views
    center = rows["center:1@softmax"]
    assert center["view_equivalents"] == 1.0
    whole = rows["center:1,full@96:1,mfull@96:1@softmax"]
    assert whole["view_equivalents"] > 3 and whole["gflops"] > 3 * center["gflops"] > 0
    assert (tmp_path / "out" / "policies.png").stat().st_size > 10_000
    assert "Pareto front" in (tmp_path / "out" / "results.md").read_text()


def test_the_best_policy_under_a_budget_is_written_and_served(data: Path, tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "models", "tiny", num_classes=3, seed=1)
    configs = ["fixed:5,mfixed:5@softmax", "full@96,mfull@96@softmax", "center@80@softmax"]
    opts = _opts(tmp_path / "models", data, tmp_path / "out", configs, policy_budget=4.0,
                 time_images=2)  # fmt: skip
    report = run_evaluation(opts)
    assert report is not None
    written = report["policy_written"]
    # chosen on the fit half only: nothing within the budget there did better
    records = list(read_records(tmp_path / "out").values())
    for row in report["rows"]:
        h = plain_halves(records, row["config"], opts.seed)
        if row["level"] == "softmax" and h["fit_view_equivalents"] <= 4.0:
            assert h["fit_top1"] <= written["fit_top1"]
    for row in report["staged"]:
        if row["budget"] == 4.0:
            assert row["fit_view_equivalents"] <= 4.0 and row["fit_top1"] <= written["fit_top1"]
    assert written["fit_view_equivalents"] <= 4.0
    assert all(r["ms_per_image"] > 0 for r in report["rows"])  # each config timed alone
    assert all(r["ms_per_image"] > 0 for r in report["staged"])  # and each gated policy
    cfg = load_model_config(tmp_path / "models" / "tiny")
    assert cfg.auto_views == written["spec"] and cfg.calibration == written["temperatures"]
    engine = Engine(ModelRepository(tmp_path / "models").load("tiny", "cpu"), FLOAT32)
    served = classify(engine, image_bytes(90, 64), parse_view_spec("auto"), top_k=1, seed=0)
    assert parse_policy(served.spec) == parse_policy(written["spec"])
    assert "Staged policies" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("model", ["tiny", "tiny_full"])
def test_auto_policy_equals_a_per_image_recomputation(
    repo: Path, data: Path, engines: dict[str, Engine], tmp_path: Path, model: str
) -> None:
    report = run_evaluation(_opts(repo, data, tmp_path / "out", ["auto"], model=model))
    assert report is not None
    row = _rows(report)["auto@softmax"]
    top1, top5, views = _recompute(engines[model], data, "auto", ["softmax"])["auto@softmax"]
    assert (row["top1"], row["top5"]) == (pytest.approx(top1), pytest.approx(top5))
    assert row["mean_views"] == pytest.approx(views)
    stats = report["crop_statistics"]
    if model == "tiny_full":  # square images leave no room, the others room on one axis
        assert stats["no_room"] == 2 and stats["room_one_axis_only"] == len(IMAGES) - 2
        assert 1 < views < 30


def test_outputs_tables_plot_and_model_results(repo: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    opts = _opts(repo, data, out, ["fixed:5@softmax"], sweep=parse_sweep("random:1..4"))
    report = run_evaluation(opts)
    assert report is not None
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    sweep = [line.split(",") for line in (out / "sweep.csv").read_text().splitlines()[1:]]
    assert [int(s[0]) for s in sweep] == [1, 2, 3, 4]
    assert "| `fixed:5@softmax` |" in (out / "results.md").read_text()
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("config,level,images") and len(csv_lines) == 3
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    stored = read_eval_results(repo / "tiny")
    got = {(r.dataset, r.config): r for r in stored}
    for row in report["rows"]:
        result = got[("folder", row["config"])]
        assert result.top1 == pytest.approx(row["top1"]) and result.images == len(IMAGES)
    # a second dataset adds entries, a repeated one replaces them
    again = _opts(repo, data, tmp_path / "out2", [], dataset_name="other")
    run_evaluation(again)
    keys = [(r.dataset, r.config) for r in read_eval_results(repo / "tiny")]
    assert len(keys) == len(set(keys)) and ("other", "center:1@softmax") in keys


def test_interrupted_run_resumes_with_identical_results(
    repo: Path, data: Path, tmp_path: Path
) -> None:
    configs = ["random:2,mrandom:1@softmax", "auto"]
    full = run_evaluation(_opts(repo, data, tmp_path / "full", configs))
    out = tmp_path / "partial"
    first = run_evaluation(_opts(repo, data, out, configs, limit=4))
    assert first is not None and first["images"] == 4
    with (out / "records.jsonl").open("a") as f:
        f.write('{"file": "2/img5.png", "tar')  # killed mid-write
    resumed = run_evaluation(_opts(repo, data, out, configs))
    assert resumed is not None and full is not None
    assert resumed["resumed_images"] == 4
    assert resumed["timing"]["images_computed"] == len(IMAGES) - 4
    assert resumed["rows"] == full["rows"]
    with pytest.raises(EvalResultsError, match="different run.*configs"):
        run_evaluation(_opts(repo, data, out, ["fixed:5"]))
    fresh = run_evaluation(_opts(repo, data, out, ["fixed:5"], fresh=True))
    assert fresh is not None and fresh["resumed_images"] == 0


def test_unreadable_images_are_counted_skips(repo: Path, data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    (bad / "1" / "truncated.png").write_bytes(image_bytes(80, 80)[:60])
    (bad / "2" / "text.png").write_bytes(b"hello, not a picture")
    report = run_evaluation(_opts(repo, bad, tmp_path / "out", []))
    assert report is not None
    assert report["images"] == len(IMAGES)
    assert sorted(s["file"] for s in report["skipped"]) == ["1/truncated.png", "2/text.png"]
    assert all("InvalidImageError" in s["reason"] for s in report["skipped"])


def test_folder_of_only_unreadable_images_is_an_error(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "d" / "0").mkdir(parents=True)
    (tmp_path / "d" / "0" / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no image .* could be evaluated"):
        run_evaluation(_opts(repo, tmp_path / "d", tmp_path / "out", []))


def test_labels_outside_the_model_classes_are_an_error(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "d" / "12").mkdir(parents=True)
    (tmp_path / "d" / "12" / "a.png").write_bytes(image_bytes())
    with pytest.raises(DataError, match="'12'"):
        run_evaluation(_opts(repo, tmp_path / "d", tmp_path / "out", []))


def test_flat_labels_file_layout_gives_the_same_table(
    repo: Path, data: Path, tmp_path: Path
) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for path in sorted(data.rglob("*.png")):
        shutil.copy(path, flat / path.name)
        lines.append(f"{path.name} {path.parent.name}")
    (flat / "val.txt").write_text("\n".join(lines) + "\n")
    configs = ["fixed:5@softmax"]
    a = run_evaluation(_opts(repo, data, tmp_path / "a", configs, write_model_results=False))
    b = run_evaluation(_opts(repo, flat, tmp_path / "b", configs, write_model_results=False))
    assert a is not None and b is not None and b["layout"] == "labels-file"
    assert [(r["top1"], r["top5"]) for r in a["rows"]] == [
        (r["top1"], r["top5"]) for r in b["rows"]
    ]


def test_config_and_sweep_parsing() -> None:
    names = [c.name for c in parse_configs(["closing"])]
    assert names[0] == "center:1@softmax" and "auto@softmax" in names and len(names) == 10
    mixed = parse_configs(["random:10@feature;fixed:5,mfixed:5", "center:1@softmax"])
    assert [c.name for c in mixed] == [
        "center:1@softmax",
        "random:10@feature",
        "fixed:5,mfixed:5@softmax",
    ]
    sweep = parse_sweep("random:1..40")
    assert sweep is not None and len(sweep.configs()) == 40
    for bad in (["random:10@max"], ["blurry:3"], ["fixed:9"]):
        with pytest.raises(InvalidRequestError):
            parse_configs(bad)
    for text in ("random:0..3", "fixed:1..4", "random:5", "random:9..2"):
        with pytest.raises(InvalidRequestError):
            parse_sweep(text)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "app.cli", "evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_runs_with_decode_workers_and_reports_bad_input(
    repo: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli"
    common = ["--models-dir", str(repo), "--model", "tiny", "--data", str(data), "--device", "cpu"]
    ok = _cli(*common, "--out", str(out), "--configs", "fixed:5@feature;auto",
              "--sweep", "random:1..2", "--workers", "1", "--no-progress")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "| `auto@softmax` |" in ok.stdout and (out / "sweep.png").is_file()
    bad = _cli(*common, "--out", str(tmp_path / "x"), "--configs", "zoom:3")
    assert bad.returncode == 2
    assert "unknown view kind 'zoom'" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli(*common[:4], "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_torchrun_ranks_share_the_images_and_agree_with_one_process(
    repo: Path, data: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        "--models-dir",
        str(repo),
        "--model",
        "tiny",
        "--data",
        str(data),
        "--device",
        "cpu",
        "--dtype",
        "float32",  # as run_evaluation(_opts(...)) below
        "--configs",
        "fixed:5;auto",
        "--workers",
        "0",
        "--no-progress",
        "--no-model-results",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "app.cli",
        "evaluate",
        *args,
        "--out",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [
        len((tmp_path / "ddp" / f"records-rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)
    ]
    assert lines == [3, 3]
    single = run_evaluation(
        _opts(repo, data, tmp_path / "one", ["fixed:5", "auto"], write_model_results=False)
    )
    assert single is not None
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["rows"] == single["rows"]
