"""Overload and deadlines against the real app (in process) with a tiny queue."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers import image_bytes
from tests.inprocess import Call, concurrently, in_process_app, tiny_settings
from tests.server import scrape, total

CLASSIFY = "/v1/models/tiny/classify"


def test_burst_over_a_tiny_queue_gets_503_with_retry_after(tiny_repo: Path) -> None:
    settings = tiny_settings(tiny_repo, max_queue_views=20, max_wait_ms=150, max_batch_views=40)
    data = [image_bytes(80, 80, seed=i) for i in range(24)]

    def call(d: bytes) -> Call:
        return lambda http: http.post(
            CLASSIFY, params={"crops": 10, "seed": 1}, content=d,
            headers={"content-type": "image/png"},
        )  # fmt: skip

    with in_process_app(settings) as client:
        responses = concurrently(client, [call(d) for d in data])
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "overloaded"
            else:
                assert r.json()["results"][0]["views"] == 10
        # every accepted request was answered: views run == views of the 200s
        ran = total(scrape(client), "midserve_batch_views_sum")
        assert ran == 10 * codes.count(200)
        assert client.get("/readyz").status_code == 200


def test_deadline_gives_504_and_drops_the_work(tiny_repo: Path) -> None:
    settings = tiny_settings(tiny_repo, request_timeout_s=0.1, max_wait_ms=600, max_batch_views=40)
    with in_process_app(settings) as client:
        res = client.post(
            CLASSIFY,
            params={"crops": 10},
            content=image_bytes(),
            headers={"content-type": "image/png"},
        )
        assert res.status_code == 504 and res.json()["error"]["type"] == "deadline_exceeded"
        time.sleep(0.8)
        metrics = scrape(client)
        assert total(metrics, "midserve_batch_views_sum") == 0  # the forward never ran it
        assert total(metrics, "midserve_queue_views") == 0
