"""The server's HTTP protocol writes each response's head and body in one write, whatever the
app does between sending the two (app/api/http_protocol.py): a replica killed between two
writes would leave its proxy a head with no body, an answer it can neither retry nor finish.

The protocol runs on a real event loop; only the socket is replaced, by a transport that
records each write."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from app.api.http_protocol import protocol_class
from app.metrics import Metrics

BODY = b'{"answer": 42}'


class RecordingTransport(asyncio.Transport):
    """The socket's side of a connection: every write kept as it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def slow_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the body, then lets the loop run other work between the head and the body (as a
    forward thread holding the GIL would); a body of ``fail`` ends the app after the head."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await asyncio.sleep(0.02)
    if body == b"fail":
        raise RuntimeError("the app failed after its head")
    await send({"type": "http.response.body", "body": BODY})


def exchange(request: bytes, then: bytes = b"") -> RecordingTransport:
    """``request`` to a fresh connection of the server's protocol, ``then`` (a body held
    back) once the server has written something; the transport once the response is
    complete or the connection closed."""

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(30):
            while not done():
                await asyncio.sleep(0.005)

    async def run() -> RecordingTransport:
        config = Config(app=slow_app, lifespan="off", log_level="critical", access_log=False)
        config.load()
        protocol = protocol_class(0, None, Metrics())(config, ServerState(), {})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(request)
        if then:
            await until(lambda: bool(transport.writes))
            protocol.data_received(then)
        await until(lambda: transport.closed or protocol.cycle.response_complete)
        return transport

    return asyncio.run(run())


def test_head_and_body_leave_in_one_write_with_the_loop_busy_between_them() -> None:
    transport = exchange(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
    assert len(transport.writes) == 1, transport.writes
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n" + BODY)
    assert not transport.closed  # kept alive


def test_a_head_request_is_answered_without_a_body_write() -> None:
    transport = exchange(b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n")
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n")  # the head only


def test_100_continue_goes_out_before_the_body_is_sent() -> None:
    head = b"POST /x HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
    transport = exchange(head, then=b"ok")
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert len(transport.writes) == 2 and transport.writes[1].endswith(BODY)


def test_a_head_held_when_the_app_fails_is_written_before_the_connection_closes() -> None:
    transport = exchange(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nfail")
    assert transport.closed
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
