"""Slow clients: slow-loris uploads and headers are ended (408, then the server hangs up), an
idle connection is closed, and other clients are served meanwhile; past the connection limit
requests get 503 (app/api/http_protocol.py, docs/reliability.md "Slow clients")."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import image_bytes
from tests.reliability.bad_inputs import CLASSIFY, READ_TIMEOUT_S
from tests.reliability.rawhttp import (
    RawResponse,
    dribble,
    request_on,
    send_raw,
    trickle,
    trickle_on,
)
from tests.server import running_server, scrape, server_process, total

pytestmark = pytest.mark.slow  # a real server: the socket is what is tested

HEADER_TIMEOUT_S = 2.0
SLACK_S = 10.0  # a loaded 2-core machine: "closed in time" means within the timeout + this
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
# a request whose headers never end: sent a byte at a time, it outlasts any header timeout
ENDLESS_HEAD = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: " + b"a" * 10_000


@pytest.fixture(scope="module")
def header_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server whose request headers must arrive within HEADER_TIMEOUT_S."""
    env = {"MIDSERVE_HEADER_READ_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
    log = tmp_path_factory.mktemp("header-server") / "server.log"
    with running_server(tiny_repo, env=env, log_path=log) as base:
        yield base


def _address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _header_timeouts(base: str) -> dict[str, float]:
    metrics = scrape(base)
    name = "midserve_header_timeouts_total"
    return {state: total(metrics, name, state=state) for state in ("idle", "partial")}


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


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    header_server: str,
) -> None:
    res, closed_after = trickle(header_server, b"", every_s=0.2, max_s=HEADER_TIMEOUT_S + SLACK_S)
    assert res.closed and res.status == 0, "nothing was asked: closed without an answer"
    assert 0.9 * HEADER_TIMEOUT_S <= closed_after <= HEADER_TIMEOUT_S + SLACK_S


def test_headers_dribbled_a_byte_every_0_3_s_get_408_and_the_connection_is_closed(
    header_server: str,
) -> None:
    res, answered = trickle(
        header_server, ENDLESS_HEAD, every_s=0.3, max_s=HEADER_TIMEOUT_S + SLACK_S
    )
    assert res.status == 408 and res.headers["content-type"] == "application/json"
    error = res.json()["error"]
    assert error["type"] == "request_timeout" and "headers not received within" in error["message"]
    assert res.closed
    assert 0.9 * HEADER_TIMEOUT_S <= answered <= HEADER_TIMEOUT_S + SLACK_S


def test_a_kept_alive_connection_serves_a_request_after_a_pause_shorter_than_the_timeout(
    header_server: str,
) -> None:
    with socket.create_connection(_address(header_server), timeout=30) as sock:
        for _ in range(3):
            res = request_on(sock, HEALTHZ)
            assert res.status == 200 and not res.closed
            time.sleep(HEADER_TIMEOUT_S / 4)


def test_a_kept_alive_connection_that_dribbles_its_next_request_is_ended(
    header_server: str,
) -> None:
    # the timer restarts at the end of each response: a request started on an idle
    # kept-alive connection must be complete in time too
    with socket.create_connection(_address(header_server), timeout=30) as sock:
        assert request_on(sock, HEALTHZ).status == 200
        res, answered = trickle_on(
            sock, ENDLESS_HEAD, every_s=0.3, max_s=HEADER_TIMEOUT_S + SLACK_S
        )
    assert res.status == 408 and res.json()["error"]["type"] == "request_timeout"
    assert res.closed and answered <= HEADER_TIMEOUT_S + SLACK_S


def test_slow_header_connections_do_not_stop_other_clients(header_server: str) -> None:
    outcome: list[tuple[RawResponse, float]] = []
    lorises = [
        threading.Thread(
            target=lambda: outcome.append(
                trickle(header_server, ENDLESS_HEAD, every_s=0.3, max_s=HEADER_TIMEOUT_S + SLACK_S)
            )
        )  # fmt: skip
        for _ in range(20)
    ]
    for t in lorises:
        t.start()
    served = []
    with httpx.Client(base_url=header_server, timeout=30) as client:
        while any(t.is_alive() for t in lorises):
            res = client.post(
                CLASSIFY,
                content=image_bytes(64, 64, seed=len(served)),
                headers={"content-type": "image/png"},
            )
            served.append(res.status_code)
            time.sleep(0.1)
    for t in lorises:
        t.join()
    assert len(outcome) == 20 and {res.status for res, _ in outcome} == {408}
    assert len(served) >= 3 and set(served) == {200}


def test_header_timeouts_are_counted_by_state(header_server: str) -> None:
    before = _header_timeouts(header_server)
    idle, _ = trickle(header_server, b"", every_s=0.2, max_s=HEADER_TIMEOUT_S + SLACK_S)
    partial, _ = trickle(header_server, b"GET /hea", every_s=0.2, max_s=HEADER_TIMEOUT_S + SLACK_S)
    assert (idle.status, partial.status) == (0, 408)
    after = _header_timeouts(header_server)
    assert after["idle"] - before["idle"] == 1
    assert after["partial"] - before["partial"] == 1


def test_blank_lines_before_a_request_are_not_part_of_one(header_server: str) -> None:
    # CR/LF between requests (some clients send one after a body) does not start a request:
    # the connection is closed as idle, with no 408 that could be read as the next answer
    before = _header_timeouts(header_server)
    with socket.create_connection(_address(header_server), timeout=30) as sock:
        assert request_on(sock, HEALTHZ).status == 200
        res, _ = trickle_on(sock, b"\r\n\r\n", every_s=0.2, max_s=HEADER_TIMEOUT_S + SLACK_S)
    assert res.closed and res.status == 0
    after = _header_timeouts(header_server)
    assert after["idle"] - before["idle"] == 1 and after["partial"] == before["partial"]


def test_a_request_head_over_16_kib_gets_431_and_the_connection_is_closed(
    header_server: str,
) -> None:
    # sent at once and never finished: within the header timeout, a fast client could
    # otherwise make the server hold an ever longer head
    res = send_raw(header_server, ENDLESS_HEAD + b"a" * 10_000, wait_close_s=5)
    assert res.status == 431 and res.headers["content-type"] == "application/json"
    assert res.json()["error"]["type"] == "headers_too_large"
    assert res.closed
    assert httpx.get(header_server + "/healthz").status_code == 200


def test_requests_past_the_connection_limit_get_503_and_the_connection_is_closed(
    tiny_repo: Path, tmp_path: Path
) -> None:
    limit = 3
    env = {"MIDSERVE_MAX_CONNECTIONS": str(limit), "MIDSERVE_HEADER_READ_TIMEOUT_S": "60"}
    with server_process(tiny_repo, env=env, log_path=tmp_path / "server.log") as (base, _):

        def hold() -> socket.socket:
            # answered once, so the server has surely accepted it; then a request begun and
            # never finished keeps it open (uvicorn's keep-alive timer stops at the first byte)
            sock = socket.create_connection(_address(base), timeout=30)
            assert request_on(sock, HEALTHZ).status == 200
            sock.sendall(b"GET /hea")
            return sock

        held = [hold() for _ in range(limit - 1)]
        try:
            # its own connection makes `limit`: still served
            assert send_raw(base, HEALTHZ).status == 200
            held.append(hold())
            refused = send_raw(base, HEALTHZ, wait_close_s=5)
            assert refused.status == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "too_many_connections"
            assert refused.closed
        finally:
            for sock in held:
                sock.close()
        deadline, refused_since = time.monotonic() + SLACK_S, 0
        while send_raw(base, HEALTHZ).status != 200:  # until the server saw them close
            refused_since += 1
            assert time.monotonic() < deadline, "still refused after the connections closed"
            time.sleep(0.1)
        assert total(scrape(base), "midserve_connections_refused_total") == 1 + refused_since
