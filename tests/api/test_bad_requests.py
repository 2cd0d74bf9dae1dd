"""A bad image among good ones fails alone. The table of bad requests (each a JSON 4xx, the
server healthy after) lives in tests/reliability/bad_inputs.py."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.helpers import image_bytes

GOOD = image_bytes(90, 70)


def test_one_bad_image_among_good_ones(api: TestClient) -> None:
    files = [
        ("images", ("good.png", GOOD, "image/png")),
        ("images", ("bad.png", b"nope", "image/png")),
    ]
    res = api.post("/v1/models/tiny/classify", files=files)
    assert res.status_code == 200
    good, bad = res.json()["results"]
    assert good["top"] and good.get("error") is None
    assert bad["error"]["type"] == "invalid_image" and bad["file"] == "bad.png"
