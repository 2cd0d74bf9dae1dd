"""Staged policies through the real app (in process): each image of a request goes on by its
own gate, bad gates are 4xx, and an overloaded second stage fails only its request."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import image_bytes
from tests.inprocess import concurrently, in_process_app, tiny_settings

SECOND = "full@96,mfull@96"
IMAGES = [image_bytes(90 + 7 * i, 70 + 5 * i, seed=i) for i in range(4)]  # the api limit: 4


def _classify(client: TestClient, images: list[bytes], views: str) -> httpx.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post("/v1/models/tiny/classify", params={"views": views, "seed": 1},
                       files=files)  # fmt: skip


def test_each_image_of_a_request_goes_on_by_its_own_gate(api: TestClient) -> None:
    everyone = _classify(api, IMAGES, f"center|margin<1|{SECOND}").json()["results"]
    signals = [r["stages"][1]["signal"] for r in everyone]
    ordered = sorted(set(signals))
    assert len(ordered) >= 3
    threshold = round((ordered[1] + ordered[2]) / 2, 6)
    gated = _classify(api, IMAGES, f"center|margin<{threshold}|{SECOND}").json()["results"]
    went_on = [r["stages"][1]["ran"] for r in gated]
    assert went_on == [s < threshold for s in signals] and 0 < sum(went_on) < len(IMAGES)
    for i, result in enumerate(gated):
        alone = _classify(api, [IMAGES[i]], f"center|margin<{threshold}|{SECOND}").json()
        mine, own = result["top"], alone["results"][0]["top"]  # its own answer, no neighbour's
        assert [t["index"] for t in mine] == [t["index"] for t in own]
        assert [t["prob"] for t in mine] == pytest.approx([t["prob"] for t in own], abs=1e-5)
        assert result["views"] == (3 if went_on[i] else 1)
        assert result["view_equivalents"] == pytest.approx(
            everyone[i]["view_equivalents"] if went_on[i] else 1.0
        )
        assert result["policy"] == f"center:1|margin<{threshold:g}|full@96:1,mfull@96:1"
    metrics = api.get("/metrics").text
    assert 'midserve_images_escalated_total{model="tiny",stage="2"}' in metrics
    assert 'midserve_gate_signal_count{model="tiny",signal="margin"}' in metrics


@pytest.mark.parametrize(
    ("views", "says"),
    [
        ("center|margin<2|full@96", "between 0 and 1"),
        ("center|entropy<0.5|full@96", "SIGNAL<THRESHOLD"),
        ("center|margin<0.5", "alternate stages and gates"),
        ("center|margin<0.5|auto", "cannot be 'auto'"),
        ("center|margin<0.5|random:50", "views requested; the limit is 40"),
    ],
)
def test_a_bad_staged_policy_is_a_clear_4xx(api: TestClient, views: str, says: str) -> None:
    res = _classify(api, IMAGES[:1], views)
    assert res.status_code == 422
    assert says in res.json()["error"]["message"]


def test_a_second_stage_that_does_not_fit_the_queue_fails_only_its_request(
    tiny_repo: Path,
) -> None:
    # one center view fits the queue, the second stage (two whole images, > 4.5 views of
    # 64 px) never does: the staged request gets a 503, a plain one beside it its answer
    settings = tiny_settings(tiny_repo, max_queue_views=3, max_wait_ms=20)
    with in_process_app(settings) as client:

        async def staged(http: httpx.AsyncClient) -> httpx.Response:
            files = {"images": ("a.png", IMAGES[0], "image/png")}
            params = {"views": f"center|margin<1|{SECOND}"}
            return await http.post("/v1/models/tiny/classify", params=params, files=files)

        async def plain(http: httpx.AsyncClient) -> httpx.Response:
            files = {"images": ("b.png", IMAGES[1], "image/png")}
            return await http.post("/v1/models/tiny/classify", params={"views": "center"},
                                   files=files)  # fmt: skip

        refused, answered = concurrently(client, [staged, plain])
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "the next stage of this image" in refused.json()["error"]["message"]
        assert answered.status_code == 200 and answered.json()["results"][0]["top"]
        assert client.get("/readyz").status_code == 200
