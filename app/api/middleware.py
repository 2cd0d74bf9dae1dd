"""ASGI middleware: request-body limits (size, slow senders, bytes in flight over every
request) and request counting."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import (
    BodyBytesInFlightError,
    BodyTimeoutError,
    BodyTooLargeError,
    error_response,
)
from app.errors import MidserveError
from app.metrics import Metrics


class BodyBytesInFlight:
    """Request-body bytes held by every request in flight, against ``bound`` (0: none).

    Only touched from the event loop, with no await between a check and its update, so it
    needs no lock.
    """

    def __init__(self, bound: int, metrics: Metrics) -> None:
        self.bound = bound
        self.held = 0
        self._gauge = metrics.body_bytes_in_flight
        self._refused = metrics.body_bytes_refused

    def take(self, n: int, taking: str, when: str) -> None:
        """Hold ``n`` more bytes, or raise BodyBytesInFlightError (counted, by ``when``)."""
        if self.bound and self.held + n > self.bound:
            self._refused.labels(when).inc()
            raise BodyBytesInFlightError(self.held, taking, self.bound)
        self.held += n
        self._gauge.set(self.held)

    def give_back(self, n: int) -> None:
        self.held -= n
        self._gauge.set(self.held)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (413), senders that stall or dribble (408), and
    bodies that would take the bytes held by every request in flight over ``in_flight``'s
    bound (503 ``overloaded`` with Retry-After).

    A declared Content-Length is checked before any byte is read: over the limit, 413; else
    it is reserved whole in ``in_flight`` (503 when it does not fit). A chunked body is
    counted as it streams, against both. What a request holds is given back when it ends,
    however it ends (answer, error, disconnect, timeout). Each body chunk must arrive within
    ``read_timeout_s``, and the whole body within ``read_timeout_s`` plus one second per
    ``min_rate`` bytes received: a client sending a byte now and then (slow loris) is ended,
    while a large upload over a slow but honest link is not.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        read_timeout_s: float,
        min_rate: float = 50_000.0,
        in_flight: BodyBytesInFlight | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.min_rate = min_rate
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else 0
        held = 0  # bytes this request holds in in_flight
        try:
            if length > self.max_bytes:
                raise BodyTooLargeError(
                    f"request body of {length} bytes is over the limit of {self.max_bytes} bytes"
                )
            if length and self.in_flight is not None:
                self.in_flight.take(length, f"this body's {length} bytes", "declared")
                held = length
        except MidserveError as exc:  # refused before a byte of the body is read
            await error_response(exc)(scope, receive, send)
            return
        received = 0
        body_done = False
        started: float | None = None

        async def guarded_receive() -> Message:
            nonlocal received, body_done, started, held
            if body_done:
                return await receive()
            now = time.monotonic()
            started = now if started is None else started
            budget = started + self.read_timeout_s + received / self.min_rate - now
            try:
                message = await asyncio.wait_for(receive(), min(self.read_timeout_s, budget))
            except TimeoutError as exc:
                raise BodyTimeoutError(
                    f"request body not received within {self.read_timeout_s:g} s (at least "
                    f"{self.min_rate:g} bytes/s after the first {self.read_timeout_s:g} s)"
                ) from exc
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                received += chunk
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLargeError(
                        f"request body is over the limit of {self.max_bytes} bytes"
                    )
                if received > held and self.in_flight is not None:  # a chunked body
                    more, before = received - held, received - chunk
                    taking = f"this body's next {more} bytes ({before} received so far)"
                    self.in_flight.take(more, taking, "chunked")
                    held = received
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            if self.in_flight is not None:
                self.in_flight.give_back(held)


class RequestCountMiddleware:
    """``midserve_requests_total{route, status}`` with the route template as label."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, str(status)).inc()
