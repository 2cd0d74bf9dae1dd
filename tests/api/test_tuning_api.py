"""A real server with tuning forced on reports what it tried and chose."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.server import running_server, scrape, total


def test_model_reports_its_tuning_table_and_plan_metric(tiny_repo: Path, tmp_path: Path) -> None:
    env = {
        "MIDSERVE_TUNE": "true",
        "MIDSERVE_TUNE_SECONDS": "0.3",
        "MIDSERVE_TUNE_CACHE_DIR": str(tmp_path / "cache"),
        "MIDSERVE_DTYPE": "auto",
    }
    with running_server(tiny_repo, env=env, log_path=tmp_path / "server.log") as base:
        body = httpx.get(f"{base}/v1/models/tiny", timeout=10).json()
        tuning = body["tuning"]
        assert tuning["source"] == "tuned" and tuning["budget_s"] == 0.3
        chosen = [c for c in tuning["candidates"] if c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["plan"] == body["plan"] == tuning["chosen"]
        assert any(c["default"] for c in tuning["candidates"])
        samples = scrape(base)
        assert total(samples, "midserve_forward_plan_info", model="tiny", source="tuned") == 1
        assert total(samples, "midserve_tuning_views_per_second", model="tiny", chosen="1") > 0
    assert (tmp_path / "cache").is_dir() and list((tmp_path / "cache").glob("*.json"))


def test_servers_in_the_suite_load_untuned(server: str) -> None:
    body = httpx.get(f"{server}/v1/models/tiny", timeout=10).json()
    assert body["tuning"] is None and body["plan"].startswith("torch float32")
