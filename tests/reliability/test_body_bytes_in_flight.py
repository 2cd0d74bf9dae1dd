"""MIDSERVE_MAX_INFLIGHT_BODY_BYTES: request bodies held by every request in flight are
bounded; an upload that would pass the bound is refused 503 (before its body is read when
it declares its length, mid-body when chunked), small requests are still served, and what a
request holds is given back however it ends (the gauge returns to 0).

The held uploads are real sockets that sent their headers and part of the body; nothing
here sleeps for a set time: every wait is on a condition, with a generous timeout."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app.config import Settings
from tests.helpers import image_bytes
from tests.inprocess import concurrently, in_process_app, tiny_settings
from tests.reliability.rawhttp import (
    RawResponse,
    chunk,
    finish_upload,
    open_upload,
    send_raw,
)
from tests.server import running_server, scrape, total

CLASSIFY = "/v1/models/tiny/classify"
INFER = "/v2/models/tiny/infer"
BODY_LIMIT = 200_000
BOUND = 500_000  # two held ~188 KB uploads fit, a third does not; a 12 KB image still does
BIG = image_bytes(250, 250, seed=1)  # a real PNG of noise, ~188 KB
SMALL = image_bytes(64, 64, seed=2)
GAUGE = "midserve_body_bytes_in_flight"
REFUSED = "midserve_body_bytes_refused_requests_total"


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)


def in_flight(base: str) -> float:
    return total(scrape(base), GAUGE)


def assert_refused(res: RawResponse, held: int, own: int = 0) -> None:
    """503 overloaded, saying how many bytes are in flight (``held`` by others, plus at
    most ``own`` of this body already taken in) and the bound."""
    assert res.status == 503, res
    error = res.json()["error"]
    assert error["type"] == "overloaded", error
    said = re.match(r"(\d+) bytes of request bodies are in flight", error["message"])
    assert said and held <= int(said[1]) <= held + own, error
    assert f"bound is {BOUND} bytes" in error["message"], error
    assert int(res.headers["retry-after"]) >= 1
    assert res.closed, "the server must hang up on a body it did not read"


def head_only(path: str, declared: int) -> bytes:
    """A POST's headers alone: a refusal before the body is read needs no body."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def bound_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model behind a real server with a 500 KB bound on body bytes in flight; a
    long body-read timeout, so held uploads are not ended by the slow-client rules."""
    env = {
        "MIDSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
        "MIDSERVE_MAX_INFLIGHT_BODY_BYTES": str(BOUND),
        "MIDSERVE_BODY_READ_TIMEOUT_S": "120",
    }
    log = tmp_path_factory.mktemp("bound-server") / "server.log"
    with running_server(tiny_repo, env=env, log_path=log) as base:
        yield base


@pytest.fixture
def two_held(bound_server: str) -> Iterator[list[socket.socket]]:
    """Two uploads of BIG whose headers and first KB are sent, the rest held back."""
    socks = [
        open_upload(bound_server, CLASSIFY, declared=len(BIG), first=BIG[:1000]) for _ in range(2)
    ]
    try:
        wait_for("two uploads held", lambda: in_flight(bound_server) == 2 * len(BIG))
        yield socks
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.slow
def test_uploads_held_open_refuse_a_new_one_while_small_requests_are_served(
    bound_server: str, two_held: list[socket.socket]
) -> None:
    base, held = bound_server, 2 * len(BIG)
    assert len(BIG) <= BODY_LIMIT < held < BOUND < held + len(BIG)
    # a third upload does not fit: answered from its headers alone, before a byte of body
    third = open_upload(base, CLASSIFY, declared=len(BIG), first=b"")
    with third:
        res = finish_upload(third, b"")
        assert not res.closed  # the server reads and drops the body the client may be sending
        third.sendall(BIG)
        assert third.recv(1) == b"", "the server must hang up once the refused body is through"
    assert_refused(dataclasses.replace(res, closed=True), held)
    assert in_flight(base) == held  # the dropped body was never held
    # a client that sends its whole body before it reads gets the answer too; on /v2 as well
    assert_refused(send_raw(base, head_only(CLASSIFY, len(BIG)) + BIG, wait_close_s=30), held)
    assert_refused(send_raw(base, head_only(INFER, len(BIG)) + BIG, wait_close_s=30), held)
    # small requests fit beside the held bodies
    for _ in range(3):
        res = httpx.post(base + CLASSIFY, content=SMALL,
                         headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
        assert res.status_code == 200, res.text
    assert in_flight(base) == held
    # one held upload finishes (answered), the other hangs up: nothing is held any more
    first, second = two_held
    answer = finish_upload(first, BIG[1000:])
    assert answer.status == 200 and answer.json()["results"][0]["top"], answer
    second.close()
    wait_for("the body bytes in flight back to 0", lambda: in_flight(base) == 0)
    # and a new upload is admitted
    res = httpx.post(base + CLASSIFY, content=BIG, headers={"content-type": "image/png"},
                     timeout=60)  # fmt: skip
    assert res.status_code == 200, res.text
    metrics = scrape(base)
    assert total(metrics, REFUSED, when="declared") >= 2
    assert total(metrics, "midserve_requests_total", status="500") == 0


@pytest.mark.slow
def test_a_chunked_upload_is_refused_when_it_would_cross_the_bound(
    bound_server: str, two_held: list[socket.socket]
) -> None:
    base, held = bound_server, 2 * len(BIG)
    # 20 KB chunks: the bound is crossed within the 7th (124 KB were left), under BODY_LIMIT
    upload = open_upload(base, CLASSIFY, declared=None, first=BIG[:20_000])
    with upload:
        rest = b"".join(chunk(BIG[i : i + 20_000]) for i in range(20_000, 140_000, 20_000))
        res = finish_upload(upload, rest)
        upload.sendall(chunk(BIG[140_000:]) + chunk(b""))  # the rest: read and dropped
        assert upload.recv(1) == b"", "the server must hang up once the refused body is through"
    assert_refused(dataclasses.replace(res, closed=True), held, own=140_000)
    assert "received so far" in res.json()["error"]["message"], res
    assert BOUND - held < 140_000 < BODY_LIMIT  # the in-flight bound refused it, not the limit
    wait_for("only the held uploads in flight", lambda: in_flight(base) == held)
    for sock in two_held:
        sock.close()
    wait_for("the body bytes in flight back to 0", lambda: in_flight(base) == 0)

    def chunks() -> Iterator[bytes]:
        yield from (BIG[i : i + 20_000] for i in range(0, len(BIG), 20_000))

    res2 = httpx.post(base + CLASSIFY, content=chunks(), headers={"content-type": "image/png"},
                      timeout=60)  # fmt: skip
    assert res2.status_code == 200, res2.text
    assert total(scrape(base), REFUSED, when="chunked") >= 1


# -- in process: the reservation is given back however a request ends ----------------------
async def _stalls(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.Event().wait()  # never sends the rest: the body-read timeout ends it


async def _over_limit() -> AsyncIterator[bytes]:
    for _ in range(4):
        yield b"\xff" * 40_000  # 160 KB: chunked, over the 100 KB body limit


ENDINGS: dict[str, tuple[int, dict[str, Any]]] = {
    "answered": (200, {"content": SMALL}),
    "invalid image": (422, {"content": b"not an image" * 1000}),
    "chunked, over the body limit": (413, {"content": _over_limit}),
    "body too slow": (408, {"content": lambda: _stalls(SMALL[:1000]),
                            "headers": {"content-length": str(len(SMALL))}}),
    "unknown model": (404, {"content": SMALL, "path": "/v1/models/nope/classify"}),
}  # fmt: skip


def held_in(client: Any) -> float:
    """The gauge, read in the app's own registry (callable from its event loop too)."""
    return client.app.state.metrics.registry.get_sample_value(GAUGE) or 0.0


@pytest.fixture(scope="module")
def app_client(tiny_repo: Path) -> Iterator[Any]:
    settings = tiny_settings(
        tiny_repo, max_body_bytes=100_000, max_inflight_body_bytes=BOUND, body_read_timeout_s=0.5
    )
    with in_process_app(settings) as client:
        yield client


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_what_a_request_holds_is_given_back_however_it_ends(app_client: Any, ending: str) -> None:
    status, how = ENDINGS[ending]
    content = how["content"]
    headers = {"content-type": "image/png", **how.get("headers", {})}

    async def call(http: httpx.AsyncClient) -> httpx.Response:
        body = content() if callable(content) else content
        return await http.post(how.get("path", CLASSIFY), content=body, headers=headers)

    (res,) = concurrently(app_client, [call])
    assert res.status_code == status, res.text
    assert held_in(app_client) == 0


def test_a_client_hanging_up_mid_body_gives_its_bytes_back(app_client: Any) -> None:
    """The app driven as the server would drive it: headers, part of the body, then
    http.disconnect (a client that went away)."""
    sent: list[dict[str, Any]] = []
    seen: list[float] = []
    messages = [
        {"type": "http.request", "body": SMALL[:1000], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        seen.append(held_in(app_client))
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": CLASSIFY, "raw_path": CLASSIFY.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
        "headers": [(b"host", b"testserver"), (b"content-type", b"image/png"),
                    (b"content-length", str(len(SMALL)).encode())],
    }  # fmt: skip
    assert app_client.portal is not None
    app_client.portal.call(app_client.app, scope, receive, send)
    assert seen and seen[0] == len(SMALL), "the declared length is held while the body comes"
    assert sent[0]["status"] == 499
    assert held_in(app_client) == 0


def test_a_body_limit_over_the_bound_is_refused_at_start_up() -> None:
    # such a body could never be admitted: a 503 "retry later" would never come true
    with pytest.raises(ValidationError, match="MIDSERVE_MAX_INFLIGHT_BODY_BYTES"):
        Settings(max_body_bytes=2_000_000, max_inflight_body_bytes=1_000_000)
    assert Settings(max_body_bytes=2_000_000, max_inflight_body_bytes=0).max_body_bytes
    with pytest.raises(ValidationError):
        Settings(max_inflight_body_bytes=-1)
