"""ASGI middleware: request-body limits (size and slow senders) and request counting."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BodyTimeoutError, BodyTooLargeError, error_response
from app.metrics import Metrics


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (413) and senders that stall or dribble (408).

    A declared Content-Length over the limit is refused before any byte is read; a
    chunked body is counted as it streams. Each body chunk must arrive within
    ``read_timeout_s``, and the whole body within ``read_timeout_s`` plus one second per
    ``min_rate`` bytes received: a client sending a byte now and then (slow loris) is
    ended, while a large upload over a slow but honest link is not.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, read_timeout_s: float, min_rate: float = 50_000.0
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            exc = BodyTooLargeError(
                f"request body of {int(declared)} bytes is over the limit of {self.max_bytes} bytes"
            )
            await error_response(exc)(scope, receive, send)
            return
        received = 0
        body_done = False
        started: float | None = None

        async def guarded_receive() -> Message:
            nonlocal received, body_done, started
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
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLargeError(
                        f"request body is over the limit of {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, guarded_receive, send)


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
