"""The real server over a real socket, as deployed: ``midserve serve`` in a subprocess,
tuned at load (tests/server.py). The in-process app (test_service.py) checks the API in
depth; this checks that the served process answers the same and batches across
connections.

The tuner may serve the tiny model with the OpenVINO float32 backend, whose outputs differ
from torch's float32 by about 1e-6: probabilities are compared within a tolerance."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.runtime.engine import Engine
from app.tta.views import default_policy, parse_view_spec
from tests.helpers import assert_same_top, classify, image_bytes
from tests.server import running_server, scrape, total

pytestmark = pytest.mark.slow

CLASSIFY = "/v1/models/tiny/classify"
ENV = {"MIDSERVE_MAX_WAIT_MS": "30", "MIDSERVE_MAX_BATCH_VIEWS": "48"}


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(tiny_repo, env=ENV, log_path=log) as base:
        yield base


def test_the_served_process_is_tuned_and_ready(server: str) -> None:
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server + "/readyz").json()["models"]["tiny"]["state"] == "ready"
    one = httpx.get(server + "/v1/models/tiny").json()
    # the production default: tuned at load (or read from the session's tuning cache)
    assert one["tuning"]["source"] in ("tuned", "cached") and one["tuning"]["budget_s"] == 0.5
    assert one["dtype"] == "float32" and one["plan"] == one["tuning"]["chosen"]
    samples = scrape(server)
    assert total(samples, "midserve_forward_plan_info", model="tiny") == 1
    source = one["tuning"]["source"]
    assert total(samples, "midserve_forward_plan_info", model="tiny", source=source) == 1


def test_raw_and_multipart_answers_match_the_float32_engine(
    server: str, tiny_engine: Engine
) -> None:
    data = image_bytes(120, 90, seed=1)
    multi = httpx.post(
        server + CLASSIFY,
        params={"views": "fixed:5,random:2", "seed": 4},
        files=[("images", ("a.png", data, "image/png"))],
    ).json()["results"][0]
    raw = httpx.post(
        server + CLASSIFY + "?views=fixed:5,random:2&seed=4",
        content=data,
        headers={"content-type": "image/png"},
    ).json()["results"][0]
    assert multi["file"] == "a.png" and raw["file"] is None
    assert multi["view_boxes"] == raw["view_boxes"]
    assert_same_top(multi["top"], raw["top"])
    local = classify(tiny_engine, data, parse_view_spec("fixed:5,random:2"), top_k=5, seed=4)
    assert_same_top(multi["top"], local.top)


def test_concurrent_connections_share_forwards(server: str, tiny_engine: Engine) -> None:
    before = scrape(server)
    cases = [(image_bytes(90 + i, 70 + i, seed=200 + i), (3, 10)[i % 2], 300 + i)
             for i in range(12)]  # fmt: skip

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(
                client.post(CLASSIFY, params={"crops": c, "seed": s, "top_k": 3}, content=d,
                            headers={"content-type": "image/png"})
                for d, c, s in cases
            ))  # fmt: skip

    responses = asyncio.run(fire())
    for (data, crops, seed), res in zip(cases, responses, strict=True):
        assert res.status_code == 200, res.text
        got = res.json()["results"][0]
        assert got["views"] == crops and got["seed"] == seed
        assert_same_top(got["top"], classify(tiny_engine, data, default_policy(crops), top_k=3,
                                             seed=seed).top)  # fmt: skip
    after = scrape(server)

    def moved(name: str) -> float:
        return total(after, name) - total(before, name)

    assert moved("midserve_batch_views_sum") == sum(c for _, c, _ in cases)
    assert moved("midserve_batch_requests_count") < 12  # requests shared forward passes
