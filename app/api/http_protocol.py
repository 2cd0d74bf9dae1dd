"""uvicorn's HTTP/1.1 protocol with a header-read timeout and a connection limit.

Why: uvicorn (0.55, h11: httptools is not installed, so that is what "auto" picks) arms a
timer only after a response, as the keep-alive timeout, and cancels it on any byte received.
A connection that sends nothing, or its request line and headers a byte now and then, is
held forever; thousands of them exhaust file descriptors and memory. The request *body* is
timed out in the app (BodyLimitMiddleware); the headers are read before the app is called,
so their timeout has to live here.

- Every request's headers must be complete within ``header_read_timeout_s``: counted from
  the connection's opening for the first request, from the end of the previous response for
  the next ones on a kept-alive connection. Past it the connection is closed; if part of a
  request had arrived, it first gets a 408 JSON ``request_timeout`` body. A connection on
  which nothing at all arrived is closed without an answer, as an idle kept-alive
  connection is: a 408 there could cross a request the client was just sending on it and be
  read as that request's answer.
- A request arriving while more than ``max_connections`` connections are open (its own
  included), or more requests than that are still running (those of clients that left
  included), is answered 503 ``too_many_connections`` (JSON, ``Retry-After: 1``) and its
  connection closed. This replaces uvicorn's ``limit_concurrency``, whose 503 is plain text,
  counts its own connection against the limit (N refuses the Nth) and is not in /metrics.

``protocol_class()`` builds the class for ``uvicorn.run(http=...)`` around one app's
settings and metrics (uvicorn instantiates the class itself, with its own arguments).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from app.api.errors import error_body
from app.metrics import Metrics


def _json(kind: str, message: str) -> bytes:
    return json.dumps(error_body(kind, message)).encode()


def protocol_class(
    header_read_timeout_s: float, max_connections: int | None, metrics: Metrics
) -> type[H11Protocol]:
    """The H11Protocol subclass for ``uvicorn.run(http=...)``: headers timed out after
    ``header_read_timeout_s`` (0: never), requests past ``max_connections`` (None: no
    limit) refused, both counted in ``metrics``."""
    timeout_body = _json(
        "request_timeout", f"request headers not received within {header_read_timeout_s:g} s"
    )
    refusal_body = _json(
        "too_many_connections",
        f"more than {max_connections} connections are open; retry after Retry-After",
    )

    class MidserveH11Protocol(H11Protocol):
        def __init__(
            self,
            config: Config,
            server_state: ServerState,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._header_timer: asyncio.TimerHandle | None = None
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
            """No request is being answered: the next one's headers are awaited."""
            return self.cycle is None or self.cycle.response_complete

        def _expire(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._awaiting_headers():
                return
            buffered, _ = self.conn.trailing_data  # bytes of a request h11 is still parsing
            partial = bool(buffered.strip()) and self.conn.our_state is h11.IDLE
            metrics.header_timeouts.labels("partial" if partial else "idle").inc()
            if partial:
                head = [b"HTTP/1.1 408 Request Timeout"]
                head += [k + b": " + v for k, v in self.server_state.default_headers]
                head += [b"content-type: application/json",
                         b"content-length: " + str(len(timeout_body)).encode(),
                         b"connection: close"]  # fmt: skip
                self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + timeout_body)
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._header_timer is None:
                return
            if not self._awaiting_headers() or self.transport.get_protocol() is not self:
                self._disarm()  # headers complete (or upgraded to a WebSocket)

        def on_response_complete(self) -> None:
            # armed before uvicorn starts a pipelined request: its handle_events disarms
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

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

    return MidserveH11Protocol
