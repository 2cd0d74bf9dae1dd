"""`midserve bench` runs end to end and reports every field the performance issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import image_bytes, run_cli

FIELDS = {
    "gemm_gflops",
    "model_gflops_per_view",
    "bound_views_per_s",
    "raw_forward_views_per_s",
    "engine_views_per_s",
    "naive_views_per_s",
    "efficiency",
    "speedup_vs_naive",
    "http_views_per_s_c8",
    "http_p50_ms_c8",
    "http_p99_ms_c8",
    "http_overhead",
    "http_v2_batched_c8",
    "v2_vs_v1_images_per_s_c8",
    "gemm_gflops_bfloat16",
    "raw_forward_by_backend",
    "tuned_plan",
    "tuning_table",
    "tuned_engine_views_per_s",
    "tuned_vs_naive",
    "tuned_vs_fp32_bound",
}


@pytest.mark.slow
def test_bench_reports_all_fields(tiny_repo: Path, tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(100 + 10 * i, 90, seed=i))
    res = run_cli(
        "bench",
        "--models-dir",
        str(tiny_repo),
        "--model",
        "tiny",
        "--data",
        str(tmp_path),
        "--duration",
        "0.3",
        "--views",
        "4",
        "--threads",
        "1",
        "--full-spec",
        "full@96,mfull@96",
        "--tune-seconds",
        "0.3",
        "--tune-cache-dir",
        str(tmp_path / "tuning"),
        # its server runs the production default, tuned (from the bench's own cache)
        env={"MIDSERVE_TUNE": "true"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(result) >= FIELDS
    assert result["tuning_source"] == "tuned" and result["raw_forward_by_backend"]["torch_float32"]
    assert result["model_gflops_per_view"] > 0 and result["bound_views_per_s"] > 0
    assert result["views"] == 4 and result["http_batched_c8"]["errors"] == 0
    assert result["http_v2_batched_c8"]["errors"] == 0 and result["v2_vs_v1_images_per_s_c8"] > 0
    assert (
        abs(result["efficiency"] * result["bound_views_per_s"] - result["engine_views_per_s"])
        < 1e-2 * result["engine_views_per_s"] + 1e-3
    )
    # a crop policy and a whole-image one, by images and by pixels
    crops, full = result["policy_crops"], result["policy_full"]
    assert crops["spec"] == result["spec"] and full["spec"] == "full@96:1,mfull@96:1"
    assert crops["view_equivalents_per_s"] == pytest.approx(4 * crops["images_per_s"], rel=0.01)
    assert full["view_equivalents_per_s"] > 2 * full["images_per_s"] > 0  # 96 px > 64 px views
    agreement = result.get("agreement_vs_float32") or result["bfloat16_agreement"]
    assert 0.0 <= agreement["top1_agreement"] <= 1.0


@pytest.mark.slow
def test_bench_ceiling_runs_both_servers_on_every_workload(tiny_repo: Path, tmp_path: Path) -> None:
    """The ceiling run: the served settings and the older per-image path, two real servers,
    every workload answered without errors, the ratios computed from the table itself, and
    the served server on the plan whose raw forward the bench measured."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(120 + 10 * i, 90, fmt="JPEG", seed=i))
    cache = tmp_path / "tuning"
    res = run_cli(
        "bench", "--ceiling", "--models-dir", str(tiny_repo), "--model", "tiny",
        "--data", str(tmp_path), "--duration", "0.6", "--tune-seconds", "0.3",
        "--tune-cache-dir", str(cache),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    table, raw = result["ceiling_http"], result["raw_served_plan_views_per_s"]
    workloads = ["ten_views_c1", "ten_views_c8", "center_c8", "center_12mp_c8",
                 "center_thumbnail_c8"]  # fmt: skip
    assert set(table) == {f"{w}_{side}" for w in workloads for side in ("served", "previous")}
    for name, row in table.items():
        assert row["errors"] == 0 and row["requests_per_s"] > 0, (name, row)
        views = 10 if name.startswith("ten_views") else 1
        assert row["views_per_s"] == pytest.approx(views * row["requests_per_s"], rel=0.01), name
    assert raw > 0 and result["served_plan"]
    assert result["ten_views_c8_of_raw_forward"] == round(
        table["ten_views_c8_served"]["views_per_s"] / raw, 3
    )
    for w in workloads:
        a, b = table[f"{w}_served"]["requests_per_s"], table[f"{w}_previous"]["requests_per_s"]
        assert result[f"{w}_served_vs_previous"] == pytest.approx(a / b, abs=1e-3)
    # one tuning, the bench's (its budget): the servers found its plan under the same key
    (plan,) = cache.rglob("*.json")
    assert json.loads(plan.read_text())["budget_s"] == 0.3
