from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import image_bytes, make_tiny_model, run_cli

pytestmark = pytest.mark.slow  # the command line end to end, a process per call


def test_classify_json_reports_each_image_in_order(tiny_repo: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(100, 80))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    other = tmp_path / "other.png"
    other.write_bytes(image_bytes(70, 90, seed=3))
    res = run_cli(
        "classify",
        "--models-dir",
        str(tiny_repo),
        "--model",
        "tiny",
        "--json",
        "--views",
        "fixed:5,random:4",
        "--seed",
        "1",
        "--top-k",
        "2",
        str(good),
        str(bad),
        str(other),
        str(tmp_path / "missing.png"),
    )
    assert res.returncode == 1, res.stderr  # some failed
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["file"] for x in lines] == [
        str(good),
        str(bad),
        str(other),
        str(tmp_path / "missing.png"),
    ]
    assert "error" in lines[1] and "not a recognised image" in lines[1]["error"]
    assert "error" in lines[3]
    for ok in (lines[0], lines[2]):
        assert ok["views"] == 9 and ok["seed"] == 1 and len(ok["top"]) == 2
        assert set(ok["top"][0]) == {"index", "synset", "label", "prob"}


def test_classify_crops_and_errors(tiny_repo: Path, tmp_path: Path) -> None:
    img = tmp_path / "x.png"
    img.write_bytes(image_bytes(100, 80))
    res = run_cli(
        "classify",
        "--models-dir",
        str(tiny_repo),
        "--model",
        "tiny",
        "--json",
        "--crops",
        "12",
        str(img),
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["views"] == 12 and out["spec"] == "fixed:5,mfixed:5,random:1,mrandom:1"
    res = run_cli("classify", "--models-dir", str(tiny_repo), "--model", "nope", str(img))
    assert res.returncode == 2 and "known models: tiny" in res.stderr
    res = run_cli(
        "classify", "--models-dir", str(tiny_repo), "--model", "tiny", "--views", "zoom:3", str(img)
    )
    assert res.returncode == 2 and "unknown view kind" in res.stderr


def test_classify_a_cascade(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    make_tiny_model(repo, "tiny2", input_size=80, crop_pct=0.875, seed=1, interpolation="bicubic")
    img = tmp_path / "x.png"
    img.write_bytes(image_bytes(120, 90, seed=3))

    def classify(model: str, views: str) -> subprocess.CompletedProcess[str]:
        return run_cli("classify", "--models-dir", str(repo), "--model", model, "--json",
                       "--views", views, "--seed", "1", "--top-k", "10", str(img))  # fmt: skip

    res = classify("tiny", "center|margin<1|tiny2:full,mfull")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["answered_by"] == ["tiny", "tiny2"] and out["views"] == 3
    assert [s["model"] for s in out["stages"]] == ["tiny", "tiny2"]
    assert out["view_equivalents"] > 1 + out["stages"][1]["views"]  # 80 px views cost more
    # ``last``: tiny2's own answer for its views (planned with its geometry)
    last = json.loads(classify("tiny", "center|margin<1|tiny2:center|last").stdout)
    own = json.loads(classify("tiny2", "center").stdout)
    assert last["answered_by"] == ["tiny2"] and last["view_boxes"][1] == own["view_boxes"][0]
    assert [t["prob"] for t in last["top"]] == pytest.approx([t["prob"] for t in own["top"]])
    res = classify("tiny", "center|margin<1|tiny3:center")  # before any image is read
    assert res.returncode == 2 and "'tiny3', which is not in the repository" in res.stderr
    assert res.stdout == ""
