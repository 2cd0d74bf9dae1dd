"""The bench's arithmetic, apart from any timing: unit counting and round summaries."""

from __future__ import annotations

import pytest

from app.bench.server_load import HttpRound, summarize_rounds
from app.bench.timing import timed_loop


def test_timed_loop_counts_units_after_one_warm_up_call() -> None:
    calls: list[int] = []

    def one() -> int:
        calls.append(1)
        return 3

    rate = timed_loop(one, duration_s=0.0, min_iters=4)
    assert len(calls) == 5 and rate > 0  # warm-up + 4 timed calls


def test_rounds_are_summed_and_latencies_pooled() -> None:
    rounds = [HttpRound(10, [0.1, 0.3], 0, 1.0), HttpRound(30, [0.2], 1, 1.0)]
    s = summarize_rounds(rounds)
    assert s["views_per_s"] == pytest.approx(20.0) and s["requests_per_s"] == pytest.approx(1.5)
    assert s["p50_ms"] == pytest.approx(200.0) and s["errors"] == 1
