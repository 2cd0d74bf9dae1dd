"""Domain errors -> each protocol's status (/v1 and /v2 HTTP, gRPC: one table) and body."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import (
    ImageTooLargeError,
    InvalidRequestError,
    LimitExceededError,
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


@dataclass(frozen=True)
class ErrorStatus:
    """How one kind of domain error leaves each protocol's edge."""

    v1: int  # /v1 JSON: {"error": {"type", "message"}}
    v2: int  # Open Inference Protocol over REST: {"error": "message"}
    grpc: str  # Open Inference Protocol over gRPC: a grpc.StatusCode name


# Every domain error kind, as each protocol answers it, side by side. The protocol's
# clients expect 400 for bad input where /v1 answers 422 (and 415 for a body that is not an
# image); a limit (LimitExceededError, kind invalid_request) is 413 there. Any other kind is
# a server bug: INTERNAL_ERROR.
ERROR_STATUS: dict[str, ErrorStatus] = {
    "invalid_request": ErrorStatus(422, 400, "INVALID_ARGUMENT"),
    "over_limit": ErrorStatus(422, 413, "RESOURCE_EXHAUSTED"),
    "invalid_image": ErrorStatus(422, 400, "INVALID_ARGUMENT"),
    "unsupported_media_type": ErrorStatus(415, 400, "INVALID_ARGUMENT"),
    "too_large": ErrorStatus(413, 413, "RESOURCE_EXHAUSTED"),
    "unknown_model": ErrorStatus(404, 404, "NOT_FOUND"),
    "unauthorized": ErrorStatus(401, 401, "UNAUTHENTICATED"),
    "request_timeout": ErrorStatus(408, 408, "DEADLINE_EXCEEDED"),
    "overloaded": ErrorStatus(503, 503, "UNAVAILABLE"),
    "model_not_ready": ErrorStatus(503, 503, "UNAVAILABLE"),
    "deadline_exceeded": ErrorStatus(504, 504, "DEADLINE_EXCEEDED"),
    "forward_failed": ErrorStatus(500, 500, "INTERNAL"),
    "forward_stalled": ErrorStatus(503, 503, "UNAVAILABLE"),
    "out_of_memory": ErrorStatus(503, 503, "UNAVAILABLE"),
    "forward_worker_died": ErrorStatus(503, 503, "UNAVAILABLE"),
    "decode_budget": ErrorStatus(503, 503, "UNAVAILABLE"),
}
INTERNAL_ERROR = ErrorStatus(500, 500, "INTERNAL")


def error_status(exc: MidserveError) -> ErrorStatus:
    """The row of ``ERROR_STATUS`` that answers ``exc``."""
    row = "over_limit" if isinstance(exc, LimitExceededError) else exc.kind
    return ERROR_STATUS.get(row, INTERNAL_ERROR)


def classify_error(exc: MidserveError) -> tuple[int, str]:
    """(/v1 status, error type) of a domain error."""
    status = error_status(exc)
    return status.v1, exc.kind if status is not INTERNAL_ERROR else "internal_error"


def error_body(kind: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"type": kind, "message": message, **extra}}


def retry_after(exc: MidserveError) -> dict[str, str]:
    """The Retry-After header of an error worth retrying (overload, a model still loading,
    a server-side fault that another replica, or a second try, may not have)."""
    if isinstance(exc, OverloadedError):
        return {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    if isinstance(exc, ModelNotReadyError):
        return {"Retry-After": "5"}
    if error_status(exc).v1 == 503:
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
    """/v1's JSON answer to a domain error (an ASGI app too: middleware sends it as is)."""
    status, kind = classify_error(exc)
    return JSONResponse(error_body(kind, str(exc)), status_code=status, headers=error_headers(exc))


def v2_error_response(exc: MidserveError) -> JSONResponse:
    """The Open Inference Protocol's REST answer to a domain error."""
    return JSONResponse(
        {"error": str(exc)}, status_code=error_status(exc).v2, headers=error_headers(exc)
    )


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
