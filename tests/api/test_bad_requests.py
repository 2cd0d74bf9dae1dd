"""Bad requests: each a JSON 4xx that says what was wrong; the server stays healthy."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import image_bytes

GOOD = image_bytes(90, 70)
PNG = {"content-type": "image/png"}


def _files(n: int = 1) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", GOOD, "image/png")) for i in range(n)]


CASES = [
    # (name, method kwargs, url suffix, status, error type, message fragment)
    (
        "unknown model",
        {"content": GOOD, "headers": PNG},
        "/v1/models/nope/classify",
        404,
        "unknown_model",
        "known models: tiny",
    ),
    (
        "path trick",
        {"content": GOOD, "headers": PNG},
        "/v1/models/..%2Ftiny/classify",
        404,
        "not_found",
        "not found",
    ),
    (
        "dotted name",
        {"content": GOOD, "headers": PNG},
        "/v1/models/..tiny/classify",
        404,
        "unknown_model",
        "unknown model",
    ),
    ("bad level", {"files": _files()}, "?level=median", 422, "invalid_request", "level"),
    (
        "bad views spec",
        {"files": _files()},
        "?views=random:two",
        422,
        "invalid_request",
        "positive integer",
    ),
    (
        "unknown view kind",
        {"files": _files()},
        "?views=zoom:3",
        422,
        "invalid_request",
        "unknown view kind",
    ),
    ("crops zero", {"files": _files()}, "?crops=0", 422, "invalid_request", "crops"),
    ("crops negative", {"files": _files()}, "?crops=-4", 422, "invalid_request", "crops"),
    ("crops text", {"files": _files()}, "?crops=ten", 422, "invalid_request", "integer"),
    ("crops over limit", {"files": _files()}, "?crops=41", 422, "invalid_request", "limit"),
    (
        "crops huge",
        {"files": _files()},
        "?crops=99999999999999999999",
        422,
        "invalid_request",
        "integer",
    ),
    ("views over limit", {"files": _files()}, "?views=random:41", 422, "invalid_request", "limit"),
    (
        "crops and views",
        {"files": _files()},
        "?crops=3&views=center",
        422,
        "invalid_request",
        "not both",
    ),
    ("top_k zero", {"files": _files()}, "?top_k=0", 422, "invalid_request", "top_k"),
    ("top_k over classes", {"files": _files()}, "?top_k=11", 422, "invalid_request", "top_k"),
    ("seed negative", {"files": _files()}, "?seed=-1", 422, "invalid_request", "seed"),
    ("label out of range", {"files": _files()}, "?label=10", 422, "invalid_request", "label"),
    ("label unknown", {"files": _files()}, "?label=n999", 422, "invalid_request", "label"),
    ("label count", {"files": _files(2)}, "?label=1", 422, "invalid_request", "one label per"),
    (
        "not an image",
        {"content": b"hello", "headers": PNG},
        "",
        422,
        "invalid_image",
        "not a recognised image",
    ),
    ("empty body", {"content": b"", "headers": PNG}, "", 422, "invalid_image", "empty"),
    (
        "wrong content type",
        {"content": GOOD, "headers": {"content-type": "application/json"}},
        "",
        415,
        "unsupported_media_type",
        "Content-Type",
    ),
    (
        "no content type",
        {"content": GOOD, "headers": {"content-type": ""}},
        "",
        415,
        "unsupported_media_type",
        "Content-Type",
    ),
    (
        "multipart without file",
        {"data": {"crops": "3"}, "files": [("other", ("", b"", ""))]},
        "",
        422,
        "invalid_request",
        "images",
    ),
    (
        "file in wrong field",
        {"files": [("photo", ("a.png", GOOD, "image/png"))]},
        "",
        422,
        "invalid_request",
        "images",
    ),
    ("too many images", {"files": _files(5)}, "", 422, "invalid_request", "too many files"),
    (
        "oversize body",
        {"content": b"\xff" * 2_100_000, "headers": PNG},
        "",
        413,
        "too_large",
        "over the limit",
    ),
    (
        "long query",
        {"files": _files()},
        "?views=" + "random:1," * 300,
        422,
        "invalid_request",
        "longer than",
    ),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "url", "status", "kind", "fragment"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_gets_a_clear_json_error(
    server: str, name: str, kwargs: dict, url: str, status: int, kind: str, fragment: str
) -> None:
    target = url if url.startswith("/") else "/v1/models/tiny/classify" + url
    res = httpx.post(server + target, timeout=30, **kwargs)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["type"] == kind and fragment.lower() in err["message"].lower(), err


def test_one_bad_image_among_good_ones(server: str) -> None:
    files = [
        ("images", ("good.png", GOOD, "image/png")),
        ("images", ("bad.png", b"nope", "image/png")),
    ]
    res = httpx.post(server + "/v1/models/tiny/classify", files=files)
    assert res.status_code == 200
    good, bad = res.json()["results"]
    assert good["top"] and good.get("error") is None
    assert bad["error"]["type"] == "invalid_image" and bad["file"] == "bad.png"


def test_server_still_healthy_after_bad_requests(server: str) -> None:
    for *_, url, _s, _k, _f in CASES[:5]:
        httpx.post(server + "/v1/models/tiny/classify" + url, content=b"x", headers=PNG)
    assert httpx.get(server + "/readyz").status_code == 200
    res = httpx.post(server + "/v1/models/tiny/classify", content=GOOD, headers=PNG)
    assert res.status_code == 200 and res.json()["results"][0]["top"]
