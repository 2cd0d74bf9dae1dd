"""uvicorn's httptools HTTP/1.1 protocol with a header-read timeout, a bound on a request's
head and a connection limit; and the event loop the server runs on.

Why: the server runs uvicorn's httptools protocol (llhttp, a C parser) on uvloop (libuv):
h11, uvicorn's pure-Python protocol on asyncio's loop, cost 1.4-1.7x the server CPU per
request on routes that do little else (studies/http_protocol_cpu.py). uvicorn arms a timer
only after a response, as the keep-alive timeout, and cancels it on any byte received. A
connection that sends nothing, or its request line and headers a byte now and then, is held
forever; thousands of them exhaust file descriptors and memory. The request *body* is timed
out in the app (api/middleware.py); the headers are read before the app is called, so their
timeout has to live here.

- Every request's headers must be complete within ``header_read_timeout_s``: counted from
  the connection's opening for the first request, from the end of the previous response for
  the next ones on a kept-alive connection. Past it the connection is closed; if part of a
  request had arrived (httptools began a message, at its first byte that is not the CR/LF
  allowed between requests, and its headers are not complete), it first gets a 408 JSON
  ``request_timeout`` body. A connection on which nothing at all arrived is closed without
  an answer, as an idle kept-alive connection is: a 408 there could cross a request the
  client was just sending on it and be read as that request's answer.
- llhttp itself bounds neither the request line nor the headers (h11 stopped at 16 KiB). A
  head over ``MAX_HEAD_BYTES`` (16 KiB) gets 431 JSON ``headers_too_large`` and its
  connection is closed: a complete one by its URL, header names and values; an unfinished
  one as soon as the bytes received for it pass the bound, so a fast client cannot grow one
  without end inside the timeout. Those bytes are counted from the read the head began in; a
  read in which a head follows bytes of another request is not counted (the parser does not
  say where the head began), so there the bound is 16 KiB plus one read. A head pipelined
  behind a response still being written stops the reading, and its 431 follows that
  response.
- A request arriving while more than ``max_connections`` connections are open (its own
  included), or more requests than that are still running (those of clients that left
  included), is answered 503 ``too_many_connections`` (JSON, ``Retry-After: 1``) and its
  connection closed. This replaces uvicorn's ``limit_concurrency``, whose 503 is plain text,
  counts its own connection against the limit (N refuses the Nth) and is not in /metrics.

- A response's head is held until its first body bytes and leaves with them in one write
  (``_OneWriteResponse``). uvicorn writes the head when the app sends
  ``http.response.start`` and the body when it sends ``http.response.body``; between the
  two the event loop's thread can lose the GIL to a forward thread for a switch interval
  (5 ms). A replica killed there leaves a proxy holding a head and no body: it has begun
  answering its client, so it can neither retry elsewhere nor answer whole (the failover
  test saw one such request in 1,710). One write is also one syscall fewer a response.

``protocol_class()`` builds the class for ``uvicorn.run(http=...)`` around one app's
settings and metrics (uvicorn instantiates the class itself, with its own arguments).
"""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any, cast

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.api.errors import error_body
from app.metrics import Metrics

MAX_HEAD_BYTES = 16 * 1024  # a request line + headers; h11's default bound


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing the connection."""


# where the parser is in the request it reads: between requests, in its head, past its head
_IDLE, _HEAD, _BODY = 0, 1, 2


class _OneWriteResponse:
    """One request's view of its connection's transport: the response head (the first write
    once the response has started) is held and written with the next write, the body's. A
    ``100 Continue`` goes out at once (it is written before the response starts); a HEAD
    answer, which has no body write, is never held; ``close`` writes a held head first."""

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._head_seen = cycle.scope["method"] == "HEAD"

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._head_seen and self._cycle.response_started:
            self._head_seen = True
            self._head = data
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            self.write(b"")
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def event_loop() -> str:
    """uvicorn's ``loop`` setting: uvloop where it imports, else asyncio's own loop."""
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return "asyncio"
    return "uvloop"


def _json(kind: str, message: str) -> bytes:
    return json.dumps(error_body(kind, message)).encode()


def protocol_class(
    header_read_timeout_s: float, max_connections: int | None, metrics: Metrics
) -> type[HttpToolsProtocol]:
    """The HttpToolsProtocol subclass for ``uvicorn.run(http=...)``: headers timed out after
    ``header_read_timeout_s`` (0: never), requests past ``max_connections`` (None: no
    limit) refused, both counted in ``metrics``; heads over ``MAX_HEAD_BYTES`` refused."""
    timeout_body = _json(
        "request_timeout", f"request headers not received within {header_read_timeout_s:g} s"
    )
    head_body = _json("headers_too_large", f"request line and headers over {MAX_HEAD_BYTES} bytes")
    refusal_body = _json(
        "too_many_connections",
        f"more than {max_connections} connections are open; retry after Retry-After",
    )

    class MidserveHttpToolsProtocol(HttpToolsProtocol):
        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._header_timer: asyncio.TimerHandle | None = None
            self._reading = _IDLE
            self._heads_begun = 0  # requests whose first byte arrived, on this connection
            self._head_bytes = 0  # of the unfinished head, as counted (module docstring)
            self._head_refused = False  # a head over MAX_HEAD_BYTES: 431, then closed
            if max_connections is not None:
                self._inner_app = self.app
                self.app = self._admit

        # -- the header-read timeout ------------------------------------------------------
        def _arm(self) -> None:
            self._disarm()
            if header_read_timeout_s > 0:
                self._header_timer = self.loop.call_later(header_read_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _awaiting_headers(self) -> bool:
            """No request is being answered or queued: the next one's headers are awaited.
            (``self.cycle`` is the last request whose headers completed.)"""
            cycle = self.cycle
            return cycle is None or cycle.response_complete

        def _answer_and_close(self, status: bytes, body: bytes) -> None:
            head = [b"HTTP/1.1 " + status]
            head += [k + b": " + v for k, v in self.server_state.default_headers]
            head += [b"content-type: application/json",
                     b"content-length: " + str(len(body)).encode(),
                     b"connection: close"]  # fmt: skip
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            self.transport.close()

        def _expire(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._awaiting_headers():
                return
            partial = self._reading == _HEAD
            metrics.header_timeouts.labels("partial" if partial else "idle").inc()
            if partial:
                self._answer_and_close(b"408 Request Timeout", timeout_body)
            else:
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts a pipelined request already parsed
            if self.transport.is_closing() or not self._awaiting_headers():
                return
            if self._head_refused:  # found while this response was being written
                self._answer_and_close(b"431 Request Header Fields Too Large", head_body)
            else:
                self._arm()

        # -- where the parser is (httptools' callbacks) -----------------------------------
        def on_message_begin(self) -> None:
            self._reading = _HEAD
            self._heads_begun += 1
            self._head_bytes = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._reading = _BODY
            self._disarm()
            if len(self.url) + sum(len(k) + len(v) for k, v in self.headers) > MAX_HEAD_BYTES:
                self._head_refused = True
                raise _HeadTooLarge  # stops the parser; uvicorn answers send_400_response
            super().on_headers_complete()
            cycle = self.cycle  # the new request's (an upgrade makes none)
            if cycle is not None and cycle.transport is self.transport:
                cycle.transport = cast(asyncio.Transport, _OneWriteResponse(self.transport, cycle))

        def on_message_complete(self) -> None:
            self._reading = _IDLE
            super().on_message_complete()

        # -- the bound on a request's head ------------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._head_refused:
                return  # dropped: the connection is closed once its answer can be written
            reading, begun = self._reading, self._heads_begun
            super().data_received(data)
            if self._reading != _HEAD or self.transport.is_closing():
                return
            if self._heads_begun == begun:  # the whole read continues one head
                self._head_bytes += len(data)
            elif self._heads_begun == begun + 1 and reading == _IDLE:  # only CR/LF before it
                self._head_bytes = len(data.lstrip(b"\r\n"))
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_refused = True
                self._refuse_head()

        def send_400_response(self, msg: str) -> None:
            if self._head_refused:  # the parser stopped by on_headers_complete
                self._refuse_head()
            else:
                super().send_400_response(msg)

        def _refuse_head(self) -> None:
            if self._awaiting_headers():
                self._disarm()
                self._answer_and_close(b"431 Request Header Fields Too Large", head_body)
            else:  # a response is being written: no more reads; answered once it is complete
                self.flow.pause_reading()

        # -- the connection limit ---------------------------------------------------------
        async def _admit(
            self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            assert max_connections is not None
            if len(self.connections) <= max_connections and len(self.tasks) <= max_connections:
                await self._inner_app(scope, receive, send)
                return
            metrics.connections_refused.inc()
            await send({
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(refusal_body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": refusal_body, "more_body": False})

    return MidserveHttpToolsProtocol
