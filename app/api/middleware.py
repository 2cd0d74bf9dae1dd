"""ASGI middleware: request-body limits (size and slow senders) and request counting."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BodyTimeoutError
from app.errors import ImageTooLargeError
from app.metrics import Metrics


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (413) and senders that stall mid-body (408).

    A declared Content-Length over the limit is refused before any byte is read; a
    chunked body is counted as it streams. Each body chunk must arrive within
    ``read_timeout_s``, which ends slow-loris uploads.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, "too_large",
                             f"request body of {int(declared)} bytes is over the limit of "
                             f"{self.max_bytes} bytes")  # fmt: skip
            return
        received = 0
        body_done = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError as exc:
                raise BodyTimeoutError(
                    f"request body not received within {self.read_timeout_s:g} s"
                ) from exc
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise ImageTooLargeError(
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


async def _send_json(send: Send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
