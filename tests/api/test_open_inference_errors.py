"""Bad inputs over the Open Inference Protocol: each gets its 4xx and ``{"error": "..."}``
(never a 500), and a good request in flight beside them is answered."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import image_bytes
from tests.inprocess import concurrently

URL = "/v2/models/tiny/infer"
JPEG = image_bytes(96, 80, fmt="JPEG")


def _binary(images: list[bytes], shape: list[int] | None = None, **params: object):
    """A binary-extension body (as tritonclient sends it) and its headers."""
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    head = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": shape if shape is not None else [len(images)],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": params,
    }
    header = json.dumps(head).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def _json(data: list[str], datatype: str = "BYTES", shape: list[int] | None = None) -> dict:
    tensor = {
        "name": "image",
        "datatype": datatype,
        "shape": shape if shape is not None else [len(data)],
        "parameters": {"content_type": "base64"},
        "data": data,
    }
    return {"id": "x", "inputs": [tensor]}


B64 = base64.b64encode(JPEG).decode()


def test_json_base64_image(api: TestClient) -> None:
    res = api.post(URL, json=_json([B64]))
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["id"] == "x"
    probs = next(o for o in body["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [1, 10] and sum(probs["data"]) == pytest.approx(1.0, abs=1e-4)


BAD = {
    "wrong datatype": (lambda: {"json": _json([B64], datatype="FP32")}, 400),
    "shape/data mismatch": (lambda: {"json": _json([B64], shape=[2])}, 400),
    "not base64": (lambda: {"json": _json(["%%%"])}, 400),
    "not an image": (lambda: {"json": _json([base64.b64encode(b"hello").decode()])}, 400),
    "not json": (lambda: {"content": b"{nope"}, 400),
    "unknown level": (lambda: _kw(*_binary([JPEG], level="median")), 400),
    "unknown views": (lambda: _kw(*_binary([JPEG], views="sideways:3")), 400),
    "seed not a number": (lambda: _kw(*_binary([JPEG], seed="abc")), 400),
    "too many views": (lambda: _kw(*_binary([JPEG], crops=1000)), 413),
    "too many images": (lambda: _kw(*_binary([JPEG] * 5)), 413),
    "binary shape mismatch": (lambda: _kw(*_binary([JPEG], shape=[3])), 400),
}


def _kw(content: bytes, headers: dict[str, str]) -> dict:
    return {"content": content, "headers": headers}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(api: TestClient, case: str) -> None:
    make, status = BAD[case]
    res = api.post(URL, **make())
    assert res.status_code == status, res.text
    assert isinstance(res.json()["error"], str) and res.json()["error"]


def test_truncated_binary_body(api: TestClient) -> None:
    content, headers = _binary([JPEG])
    res = api.post(URL, content=content[:-100], headers=headers)
    assert res.status_code == 400 and "binary" in res.json()["error"]


def test_header_length_past_the_body(api: TestClient) -> None:
    content, _ = _binary([JPEG])
    headers = {"Inference-Header-Content-Length": str(len(content) + 10)}
    res = api.post(URL, content=content, headers=headers)
    assert res.status_code == 400 and "past the body" in res.json()["error"]


@pytest.mark.parametrize(
    "path", ["/v2/models/nope/infer", "/v2/models/tiny/versions/9/infer", "/v2/models/nope"]
)
def test_unknown_model_or_version(api: TestClient, path: str) -> None:
    res = api.post(path, json=_json([B64])) if path.endswith("infer") else api.get(path)
    assert res.status_code == 404 and "unknown model" in res.json()["error"]


def test_bad_requests_do_not_lose_a_good_one(api: TestClient) -> None:
    good_body, good_headers = _binary([JPEG], views="fixed:5", seed=1)
    bad_body, bad_headers = _binary([b"not an image"])

    async def good(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post(URL, content=good_body, headers=good_headers)

    async def bad(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post(URL, content=bad_body, headers=bad_headers)

    responses = concurrently(api, [bad, good, bad, bad])
    assert [r.status_code for r in responses] == [400, 200, 400, 400]
    outputs = json.loads(responses[1].content)["outputs"]
    assert next(o for o in outputs if o["name"] == "views")["data"] == [5]
