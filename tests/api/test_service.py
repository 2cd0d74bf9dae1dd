"""The real app in process (tests/inprocess.py): endpoints, batching across requests,
metrics. tests/api/test_server_process.py runs the same over a real socket."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from app.runtime.engine import Engine
from app.tta.views import default_policy, parse_view_spec
from tests.helpers import assert_same_top, classify, image_bytes
from tests.inprocess import Call, concurrently, in_process_app, tiny_settings
from tests.server import scrape, total

CLASSIFY = "/v1/models/tiny/classify"


def test_probes_models_and_docs(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"]["tiny"]["state"] == "ready"
    models = api.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny"]
    one = api.get("/v1/models/tiny").json()
    assert one["input_size"] == 64 and one["resize_size"] == 80
    assert "batch norms folded" in one["fusion"]  # the served network is the rewritten one
    assert (
        one["default_views"] == "fixed:5,mfixed:5" and one["limits"]["max_views_per_request"] == 40
    )
    docs = api.get("/docs").text
    assert "/static/docs/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert api.get("/static/docs/swagger-ui-bundle.js").status_code == 200
    spec = api.get("/openapi.json").json()
    assert "/v1/models/{model}/classify" in spec["paths"]
    assert api.get("/metrics").headers["content-type"].startswith("text/plain")


def test_multipart_and_raw_body_agree(api: TestClient, tiny_engine: Engine) -> None:
    data = image_bytes(120, 90, seed=1)
    multi = api.post(
        CLASSIFY,
        params={"views": "fixed:5,random:2", "seed": 4},
        files=[("images", ("a.png", data, "image/png"))],
    ).json()
    raw = api.post(
        CLASSIFY + "?views=fixed:5,random:2&seed=4",
        content=data,
        headers={"content-type": "image/png"},
    ).json()
    a, b = multi["results"][0], raw["results"][0]
    assert a["file"] == "a.png" and b["file"] is None
    assert a["view_boxes"] == b["view_boxes"]
    assert_same_top(a["top"], b["top"])
    local = classify(tiny_engine, data, parse_view_spec("fixed:5,random:2"), top_k=5, seed=4)
    assert [t["index"] for t in a["top"]] == [t.index for t in local.top]
    assert set(a["timings_ms"]) == {"decode", "preprocess", "queue_wait", "forward", "postprocess"}


def test_form_fields_carry_parameters(api: TestClient) -> None:
    data = image_bytes(100, 100, seed=2)
    res = api.post(
        CLASSIFY,
        data={"crops": "3", "level": "logit", "top_k": "2"},
        files=[("images", ("x.png", data, "image/png"))],
    )
    body = res.json()["results"][0]
    assert res.status_code == 200 and body["views"] == 3 and body["level"] == "logit"
    assert len(body["top"]) == 2 and body["spec"] == "center:1,random:1,mrandom:1"


def test_32_concurrent_requests_are_batched_and_correct(
    api: TestClient, tiny_engine: Engine
) -> None:
    before = scrape(api)
    cases = []
    for i in range(32):
        crops = (1, 3, 7, 10, 14)[i % 5]
        level = ("feature", "logit", "softmax")[i % 3]
        cases.append((image_bytes(90 + i, 70 + 2 * i, seed=100 + i), crops, level, 1000 + i))

    def call(d: bytes, c: int, lv: str, s: int) -> Call:
        params = {"crops": c, "level": lv, "seed": s, "top_k": 3}
        return lambda http: http.post(
            CLASSIFY, params=params, files=[("images", ("i.png", d, "image/png"))]
        )

    responses = concurrently(api, [call(*case) for case in cases])
    for (data, crops, level, seed), res in zip(cases, responses, strict=True):
        assert res.status_code == 200, res.text
        got = res.json()["results"][0]
        want = classify(tiny_engine, data, default_policy(crops), level=level, top_k=3, seed=seed)
        assert got["views"] == crops and got["seed"] == seed
        assert [t["index"] for t in got["top"]] == [t.index for t in want.top]
        torch.testing.assert_close(
            torch.tensor([t["prob"] for t in got["top"]]),
            torch.tensor([t.prob for t in want.top]),
            rtol=1e-4,
            atol=1e-5,
        )
    after = scrape(api)
    forwards = total(after, "midserve_batch_requests_count") - total(
        before, "midserve_batch_requests_count"
    )
    requests_in_forwards = total(after, "midserve_batch_requests_sum") - total(
        before, "midserve_batch_requests_sum"
    )
    views = total(after, "midserve_batch_views_sum") - total(before, "midserve_batch_views_sum")
    assert views == sum(c for _, c, _, _ in cases)  # every view ran exactly once
    # requests shared forward passes: fewer forwards than request pieces
    assert forwards < 32 and requests_in_forwards / forwards > 1.5, (forwards, requests_in_forwards)


def test_metrics_histograms_and_accuracy_counters(api: TestClient) -> None:
    before = scrape(api)
    data = [image_bytes(80, 80, seed=s) for s in range(3)]
    # learn what the model predicts, then label one image right and two wrong
    first = api.post(
        CLASSIFY,
        params={"crops": 5},
        files=[("images", ("a.png", d, "image/png")) for d in data],
    ).json()
    tops = [r["top"] for r in first["results"]]
    right = tops[0][0]["index"]
    outside_top5 = [i for i in range(10) if i not in [t["index"] for t in tops[1]]][0]
    second_in_top5 = tops[2][1]["index"]  # rank 2: a top-5 hit, not a top-1 hit
    labels = f"{right},{outside_top5},{second_in_top5}"
    res = api.post(
        CLASSIFY,
        params={"crops": 5, "label": labels},
        files=[("images", ("a.png", d, "image/png")) for d in data],
    )
    assert res.status_code == 200
    after = scrape(api)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    sel = {"model": "tiny", "level": "softmax", "policy": "fixed:5"}
    assert moved("midserve_labelled_images_total", **sel) == 3
    assert moved("midserve_top1_hits_total", **sel) == 1
    assert moved("midserve_top5_hits_total", **sel) == 2
    assert moved("midserve_views_per_request_count", model="tiny") == 6
    assert moved("midserve_views_per_request_sum", model="tiny") == 30
    # compute in view-equivalents: 5 crops at the model's input size are 5 per image
    assert moved("midserve_view_equivalents_per_request_sum", model="tiny") == 30
    ok = {"model": "tiny", "level": "softmax", "status": "200"}
    assert moved("midserve_request_duration_seconds_count", **ok) == 2
    for stage in ("decode", "preprocess", "queue_wait", "forward", "postprocess"):
        assert moved("midserve_stage_duration_seconds_count", model="tiny", stage=stage) == 6
    # buckets are cumulative and end at +Inf == count
    buckets = sorted(
        (float(k.split('le="')[1].split('"')[0]), v) for k, v in after.items()
        if k.startswith("midserve_stage_duration_seconds_bucket") and 'stage="forward"' in k
    )  # fmt: skip
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0] == float("inf")
    assert buckets[-1][1] == total(
        after, "midserve_stage_duration_seconds_count", model="tiny", stage="forward"
    )
    assert total(after, "midserve_model_info", model="tiny", arch="test_efficientnet") == 1
    assert total(after, "midserve_model_ready", model="tiny") == 1
    assert moved("midserve_requests_total", route="/v1/models/{model}/classify", status="200") == 2


def test_unready_model_reports_why(tmp_path: Path, tiny_repo: Path) -> None:
    """A model whose weights fail to load: the server starts and /readyz names it."""
    import shutil

    shutil.copytree(tiny_repo / "tiny", tmp_path / "tiny")
    shutil.copytree(tiny_repo / "tiny", tmp_path / "broken")
    (tmp_path / "broken" / "weights.safetensors").write_bytes(b"garbage")
    settings = tiny_settings(tmp_path, ["tiny", "broken"])
    with in_process_app(settings, wait_ready=False) as client:
        for _ in range(200):
            ready = client.get("/readyz").json()
            if (
                ready["models"]["broken"]["state"] != "loading"
                and ready["models"]["tiny"]["state"] != "loading"
            ):
                break
            time.sleep(0.1)
        assert ready["ready"] is False and ready["models"]["broken"]["state"] == "failed"
        assert ready["models"]["broken"]["error"]
        assert client.get("/readyz").status_code == 503
        res = client.post(
            "/v1/models/broken/classify",
            content=image_bytes(),
            headers={"content-type": "image/png"},
        )
        assert res.status_code == 503 and res.json()["error"]["type"] == "model_not_ready"
        ok = client.post(
            "/v1/models/tiny/classify",
            content=image_bytes(),
            headers={"content-type": "image/png"},
        )
        assert ok.status_code == 200


def test_auto_policy_spends_views_by_image_shape(api: TestClient, tiny_engine: Engine) -> None:
    from app.tta.adaptive import auto_policy

    for w, h in ((80, 80), (100, 80), (200, 80)):  # resized: 80x80, 100x80, 200x80
        data = image_bytes(w, h, seed=w)
        res = api.post(
            CLASSIFY,
            params={"views": "auto", "seed": 3},
            content=data,
            headers={"content-type": "image/png"},
        )
        body = res.json()["results"][0]
        want = auto_policy(w, h, 64)
        assert body["policy"] == "auto" and body["spec"] == str(want)
        assert body["views"] == want.total
        local = classify(tiny_engine, data, parse_view_spec("auto"), top_k=5, seed=3)
        assert [t["index"] for t in body["top"]] == [t.index for t in local.top]


def test_eval_results_become_gauges(api: TestClient, tiny_repo: Path) -> None:
    from app.eval_results import EvalResult, write_eval_results

    rows = [
        EvalResult("tiny", "center:1@softmax", "unit-set", 0.25, 0.75, 8),
        EvalResult("tiny", "auto@softmax", "unit-set", 0.5, 1.0, 8),
    ]
    write_eval_results(tiny_repo / "tiny", "tiny", rows)
    try:
        samples = scrape(api)  # read at scrape time: no restart needed
    finally:
        (tiny_repo / "tiny" / "eval.json").unlink()
    sel = {"model": "tiny", "dataset": "unit-set"}
    assert total(samples, "midserve_eval_top1", config="center:1@softmax", **sel) == 0.25
    assert total(samples, "midserve_eval_top5", config="auto@softmax", **sel) == 1.0
    assert total(samples, "midserve_eval_images", config="auto@softmax", **sel) == 8
