"""Servers as in production: tuned at load. The first server on an empty tuning cache
measures its candidates and reports the table; a second server on the same cache reads it
(source ``cached``) and serves the plan the first one chose."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server import running_server, scrape, total

pytestmark = pytest.mark.slow


def test_first_server_tunes_and_a_second_one_reads_the_cache(
    tiny_repo: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    # tuning on with the suite's 0.5 s budget (tests/server.py); the dtype left to the tuner
    env = {"MIDSERVE_TUNE_CACHE_DIR": str(cache), "MIDSERVE_DTYPE": "auto"}
    seen = {}
    for source in ("tuned", "cached"):
        with running_server(tiny_repo, env=env, log_path=tmp_path / f"{source}.log") as base:
            body = httpx.get(f"{base}/v1/models/tiny", timeout=10).json()
            tuning = body["tuning"]
            assert tuning["source"] == source and tuning["budget_s"] == 0.5
            chosen = [c for c in tuning["candidates"] if c["chosen"]]
            assert len(chosen) == 1 and chosen[0]["plan"] == body["plan"] == tuning["chosen"]
            assert any(c["default"] for c in tuning["candidates"])
            samples = scrape(base)
            plan = {"model": "tiny", "source": source}
            assert total(samples, "midserve_forward_plan_info", **plan) == 1
            assert total(samples, "midserve_forward_plan_info", model="tiny") == 1  # one plan
            assert total(samples, "midserve_tuning_views_per_second", model="tiny", chosen="1") > 0
            seen[source] = tuning
        assert list(cache.glob("*.json")), "the tuned plan was not cached"
    # the second server serves the first one's choice, with the first one's measurements
    assert seen["cached"]["chosen"] == seen["tuned"]["chosen"]
    assert seen["cached"]["candidates"] == seen["tuned"]["candidates"]
