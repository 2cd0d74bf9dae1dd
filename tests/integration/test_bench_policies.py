"""`midserve bench --policies`: the model's own policy and a cascade on one real server."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from app.bench.cpu_budget import ROUNDS
from app.bench.policies import PHOTOS_PER_ROUND
from app.model_config import write_model_config
from tests.helpers import image_bytes, make_tiny_model, run_bench

CASCADE = "center|margin<1|tiny2:center"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed (apt-get install "
                    "hey): --policies loads the server with it")  # fmt: skip
def test_bench_policies_compares_the_default_and_a_cascade(tmp_path: Path) -> None:
    """tiny serves the center crop by default; the cascade always goes on (margin < 1) to
    tiny2 (80 px views, so more than one of tiny's view-equivalents): every image answered
    with tiny2's views, more compute per image than the default, both measured in one run."""
    models = tmp_path / "models"
    cfg = make_tiny_model(models, "tiny")
    write_model_config(dataclasses.replace(cfg, default_views="center"), models / "tiny")
    make_tiny_model(models, "tiny2", input_size=80, seed=1)  # the same 10 classes
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(image_bytes(120 + 10 * i, 90, fmt="JPEG", seed=i))
    result, tables = run_bench(
        "--policies", "default", CASCADE, "--models-dir", str(models),
        "--model", "tiny", "--data", str(photos), "--policy-duration", "0.3",
        "--tune-seconds", "0.3", "--tune-cache-dir", str(tmp_path / "tuning"),
    )  # fmt: skip
    section = result["policies"]
    assert section["client"] == "hey" and section["concurrency"] == 8
    assert section["models_served"] == ["tiny", "tiny2"]
    assert len(section["photos"]) == ROUNDS * PHOTOS_PER_ROUND  # the 3 photos, spread
    rows = section["policies"]
    assert list(rows) == ["default", CASCADE]
    default, cascade = rows["default"], rows[CASCADE]
    for row in rows.values():
        assert row["errors"] == 0 and row["requests"] > 0 and row["images_per_s"] > 0, row
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    assert default["views"] == "the model's default" and cascade["views"] == CASCADE
    assert default["view_equivalents_per_image"] == 1.0 and default["views_per_image"] == 1.0
    assert cascade["views_per_image"] == 2.0
    assert cascade["view_equivalents_per_image"] > 2.0 > default["view_equivalents_per_image"]
    assert default["answered_by_later_share"] == 0.0
    assert cascade["answered_by_later_share"] == 1.0
    assert default["images_per_s_vs_first"] == 1.0
    assert cascade["images_per_s_vs_first"] == pytest.approx(
        cascade["images_per_s"] / default["images_per_s"], abs=1e-3
    )
    assert "vs first" in tables  # the table


def test_a_policy_that_does_not_parse_stops_the_bench() -> None:
    """A bad spec is refused before any server starts, naming the spec."""
    from app.bench.policies import later_models

    assert later_models(["default", CASCADE, "center|margin<0.5|tiny3:full|last"]) == [
        "tiny2",
        "tiny3",
    ]
    with pytest.raises(SystemExit, match="margin<2"):
        later_models(["center|margin<2|tiny2:center"])
