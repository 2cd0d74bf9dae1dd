"""The Open Inference Protocol against a real server, spoken by the official Triton client:
health, metadata, infer with JPEGs as BYTES (binary and JSON outputs, class_count), and the
same answers as /v1 for the same image, views and seed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import image_bytes
from tests.server import running_server

httpclient = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] is not installed (the dev extra has it)"
)

VIEWS, SEED = "fixed:5,random:3", 7


@pytest.fixture(scope="module")
def base(tiny_repo: Path) -> Iterator[str]:
    with running_server(tiny_repo) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(base.removeprefix("http://"))


def _jpegs(count: int) -> list[bytes]:
    return [image_bytes(96 + 16 * i, 80, fmt="JPEG", seed=i) for i in range(count)]


def _infer(client: httpclient.InferenceServerClient, images: list[bytes], **kw: object):
    inp = httpclient.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return client.infer("tiny", [inp], parameters={"views": VIEWS, "seed": SEED}, **kw)


def _v1_top(base: str, data: bytes, k: int) -> list[dict]:
    res = httpx.post(
        f"{base}/v1/models/tiny/classify",
        params={"views": VIEWS, "seed": SEED, "top_k": k},
        files={"images": ("a.jpg", data, "image/jpeg")},
        timeout=60,
    )
    assert res.status_code == 200, res.text
    return res.json()["results"][0]["top"]


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_v1(client: httpclient.InferenceServerClient, base: str, binary: bool) -> None:
    images = _jpegs(2)
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("views", binary_data=binary),
    ]
    result = _infer(client, images, outputs=outputs, request_id="r-1")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 10) and probs.dtype == np.float32
    assert result.as_numpy("views").tolist() == [8, 8]
    assert result.get_response()["id"] == "r-1"
    for row, data in zip(probs, images, strict=True):
        top = _v1_top(base, data, 3)
        assert [t["index"] for t in top] == np.argsort(-row)[:3].tolist()
        assert row[top[0]["index"]] == pytest.approx(top[0]["prob"], abs=1e-4)


def test_class_count(client: httpclient.InferenceServerClient, base: str) -> None:
    images = _jpegs(1)
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=3)]
    classes = _infer(client, images, outputs=outputs).as_numpy("probabilities")
    assert classes.shape == (1, 3)
    parsed = [c.decode().split(":") for c in classes[0]]
    top = _v1_top(base, images[0], 3)
    assert [int(p[1]) for p in parsed] == [t["index"] for t in top]
    assert [p[2] for p in parsed] == [t["label"] for t in top]
    assert float(parsed[0][0]) == pytest.approx(top[0]["prob"], abs=1e-4)


def test_kserve_rest_client(request: pytest.FixtureRequest) -> None:
    """KServe's own client, when its package fits this environment."""
    kserve = pytest.importorskip(
        "kserve",
        reason="kserve is not installed: its dependencies would downgrade psutil and "
        "python-dateutil here (pip install --dry-run kserve shows it)",
    )
    base = request.getfixturevalue("base")
    import asyncio

    async def call() -> object:
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2"))
        data = _jpegs(1)[0]
        request = kserve.InferRequest(
            model_name="tiny",
            infer_inputs=[kserve.InferInput("image", [1], "BYTES", data=[data])],
            parameters={"views": VIEWS, "seed": SEED},
        )
        try:
            return await client.infer(base, request, model_name="tiny")
        finally:
            await client.close()

    response = asyncio.run(call())
    probs = response.outputs[0].as_numpy()  # type: ignore[attr-defined]
    assert probs.shape == (1, 10)
