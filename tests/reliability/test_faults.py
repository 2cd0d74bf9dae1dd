"""Faults in the forward pass (app/serving/faults.py injects them; the tiny real model serves): the
requests of the failed batch get a clear 5xx JSON error, or are served after a retry where
the fault is transient; nothing else in flight is lost; each event is counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.serving.faults import FaultInjector, FaultPlan
from tests.helpers import image_bytes
from tests.inprocess import concurrently, in_process_app, tiny_settings
from tests.server import scrape, total

CLASSIFY = "/v1/models/tiny/classify"
PNG = {"content-type": "image/png"}


@contextlib.contextmanager
def faulty_app(repo: Path, faults: str, **settings: Any) -> Iterator[TestClient]:
    with in_process_app(tiny_settings(repo, fault_injection=faults, **settings)) as client:
        yield client


def injector(client: TestClient) -> FaultInjector:
    faults = client.app.state.service.slots["tiny"].faults  # type: ignore[attr-defined]
    assert faults is not None
    return faults


def post(client: TestClient, crops: int = 1, seed: int = 0) -> httpx.Response:
    return client.post(f"{CLASSIFY}?crops={crops}&seed={seed}", content=image_bytes(seed=seed),
                       headers=PNG)  # fmt: skip


async def _post(http: httpx.AsyncClient, crops: int, seed: int) -> httpx.Response:
    return await http.post(f"{CLASSIFY}?crops={crops}&seed={seed}",
                           content=image_bytes(seed=seed), headers=PNG)  # fmt: skip


def burst(client: TestClient, n: int, crops: int) -> list[httpx.Response]:
    return concurrently(client, [lambda h, i=i: _post(h, crops, i) for i in range(n)])


def test_a_spec_names_each_fault_and_a_bad_one_is_refused() -> None:
    plan = FaultPlan.parse("raise@2, hang@3:1.5, die@4, oom>8")
    assert plan is not None and plan.raise_at == {2} and plan.hang_at == {3: 1.5}
    assert plan.die_at == {4} and plan.oom_above == 8
    assert FaultPlan.parse("") is None
    with pytest.raises(ValueError, match="explode@1"):
        FaultPlan.parse("explode@1")


def test_a_forward_that_raises_fails_its_batch_only(tiny_repo: Path) -> None:
    # one request per forward (5 views each, 5 views a forward): forward 1 is one request's
    with faulty_app(tiny_repo, "raise@1", max_batch_views=5) as client:
        answers = burst(client, 6, crops=5)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * 5 + [500]
        (failed,) = (r for r in answers if r.status_code == 500)
        error = failed.json()["error"]
        assert error["type"] == "forward_failed" and "forward pass" in error["message"]
        assert post(client).status_code == 200  # the next forwards run
        m = scrape(client)
        assert total(m, "midserve_forward_faults_total", kind="raised") == 1
        assert total(m, "midserve_errors_total", type="forward_failed") == 1


def test_out_of_memory_splits_the_batch_and_every_request_is_answered(tiny_repo: Path) -> None:
    # every forward over 4 views runs out of memory: 10-view requests are served in halves
    with in_process_app(tiny_settings(tiny_repo, max_batch_views=10)) as clean:
        expected = [r.json()["results"][0]["top"] for r in burst(clean, 4, crops=10)]
    with faulty_app(tiny_repo, "oom>4", max_batch_views=10) as client:
        answers = burst(client, 4, crops=10)
        assert [r.status_code for r in answers] == [200] * 4
        for res, want in zip(answers, expected, strict=True):
            got = res.json()["results"][0]["top"]
            assert [t["index"] for t in got] == [t["index"] for t in want]
            assert [t["prob"] for t in got] == pytest.approx([t["prob"] for t in want], abs=1e-4)
        m = scrape(client)
        assert total(m, "midserve_forward_retries_total", reason="split") >= 4
        assert total(m, "midserve_forward_faults_total", kind="out_of_memory") >= 4


def test_a_dead_worker_is_replaced_and_its_batch_runs_again(tiny_repo: Path) -> None:
    with faulty_app(tiny_repo, "die@1") as client:
        res = post(client)
        assert res.status_code == 200 and res.json()["results"][0]["top"]
        assert [r.status_code for r in burst(client, 6, crops=2)] == [200] * 6
        m = scrape(client)
        assert total(m, "midserve_forward_worker_restarts_total", reason="died") == 1
        assert total(m, "midserve_forward_retries_total", reason="worker_died") == 1
        assert total(m, "midserve_forward_faults_total", kind="worker_died") == 1


def test_a_worker_that_dies_on_the_retry_too_gets_a_retryable_503(tiny_repo: Path) -> None:
    with faulty_app(tiny_repo, "die@1,die@2") as client:
        res = post(client)
        assert res.status_code == 503 and res.headers["retry-after"] == "1"
        assert res.json()["error"]["type"] == "forward_worker_died"
        assert post(client).status_code == 200  # two fresh workers serve on
        m = scrape(client)
        assert total(m, "midserve_forward_worker_restarts_total", reason="died") == 2


def test_a_hung_forward_does_not_hold_up_the_other_worker(tiny_repo: Path) -> None:
    with faulty_app(tiny_repo, "hang@1") as client:
        faults = injector(client)

        async def hung(http: httpx.AsyncClient) -> httpx.Response:
            return await _post(http, 1, 0)

        async def others(http: httpx.AsyncClient) -> list[httpx.Response]:
            await asyncio.to_thread(faults.hanging.wait, 60)
            answers = await asyncio.gather(*(_post(http, 1, i) for i in range(1, 5)))
            faults.release()  # then the hung forward returns and answers its request
            return list(answers)

        first, rest = concurrently(client, [hung, others])
        assert first.status_code == 200
        assert [r.status_code for r in rest] == [200] * 4


def test_a_stalled_forward_trips_the_watchdog_and_the_model_recovers(tiny_repo: Path) -> None:
    # forward 1 (the request) and forward 2 (the recovery probe) hang until released
    with faulty_app(tiny_repo, "hang@1,hang@2", forward_timeout_s=0.5) as client:
        res = post(client)
        assert res.status_code == 503 and res.headers["retry-after"] == "1"
        error = res.json()["error"]
        assert error["type"] == "forward_stalled" and "0.5 s" in error["message"]
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["models"]["tiny"]["state"] == "recovering"
        # the Open Inference Protocol's probes read the same state
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/tiny/ready").status_code == 503
        refused = post(client, seed=1)  # out of readiness: a retryable 503, not a hang
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "model_not_ready"
        m = scrape(client)
        assert total(m, "midserve_model_ready") == 0
        assert total(m, "midserve_forward_workers_stuck") >= 1

        injector(client).release()  # the probe answers: ready again
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model did not recover"
            time.sleep(0.05)
        assert post(client, seed=2).status_code == 200
        assert client.get("/v2/health/ready").json() == {"ready": True}
        m = scrape(client)
        assert total(m, "midserve_forward_faults_total", kind="stalled") == 1
        assert total(m, "midserve_forward_worker_restarts_total", reason="stalled") == 1
        assert total(m, "midserve_model_unready_total", reason="forward_stalled") == 1
        assert total(m, "midserve_model_recoveries_total") == 1
        assert total(m, "midserve_model_ready") == 1


def wait_for(check: Any, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_model_not_recovered_within_the_limit_fails_liveness_until_it_is(
    tiny_repo: Path,
) -> None:
    """The probe forward hangs too: past recovery_limit_s, /healthz and /v2/health/live go
    503 naming the model, so an orchestrator restarts the process; a probe that answers
    after all brings liveness and readiness back."""
    with faulty_app(tiny_repo, "hang@1,hang@2", forward_timeout_s=0.3,
                    recovery_limit_s=0.5) as client:  # fmt: skip
        assert client.get("/healthz").status_code == 200
        assert post(client).status_code == 503  # forward 1 stalls; the probe, forward 2, hangs
        wait_for(lambda: client.get("/healthz").status_code == 503, "liveness did not fail")
        body = client.get("/healthz").json()
        assert body["status"] == "unrecovered"
        assert "not recovered within 0.5 s" in body["models"]["tiny"]
        assert client.get("/v2/health/live").status_code == 503
        assert client.get("/v2/health/live").json() == {"live": False}
        assert total(scrape(client), "midserve_model_unrecovered", model="tiny") == 1

        injector(client).release()
        wait_for(lambda: client.get("/readyz").status_code == 200, "the model did not recover")
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/v2/health/live").json() == {"live": True}
        assert post(client, seed=1).status_code == 200
        m = scrape(client)
        assert total(m, "midserve_model_unrecovered", model="tiny") == 0
        assert total(m, "midserve_model_recoveries_total") == 1


def test_a_model_recovered_within_the_limit_never_fails_liveness(tiny_repo: Path) -> None:
    """The probe answers at once (only the request's forward hangs): readiness dips, and
    liveness stays 200 throughout, however long the stalled forward itself stays stuck."""
    with faulty_app(tiny_repo, "hang@1", forward_timeout_s=0.3, recovery_limit_s=0.5) as client:
        assert post(client).status_code == 503
        wait_for(lambda: client.get("/readyz").status_code == 200, "the model did not recover")
        time.sleep(0.6)  # past the limit, with forward 1 still hung
        assert client.get("/healthz").status_code == 200
        assert total(scrape(client), "midserve_model_unrecovered", model="tiny") == 0
        injector(client).release()
