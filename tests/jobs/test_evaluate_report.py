"""Report statistics and the eval.json contract the server reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.errors import EvalResultsError
from app.eval_results import EvalResult, read_eval_results, write_eval_results
from app.jobs.evaluate.tables import bootstrap_diff_ci, crop_statistics, mcnemar_exact, paired


def test_mcnemar_exact_matches_the_binomial_by_hand() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 2) == pytest.approx(0.5)  # 2 * (1/4)
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)
    assert mcnemar_exact(3, 3) == 1.0


def test_paired_counts_fixed_and_broken_images() -> None:
    base = np.array([1, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    conf = np.array([1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    p = paired(conf, base)
    assert (p.fixed, p.broken) == (3, 1)
    assert p.diff == pytest.approx(2 / 8)
    assert p.ci_low <= p.diff <= p.ci_high and p.ci_low >= -1 and p.ci_high <= 1


def test_bootstrap_interval_is_a_point_when_nothing_differs() -> None:
    a = np.array([1, 0, 1, 1], dtype=bool)
    assert bootstrap_diff_ci(a, a) == (0.0, 0.0)
    low, high = bootstrap_diff_ci(np.ones(50, bool), np.zeros(50, bool))
    assert low == high == 1.0


def test_crop_statistics_measure_the_room_around_the_crop() -> None:
    stats = crop_statistics([(224, 224), (256, 224), (256, 256), (341, 256)], 224, 256)
    assert stats["no_room"] == 1 and stats["room_one_axis_only"] == 1
    assert stats["crop_to_image_ratio"] == 0.875
    assert stats["aspect_histogram"]["1-1.1"] == 2 and stats["aspect_histogram"]["1.1-1.25"] == 1
    assert stats["aspect_histogram"]["1.25-1.5"] == 1
    assert stats["crop_area_fraction_quantiles"]["p100"] == 1.0


def _result(config: str, dataset: str = "val", top1: float = 0.5) -> EvalResult:
    return EvalResult("m", config, dataset, top1=top1, top5=0.9, images=10)


def test_eval_json_round_trip_and_merge(tmp_path: Path) -> None:
    assert read_eval_results(tmp_path) == []
    write_eval_results(tmp_path, "m", [_result("center:1@softmax"), _result("auto@softmax")])
    write_eval_results(tmp_path, "m", [_result("auto@softmax", top1=0.7), _result("x", "other")])
    got = {(r.dataset, r.config): r for r in read_eval_results(tmp_path)}
    assert sorted(got) == [("other", "x"), ("val", "auto@softmax"), ("val", "center:1@softmax")]
    assert got[("val", "auto@softmax")].top1 == 0.7
    assert math.isnan(got[("val", "auto@softmax")].mean_views)  # written as null, read as NaN
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["schema"] == "midserve.eval/1" and doc["results"][0]["mean_views"] is None


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"schema": "other", "results": []}',
        '{"schema": "midserve.eval/1", "results": {}}',
        '{"schema": "midserve.eval/1", "results": [{"model": "m"}]}',
        '{"schema": "midserve.eval/1", "results": [{"model": "m", "config": "c", '
        '"dataset": "d", "top1": 93, "top5": 1, "images": 3}]}',
    ],
)
def test_malformed_eval_json_is_a_domain_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "eval.json").write_text(text)
    with pytest.raises(EvalResultsError):
        read_eval_results(tmp_path)
