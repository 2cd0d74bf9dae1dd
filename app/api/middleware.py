"""The app's one ASGI layer of its own: every request counted, its body bounded (size, slow
senders, bytes in flight over every request). One layer, not one per concern: each layer
is a coroutine and a wrapped ``send`` per request on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import (
    BodyBytesInFlightError,
    BodyTimeoutError,
    BodyTooLargeError,
    error_response,
)
from app.config import Settings
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


class RequestMiddleware:
    """``midserve_requests_total{route, status}`` for every request (the route template as
    label), and the body rules: refuse bodies over ``max_bytes`` (413), senders that stall
    or dribble (408), and bodies that would take the bytes held by every request in flight
    over ``in_flight``'s bound (503 ``overloaded`` with Retry-After).

    A declared Content-Length is checked before any byte is read: over the limit, 413; else
    it is reserved whole in ``in_flight`` (503 when it does not fit: answered at once, the
    body then read and dropped, see ``_Body.lingering``). A chunked body is counted as it
    streams, against both. What a request holds is given back when it ends, however it
    ends (answer, error, disconnect, timeout). Each body chunk must arrive within
    ``read_timeout_s``, and the whole body within ``read_timeout_s`` plus one second per
    ``min_rate`` bytes received: a client sending a byte now and then (slow loris) is ended,
    while a large upload over a slow but honest link is not.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_bytes: int,
        read_timeout_s: float,
        min_rate: float = 50_000.0,
        in_flight: BodyBytesInFlight | None = None,
    ) -> None:
        self.app = app
        self.requests = metrics.requests
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.min_rate = min_rate
        self.in_flight = in_flight

    @classmethod
    def from_settings(cls, app: ASGIApp, settings: Settings, metrics: Metrics) -> RequestMiddleware:
        """The layer with the operator's limits: the served app's, and a study's that puts
        its own route in the same layer."""
        return cls(
            app, metrics, settings.max_body_bytes, settings.body_read_timeout_s,
            settings.body_min_rate_bytes_s,
            BodyBytesInFlight(settings.max_inflight_body_bytes, metrics),
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._bounded(scope, receive, counted)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.requests.labels(template, str(status)).inc()

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else 0
        body = _Body(self, receive)
        try:
            if length > self.max_bytes:
                raise BodyTooLargeError(
                    f"request body of {length} bytes is over the limit of {self.max_bytes} bytes"
                )
            if length and self.in_flight is not None:
                body.take(length, f"this body's {length} bytes", "declared")
        except MidserveError as exc:  # refused before a byte of the body is read
            await error_response(exc)(scope, body.receive, body.lingering(send))
            return
        try:
            await self.app(scope, body.receive, body.lingering(send))
        finally:
            if self.in_flight is not None:
                self.in_flight.give_back(body.held)


class _Body:
    """One request's body as the app receives it: the size limit, the slow-client rules,
    and the bytes it holds in the bound in flight."""

    def __init__(self, limits: RequestMiddleware, receive: Receive) -> None:
        self.limits = limits
        self._receive = receive
        self.received = 0
        self.done = False
        self.started: float | None = None
        self.held = 0  # bytes this request holds in limits.in_flight
        self.refused = False  # answered 503 for the bound with the body still coming

    def take(self, n: int, taking: str, when: str) -> None:
        assert self.limits.in_flight is not None
        try:
            self.limits.in_flight.take(n, taking, when)
        except BodyBytesInFlightError:
            self.refused = True
            raise
        self.held += n

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        limits, now = self.limits, time.monotonic()
        self.started = now if self.started is None else self.started
        budget = self.started + limits.read_timeout_s + self.received / limits.min_rate - now
        try:
            # a deadline on this task, not wait_for's new task per chunk
            async with asyncio.timeout(min(limits.read_timeout_s, budget)):
                message = await self._receive()
        except TimeoutError as exc:
            raise BodyTimeoutError(
                f"request body not received within {limits.read_timeout_s:g} s (at least "
                f"{limits.min_rate:g} bytes/s after the first {limits.read_timeout_s:g} s)"
            ) from exc
        if message["type"] == "http.request":
            chunk = len(message.get("body", b""))
            self.received += chunk
            self.done = not message.get("more_body", False)
            if self.received > limits.max_bytes:
                raise BodyTooLargeError(
                    f"request body is over the limit of {limits.max_bytes} bytes"
                )
            if self.received > self.held and limits.in_flight is not None and not self.refused:
                more, before = self.received - self.held, self.received - chunk
                self.take(more, f"this body's next {more} bytes ({before} received so far)",
                          "chunked")  # fmt: skip
        return message

    def lingering(self, send: Send) -> Send:
        """``send``, except that a 503 for the bound in flight is held open (its whole
        answer sent, its end not) while the rest of the body is read and dropped: a client
        that sends all of its body before it reads (most do) then gets the answer, not a
        reset from a socket closed on unread bytes. Dropped bytes hold no memory; the size
        limit and the slow-client rules bound the reading."""

        async def lingering_send(message: Message) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if not (last and self.refused and not self.done):
                await send(message)
                return
            await send({**message, "more_body": True})
            with contextlib.suppress(MidserveError):
                while not self.done and (await self.receive())["type"] == "http.request":
                    pass
            await send({"type": "http.response.body", "body": b""})

        return lingering_send
