"""Slow-loris uploads: the server ends them (408, then hangs up) and keeps serving others."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import image_bytes
from tests.reliability.bad_inputs import CLASSIFY, READ_TIMEOUT_S
from tests.reliability.rawhttp import RawResponse, dribble
from tests.server import scrape, total

pytestmark = pytest.mark.slow  # a real server: the socket is what is tested


def test_dribbling_upload_is_ended_while_others_are_served(strict_server: str) -> None:
    # one byte every 0.3 s: each byte is within the per-chunk timeout, the body as a whole is not
    outcome: list[tuple[RawResponse, float]] = []
    loris = threading.Thread(
        target=lambda: outcome.append(
            dribble(strict_server, CLASSIFY, declared=50_000, first=b"\x89PNG", every_s=0.3,
                    max_s=20 * READ_TIMEOUT_S)
        )
    )  # fmt: skip
    loris.start()
    served = []
    while loris.is_alive():
        res = httpx.post(
            strict_server + CLASSIFY,
            content=image_bytes(64, 64, seed=len(served)),
            headers={"content-type": "image/png"},
            timeout=30,
        )
        served.append(res.status_code)
        time.sleep(0.1)
    loris.join()
    ((res, _),) = outcome
    assert res.status == 408 and res.json()["error"]["type"] == "request_timeout"
    assert res.closed, "the server must hang up on a client whose body it stopped reading"
    assert served and set(served) == {200}


def test_stalled_body_gets_408_and_the_connection_is_closed(strict_server: str) -> None:
    res, _ = dribble(
        strict_server, CLASSIFY, declared=1000, first=b"x" * 10, every_s=5 * READ_TIMEOUT_S,
        max_s=10 * READ_TIMEOUT_S,
    )  # fmt: skip
    assert res.status == 408 and "not received within" in res.json()["error"]["message"]
    assert res.closed


def test_a_client_hanging_up_mid_body_is_not_a_server_error(strict_server: str) -> None:
    parts = urlsplit(strict_server)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            f"POST {CLASSIFY} HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
            "Content-Length: 5000\r\n\r\nabc".encode()
        )
        time.sleep(0.2)
    time.sleep(0.5)
    metrics = scrape(strict_server)
    assert total(metrics, "midserve_requests_total", status="500") == 0
    assert total(metrics, "midserve_requests_total", status="499") >= 1
    assert httpx.get(strict_server + "/healthz").status_code == 200
