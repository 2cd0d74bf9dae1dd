"""Tuning at load on the tiny real model: budget, agreement, cache, missing backends."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest

from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.load import load_engine
from app.runtime.plan import EngineOptions, ForwardPlan
from app.runtime.tuning.report import Trial, TuningReport
from app.runtime.tuning.tuner import chosen_plan, numeric_paths, tuned_engine
from tests.helpers import make_tiny_model


def _options(cache: Path, **changes: object) -> EngineOptions:
    base = EngineOptions(tune=True, tune_seconds=0.3, tune_cache_dir=cache)
    return base.with_changes(**changes)


def _report(engine: Engine) -> TuningReport:
    assert isinstance(engine.tuning, TuningReport)
    return engine.tuning


def test_tiny_model_tunes_and_serves_a_measured_plan(tiny_repo: Path, tmp_path: Path) -> None:
    engine = load_engine(ModelRepository(tiny_repo), "tiny", _options(tmp_path))
    report = _report(engine)
    assert report.source == "tuned" and report.budget_s == 0.3
    default = [t for t in report.trials if t.default]
    assert len(default) == 1 and default[0].views_per_s  # the current defaults, timed
    chosen = next(t for t in report.trials if t.plan == report.chosen)
    assert chosen.views_per_s and chosen.views_per_s >= default[0].views_per_s
    assert engine.plan == report.chosen or engine.plan.backend == "torch"
    assert "<- chosen" in report.table()
    # every measured plan agreed with float32
    for t in report.trials:
        if t.views_per_s:
            assert t.max_prob_diff is not None and t.max_prob_diff <= 0.1


def test_no_budget_times_nothing_and_serves_the_defaults(tiny_repo: Path, tmp_path: Path) -> None:
    options = _options(tmp_path, tune_seconds=0.0)
    engine = load_engine(ModelRepository(tiny_repo), "tiny", options)
    report = _report(engine)
    assert all(t.views_per_s is None for t in report.trials)
    assert report.chosen == options.forward_plan("cpu")


def test_second_load_uses_the_cache_and_a_new_key_tunes_again(
    tiny_repo: Path, tmp_path: Path
) -> None:
    repo = ModelRepository(tiny_repo)
    first = _report(load_engine(repo, "tiny", _options(tmp_path)))
    again = load_engine(repo, "tiny", _options(tmp_path))
    assert _report(again).source == "cached" and _report(again).chosen == first.chosen
    assert again.plan.chunk_views == first.chosen.chunk_views
    # a setting that fixes a dimension changes the candidate space, so the key
    forced = _report(load_engine(repo, "tiny", _options(tmp_path, chunk_views=4)))
    assert forced.source == "tuned" and forced.key != first.key
    assert {t.plan.chunk_views for t in forced.trials} == {4}
    # so do new weights under the same name
    other = tmp_path / "other"
    make_tiny_model(other, "tiny", seed=3)
    retrained = _report(load_engine(ModelRepository(other), "tiny", _options(tmp_path)))
    assert retrained.source == "tuned" and retrained.key != first.key


def test_a_candidate_that_computes_something_else_is_rejected(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """Every path but the default's runs a network with other weights: a real forward
    that disagrees with float32, and the tuner must not serve it however fast it is."""
    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    make_tiny_model(tmp_path / "m", "tiny", seed=7)
    wrong = ModelRepository(tmp_path / "m").load("tiny", "cpu")
    options = _options(tmp_path)
    default = options.forward_plan("cpu")
    paths = numeric_paths(options, model.device, default, options.tune_seconds)
    if len(paths) < 2:
        pytest.skip("one numeric path on this machine (no native bf16, no openvino)")

    def factory(plan: ForwardPlan) -> Engine:
        same = (plan.backend, plan.dtype) == (default.backend, default.dtype)
        return Engine(model if same else wrong, options, plan)

    report = _report(tuned_engine(model, options, factory))
    for t in report.trials:
        if (t.plan.backend, t.plan.dtype) != (default.backend, default.dtype):
            assert t.status.startswith(("rejected", "skipped")), t
            assert t.views_per_s is None
    assert (report.chosen.backend, report.chosen.dtype) == (default.backend, default.dtype)


def test_a_disagreeing_default_falls_back_to_float32(tiny_repo: Path, tmp_path: Path) -> None:
    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    make_tiny_model(tmp_path / "m", "tiny", seed=7)
    wrong = ModelRepository(tmp_path / "m").load("tiny", "cpu")
    options = _options(tmp_path, backend="torch")
    report = _report(tuned_engine(model, options, lambda plan: Engine(wrong, options, plan)))
    assert all(t.status.startswith("rejected") for t in report.trials if t.plan.chunk_views)
    assert (report.chosen.backend, report.chosen.dtype) == ("torch", "float32")


def test_a_backend_that_is_not_installed_is_skipped_with_a_log_line(
    tiny_repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    caplog.set_level(logging.INFO)
    engine = load_engine(ModelRepository(tiny_repo), "tiny", _options(tmp_path))
    report = _report(engine)
    ov = [t for t in report.trials if t.plan.backend == "openvino"]
    assert ov and all("openvino is not installed" in t.status for t in ov)
    assert "openvino is not installed" in caplog.text
    assert engine.plan.backend == "torch"
    # forced by a setting, it is served by torch, with a log line too
    caplog.clear()
    plan = dataclasses.replace(EngineOptions().forward_plan("cpu"), backend="openvino")
    forced = Engine(ModelRepository(tiny_repo).load("tiny", "cpu"), EngineOptions(), plan)
    assert forced.plan.backend == "torch" and "runs on torch" in caplog.text


def _timed(rates: dict[tuple[str, int, int, int], float], default: ForwardPlan) -> list[Trial]:
    """Measured trials: (dtype, workers, threads, chunk_views) -> views/s, and the default."""
    trials = [
        Trial(ForwardPlan(w, t, c, dtype, "openvino"), views_per_s=v, status="measured")
        for (dtype, w, t, c), v in rates.items()
    ]
    return [*trials, Trial(default, views_per_s=500.0, status="measured", default=True)]


def test_of_plans_as_fast_within_noise_the_most_views_per_forward_is_served() -> None:
    """Raw timing misses what serving pays per forward: at equal speed, larger forwards."""
    default = ForwardPlan(2, 1, 8, "bfloat16", "torch")
    near = {("int8", 2, 1, 4): 678.0, ("int8", 2, 1, 8): 672.0, ("int8", 2, 1, 16): 626.0}
    assert chosen_plan(_timed(near, default)) == ForwardPlan(2, 1, 8, "int8", "openvino")
    apart = {**near, ("int8", 2, 1, 8): 600.0}  # more than noise slower: the fastest
    assert chosen_plan(_timed(apart, default)) == ForwardPlan(2, 1, 4, "int8", "openvino")
    # only on the fastest plan's own path and team: another team's large forward is not it
    other_team = {**apart, ("int8", 1, 2, 16): 670.0, ("bfloat16", 2, 1, 16): 675.0}
    assert chosen_plan(_timed(other_team, default)) == ForwardPlan(2, 1, 4, "int8", "openvino")
    slow = {("int8", 2, 1, 4): 510.0, ("int8", 2, 1, 16): 505.0}  # within noise of the default
    assert chosen_plan(_timed(slow, default)) == default
