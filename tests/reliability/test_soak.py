"""A small soak (bench/soak.py with 300 requests): mixed sizes, formats and view counts, no
errors. The full 10,000-request run is `python -m bench.soak` (not part of the test suite)."""

from __future__ import annotations

import pytest

from bench.soak import run_soak


@pytest.mark.slow
def test_300_mixed_requests_all_succeed() -> None:
    result = run_soak(requests=300, concurrency=8, window=100)
    assert result.statuses == {"200": 300} and result.errors == 0
    assert result.latency_ms["first"]["p99"] > 0 and result.latency_ms["last"]["p99"] > 0
