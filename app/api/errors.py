"""Domain errors -> HTTP status and a JSON body ``{"error": {"type", "message"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import (
    ImageTooLargeError,
    InvalidRequestError,
    MidserveError,
    ModelNotReadyError,
    OverloadedError,
)

log = logging.getLogger(__name__)


class UnsupportedMediaError(InvalidRequestError):
    """The request body is neither multipart nor an image."""

    kind = "unsupported_media_type"


class UnauthorizedError(MidserveError):
    """Missing or wrong bearer token."""

    kind = "unauthorized"


class BodyTimeoutError(MidserveError):
    """The client sent its body too slowly (slow-loris protection)."""

    kind = "request_timeout"


class BodyTooLargeError(ImageTooLargeError):
    """A streamed (chunked) body grew past the limit while it was being read."""


class BodyBytesInFlightError(OverloadedError):
    """Taking this body would hold more request-body bytes at once, over every request in
    flight, than MIDSERVE_MAX_INFLIGHT_BODY_BYTES allows; the client should retry later."""

    def __init__(self, in_flight: int, taking: str, bound: int) -> None:
        super().__init__(
            f"{in_flight} bytes of request bodies are in flight and the bound is {bound} bytes "
            f"(MIDSERVE_MAX_INFLIGHT_BODY_BYTES): {taking} would pass it; retry later",
            retry_after_s=1.0,
        )


# errors answered before the body was read to its end: the connection is closed after them,
# or a dribbling client keeps the socket
UNREAD_BODY = (BodyTimeoutError, BodyTooLargeError, BodyBytesInFlightError)


# the status of each error kind; any other error is a server bug: 500
STATUS = {
    "unknown_model": 404,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "invalid_image": 422,
    "too_large": 413,
    "unauthorized": 401,
    "request_timeout": 408,
    "overloaded": 503,
    "model_not_ready": 503,
    "deadline_exceeded": 504,
    "forward_failed": 500,
    "forward_stalled": 503,
    "out_of_memory": 503,
    "forward_worker_died": 503,
    "decode_budget": 503,
}


def classify_error(exc: MidserveError) -> tuple[int, str]:
    """(HTTP status, error type) of a domain error."""
    if exc.kind in STATUS:
        return STATUS[exc.kind], exc.kind
    return 500, "internal_error"


def error_body(kind: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"type": kind, "message": message, **extra}}


def retry_after(exc: MidserveError) -> dict[str, str]:
    """The Retry-After header of an error worth retrying (overload, a model still loading,
    a server-side fault that another replica, or a second try, may not have)."""
    if isinstance(exc, OverloadedError):
        return {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    if isinstance(exc, ModelNotReadyError):
        return {"Retry-After": "5"}
    if classify_error(exc)[0] == 503:
        return {"Retry-After": "1"}
    return {}


def error_headers(exc: MidserveError) -> dict[str, str]:
    """The headers that go with a domain error, whatever the body's protocol."""
    headers = retry_after(exc)
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, UNREAD_BODY):
        headers["Connection"] = "close"
    return headers


def error_response(exc: MidserveError) -> JSONResponse:
    """The JSON answer to a domain error (an ASGI app too: middleware sends it as is)."""
    status, kind = classify_error(exc)
    return JSONResponse(error_body(kind, str(exc)), status_code=status, headers=error_headers(exc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MidserveError)
    async def _domain(_: Request, exc: MidserveError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse(error_body("invalid_request", "; ".join(parts)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # The client hung up mid-body: nobody reads this answer, and it is not a server bug.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        body = error_body("client_closed_request", "client closed the connection")
        return JSONResponse(body, status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
