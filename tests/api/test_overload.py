"""Overload and deadlines against a real server with a tiny queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.helpers import image_bytes
from tests.server import running_server, scrape, total

CLASSIFY = "/v1/models/tiny/classify"


def test_burst_over_a_tiny_queue_gets_503_with_retry_after(tiny_repo: Path) -> None:
    env = {
        "MIDSERVE_MAX_QUEUE_VIEWS": "20",
        "MIDSERVE_MAX_WAIT_MS": "150",
        "MIDSERVE_MAX_BATCH_VIEWS": "40",
    }
    data = [image_bytes(80, 80, seed=i) for i in range(24)]
    with running_server(tiny_repo, env=env) as base:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(*(
                    client.post(CLASSIFY, params={"crops": 10, "seed": 1}, content=d,
                                headers={"content-type": "image/png"})
                    for d in data
                ))  # fmt: skip

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "overloaded"
            else:
                assert r.json()["results"][0]["views"] == 10
        # every accepted request was answered: views run == views of the 200s
        ran = total(scrape(base), "midserve_batch_views_sum")
        assert ran == 10 * codes.count(200)
        assert httpx.get(base + "/readyz").status_code == 200


def test_deadline_gives_504_and_drops_the_work(tiny_repo: Path) -> None:
    env = {
        "MIDSERVE_REQUEST_TIMEOUT_S": "0.1",
        "MIDSERVE_MAX_WAIT_MS": "600",
        "MIDSERVE_MAX_BATCH_VIEWS": "40",
    }
    with running_server(tiny_repo, env=env) as base:
        res = httpx.post(
            base + CLASSIFY,
            params={"crops": 10},
            content=image_bytes(),
            headers={"content-type": "image/png"},
            timeout=30,
        )
        assert res.status_code == 504 and res.json()["error"]["type"] == "deadline_exceeded"
        asyncio.run(asyncio.sleep(0.8))
        metrics = scrape(base)
        assert total(metrics, "midserve_batch_views_sum") == 0  # the forward never ran it
        assert total(metrics, "midserve_queue_views") == 0
