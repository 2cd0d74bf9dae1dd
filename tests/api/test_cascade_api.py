"""Cascades through the real app (in process) at every edge: a later stage of a staged
policy runs on tiny2, a second tiny model of the same classes with its own input size,
crop_pct, interpolation and weights. /v1, the Open Inference Protocol over REST and over
gRPC answer alike; each model's views are its own (compared with tiny2 asked directly);
the compute is counted in tiny's views; bad cascades are 4xx before any image is decoded."""

from __future__ import annotations

import base64
import json
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.runtime.cost import gflops_per_view, view_cost
from tests.helpers import image_bytes, make_tiny_model
from tests.inprocess import app_with_grpc

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is not installed (the dev extra has it)"
)
from tritonclient.utils import InferenceServerException  # noqa: E402

SEED = 1
# PNG: no reduced-scale JPEG decode, so every model cuts its views from the same pixels
IMAGE = image_bytes(120, 90, seed=3)
IMAGES = [image_bytes(90 + 7 * i, 70 + 5 * i, seed=i) for i in range(3)]
CASCADE = "center|margin<1|tiny2:full,mfull"


@pytest.fixture(scope="module")
def cascade(
    tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Any]]:
    """tiny; tiny2 (80 px, crop_pct 0.875, bicubic, other weights, the same 10 classes);
    tiny5 (5 classes): served together, with gRPC."""
    root = tmp_path_factory.mktemp("cascade-models")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    make_tiny_model(root, "tiny2", input_size=80, crop_pct=0.875, seed=1, interpolation="bicubic")
    make_tiny_model(root, "tiny5", num_classes=5, seed=2)
    with app_with_grpc(root, models=["tiny", "tiny2", "tiny5"], max_views_per_request=40) as app:
        yield app


@pytest.fixture(scope="module")
def api(cascade: tuple[TestClient, Any]) -> TestClient:
    return cascade[0]


def _v1(
    client: TestClient, model: str, views: str, images: Sequence[bytes] = (IMAGE,), **params: Any
) -> httpx.Response:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    query = {"views": views, "seed": SEED, "top_k": 10, **params}
    return client.post(f"/v1/models/{model}/classify", params=query, files=files)


def _result(client: TestClient, model: str, views: str, **params: Any) -> dict[str, Any]:
    res = _v1(client, model, views, **params)
    assert res.status_code == 200, res.text
    return res.json()["results"][0]


def _probs(result: dict[str, Any]) -> np.ndarray:
    """Every class's probability (top_k = 10: all of them), by class index."""
    out = np.zeros(10)
    for t in result["top"]:
        out[t["index"]] = t["prob"]
    return out


def _engines(client: TestClient) -> dict[str, Any]:
    slots = client.app.state.service.slots  # type: ignore[attr-defined]
    return {name: slot.engine for name, slot in slots.items()}


def test_the_later_stage_runs_on_the_other_model_and_is_costed_in_the_first(
    api: TestClient,
) -> None:
    r = _result(api, "tiny", CASCADE)
    assert r["spec"] == "center:1|margin<1|tiny2:full:1,mfull:1"
    assert [s["model"] for s in r["stages"]] == ["tiny", "tiny2"]
    assert [s["ran"] for s in r["stages"]] == [True, True]
    assert [s["gate"] for s in r["stages"]] == [None, "margin<1"]
    assert r["answered_by"] == ["tiny", "tiny2"] and r["views"] == 3
    # tiny2's views are planned with its own geometry: the boxes tiny2 itself plans
    own = _result(api, "tiny2", "full,mfull")
    assert r["view_boxes"][1:] == own["view_boxes"]
    # one view of tiny2 in tiny's views: the ratio the server uses (untuned: FLOPs)
    engines = _engines(api)
    cost = view_cost(engines["tiny2"], engines["tiny"])
    flops = gflops_per_view(engines["tiny2"].cfg) / gflops_per_view(engines["tiny"].cfg)
    assert cost.source == "gflops" and cost.ratio == pytest.approx(flops) and cost.ratio > 1
    first, second = (s["view_equivalents"] for s in r["stages"])
    assert first == 1.0
    assert second == pytest.approx(own["view_equivalents"] * cost.ratio, abs=1e-3)
    assert r["view_equivalents"] == pytest.approx(first + second, abs=1e-3)


def test_last_answers_as_the_later_model_alone_on_the_same_views(api: TestClient) -> None:
    r = _result(api, "tiny", "center|margin<1|tiny2:center|last")
    own = _result(api, "tiny2", "center")
    assert r["answered_by"] == ["tiny2"] and r["views"] == 2
    assert r["view_boxes"][1] == own["view_boxes"][0]
    assert [t["index"] for t in r["top"]] == [t["index"] for t in own["top"]]
    assert _probs(r) == pytest.approx(_probs(own), abs=1e-5)


@pytest.mark.parametrize("level", ["softmax", "logit"])
def test_all_weighs_each_models_answer_by_its_views(api: TestClient, level: str) -> None:
    r = _result(api, "tiny", CASCADE, level=level)
    tiny = _result(api, "tiny", "center", level=level)
    tiny2 = _result(api, "tiny2", "full,mfull", level=level)
    assert r["temperature"] == tiny["temperature"] == tiny2["temperature"] == 1.0
    expected = (1 * _probs(tiny) + 2 * _probs(tiny2)) / 3
    assert _probs(r) == pytest.approx(expected, abs=1e-5)


def test_a_stage_after_the_other_models_runs_on_the_requested_one(api: TestClient) -> None:
    r = _result(api, "tiny", "center|margin<1|tiny2:center|margin<1|full")
    assert [s["model"] for s in r["stages"]] == ["tiny", "tiny2", "tiny"]
    assert all(s["ran"] for s in r["stages"])
    tiny = _result(api, "tiny", "center,full")  # one plan: the staged run's boxes
    tiny2 = _result(api, "tiny2", "center")
    assert [r["view_boxes"][i] for i in (0, 2)] == tiny["view_boxes"]
    expected = (2 * _probs(tiny) + 1 * _probs(tiny2)) / 3
    assert _probs(r) == pytest.approx(expected, abs=1e-5)


def test_the_gate_decides_whether_the_other_model_runs(api: TestClient) -> None:
    never = _v1(api, "tiny", "center|margin<0|tiny2:full,mfull", IMAGES).json()["results"]
    always = _v1(api, "tiny", CASCADE, IMAGES).json()["results"]
    for stopped, went_on, data in zip(never, always, IMAGES, strict=True):
        assert stopped["answered_by"] == ["tiny"] and stopped["views"] == 1
        assert [s["ran"] for s in stopped["stages"]] == [True, False]
        assert stopped["view_equivalents"] == 1.0
        alone = _v1(api, "tiny", "center", [data]).json()["results"][0]
        assert _probs(stopped) == pytest.approx(_probs(alone), abs=1e-6)
        assert went_on["answered_by"] == ["tiny", "tiny2"] and went_on["views"] == 3


def _v2_body(views: str, **params: Any) -> dict[str, Any]:
    image = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [1],
        "parameters": {"content_type": "base64"},
        "data": [base64.b64encode(IMAGE).decode()],
    }
    return {"inputs": [image], "parameters": {"views": views, "seed": SEED, **params}}


def test_v2_rest_and_grpc_answer_a_cascade_as_v1(cascade: tuple[TestClient, Any]) -> None:
    api, grpc = cascade
    v1 = _result(api, "tiny", CASCADE)
    res = api.post("/v2/models/tiny/infer", json=_v2_body(CASCADE))
    assert res.status_code == 200, res.text
    outputs = {o["name"]: o for o in res.json()["outputs"]}
    assert outputs["answered_by"] == {
        "name": "answered_by", "datatype": "BYTES", "shape": [1], "data": ["tiny+tiny2"]
    }  # fmt: skip
    assert np.array(outputs["probabilities"]["data"]) == pytest.approx(_probs(v1), abs=1e-5)
    assert outputs["stages_run"]["data"] == [2] and outputs["views"]["data"] == [3]
    assert outputs["view_equivalents"]["data"][0] == pytest.approx(v1["view_equivalents"], 1e-4)
    # the binary tensor data extension: length-prefixed BYTES elements
    body = _v2_body(CASCADE, binary_data_output=True)
    body["outputs"] = [{"name": "answered_by"}, {"name": "probabilities"}]
    res = api.post("/v2/models/tiny/infer", json=body)
    size = int(res.headers["inference-header-content-length"])
    head, raw = json.loads(res.content[:size]), res.content[size:]
    first = head["outputs"][0]
    assert first["name"] == "answered_by" and first["parameters"]["binary_data_size"] == 14
    assert struct.unpack_from("<I", raw)[0] == 10 and raw[4:14] == b"tiny+tiny2"
    probs = np.frombuffer(raw[14:], dtype="<f4")
    assert probs == pytest.approx(_probs(v1), abs=1e-5)
    # gRPC: the same views, the same answer
    inp = grpcclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))
    asked = [grpcclient.InferRequestedOutput(n) for n in ("probabilities", "answered_by")]
    answer = grpc.infer("tiny", [inp], outputs=asked, parameters={"views": CASCADE, "seed": SEED})
    assert answer.as_numpy("answered_by").tolist() == [b"tiny+tiny2"]
    assert answer.as_numpy("probabilities")[0] == pytest.approx(_probs(v1), abs=1e-5)


def test_model_metadata_lists_the_answered_by_output(cascade: tuple[TestClient, Any]) -> None:
    api, grpc = cascade
    rest = api.get("/v2/models/tiny").json()["outputs"]
    assert {"name": "answered_by", "datatype": "BYTES", "shape": [-1]} in rest
    meta = grpc.get_model_metadata("tiny", as_json=True)["outputs"]
    assert {"name": "answered_by", "datatype": "BYTES", "shape": ["-1"]} in meta


BAD = [
    pytest.param("center|margin<1|tiny3:center", "which this server does not serve", id="unknown"),
    pytest.param("center|margin<1|tiny:center", "the requested model itself", id="itself"),
    pytest.param("tiny2:center|margin<1|full", "the first stage runs on", id="first-stage"),
    pytest.param("center|margin<1|no such!:center", "is neither a view kind", id="garbage"),
    pytest.param("center|margin<1|tiny5:center", "has other classes than 'tiny'", id="classes"),
]


@pytest.mark.parametrize(("views", "says"), BAD)
def test_a_bad_cascade_is_a_clear_4xx_on_every_edge(
    cascade: tuple[TestClient, Any], views: str, says: str
) -> None:
    api, grpc = cascade
    res = _v1(api, "tiny", views, IMAGES[:2])  # the whole request, not image by image
    assert res.status_code == 422, res.text
    assert says in res.json()["error"]["message"] and "results" not in res.json()
    res = api.post("/v2/models/tiny/infer", json=_v2_body(views))
    assert res.status_code == 400 and says in res.json()["error"]
    inp = grpcclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([IMAGE], dtype=np.object_))
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer("tiny", [inp], parameters={"views": views})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert says in refused.value.message()


def _samples(client: TestClient, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in families
        for s in family.samples
        if s.name == metric
    }


def test_metrics_count_each_stages_compute_and_the_answering_models(api: TestClient) -> None:
    compute, answers = "midserve_stage_view_equivalents_total", "midserve_answers_by_model_total"
    before = _samples(api, compute), _samples(api, answers)
    went_on = _result(api, "tiny", CASCADE)
    stopped = _result(api, "tiny", "center|margin<0|tiny2:full,mfull")
    after = _samples(api, compute), _samples(api, answers)

    def grew(k: int, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after[k].get(key, 0.0) - before[k].get(key, 0.0)

    assert grew(0, model="tiny", stage="1", stage_model="tiny") == pytest.approx(2.0)
    on_tiny2 = grew(0, model="tiny", stage="2", stage_model="tiny2")
    assert on_tiny2 == pytest.approx(went_on["stages"][1]["view_equivalents"], abs=1e-3)
    assert stopped["stages"][1]["ran"] is False  # a skipped stage costs nothing
    assert grew(1, model="tiny", answered_by="tiny+tiny2") == 1
    assert grew(1, model="tiny", answered_by="tiny") == 1
