"""`midserve bench` runs end to end and reports every field the performance issue names."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import image_bytes, run_bench, run_cli

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
    result, _ = run_bench(
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
    if "skipped" not in agreement:  # a CPU without oneDNN's fused bf16 convolutions
        assert 0.0 <= agreement["top1_agreement"] <= 1.0
    budget = result["cpu_outside_network"]
    assert budget["client"] in ("hey", "httpx (hey not installed)")
    assert_cpu_budget_holds_together(budget, views=4)


def assert_cpu_budget_holds_together(budget: dict[str, Any], views: int) -> None:
    """Every case answered; per image, the thread groups and the remainder add up to the
    server's total, the remainder is no more than the total's clock ticks can hide, each
    named group did its work, and the ratios follow from the row's own numbers."""
    cases = budget["cases"]
    assert set(cases) == {"center_imagenet_c8", "center_12mp_c8", "default_imagenet_c8",
                          "default_12mp_c8", f"views{views}_imagenet_c8"}  # fmt: skip
    raw, per_view = budget["raw_forward_views_per_s"], budget["forward_cpu_ms_per_view"]
    assert raw > 0 and per_view > 0 and budget["served_plan"] and len(budget["photos"]) == 3
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    for name, row in cases.items():
        assert row["errors"] == 0 and row["requests"] > 0, (name, row)
        threads = row["threads_ms"]
        assert sum(threads.values()) == pytest.approx(row["server_ms"], abs=0.01), name
        # the total is read in clock ticks: two readings a window, utime and stime apart
        slack = 2 * 2 * budget["rounds"] * tick_ms / row["requests"]
        assert abs(threads["unattributed"]) <= slack + 0.01, (name, row)
        assert threads["edge+loop"] > 0 and threads["prep"] > 0 and threads["forward"] > 0, name
        assert min(v for k, v in threads.items() if k != "unattributed") >= 0
        assert row["outside_network_ms"] == pytest.approx(
            row["server_ms"] - threads["forward"], abs=0.002
        )
        veq = row["view_equivalents_per_image"]
        assert row["outside_network_ms_by_forward_cost"] == pytest.approx(
            row["server_ms"] - per_view * veq, abs=0.01
        )
        limit_share = row["images_per_s"] * veq / raw
        assert row["of_forward_limit"] == pytest.approx(limit_share, rel=0.01, abs=1e-3)
        assert row["client_ms"] > 0
    assert cases["center_imagenet_c8"]["view_equivalents_per_image"] == 1.0
    # the edge alone (the photo read, parameters refused) costs less than a classify
    assert 0 < budget["edge_only_ms"] < cases["center_imagenet_c8"]["server_ms"]
    assert cases[f"views{views}_imagenet_c8"]["views_per_image"] == views
    # a 12-megapixel JPEG is decoded on the preparation threads
    big, small = cases["center_12mp_c8"]["threads_ms"], cases["center_imagenet_c8"]["threads_ms"]
    assert big["prep"] > 2 * small["prep"]
    assert (
        budget["default_imagenet_of_forward_limit"]
        == cases["default_imagenet_c8"]["of_forward_limit"]
    )
    assert budget[f"views{views}_of_raw_forward"] == pytest.approx(
        cases[f"views{views}_imagenet_c8"]["views_per_s"] / raw, abs=1e-3
    )


@pytest.mark.slow
def test_bench_cpu_budget_with_the_httpx_client(tiny_repo: Path, tmp_path: Path) -> None:
    """The CPU budget alone, loaded by the bench's own httpx client (what runs where hey
    is not installed): the same section, the client's CPU this process's own."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(120 + 10 * i, 90, fmt="JPEG", seed=i))
    result, tables = run_bench(
        "--cpu-budget", "--cpu-client", "httpx", "--models-dir", str(tiny_repo),
        "--model", "tiny", "--data", str(tmp_path), "--duration", "0.6", "--views", "3",
        "--tune-seconds", "0.3", "--tune-cache-dir", str(tmp_path / "tuning"),
    )  # fmt: skip
    budget = result["cpu_outside_network"]
    assert budget["client"] == "httpx" and budget["concurrency"] == 8
    assert_cpu_budget_holds_together(budget, views=3)
    assert "outside*" in tables  # the table


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
