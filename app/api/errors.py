"""Domain errors -> HTTP status and a JSON body ``{"error": {"type", "message"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.errors import (
    DeadlineExceededError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidRequestError,
    MidserveError,
    ModelNotReadyError,
    OverloadedError,
    UnknownModelError,
)

log = logging.getLogger(__name__)


class UnsupportedMediaError(InvalidRequestError):
    """The request body is neither multipart nor an image."""


class UnauthorizedError(MidserveError):
    """Missing or wrong bearer token."""


class BodyTimeoutError(MidserveError):
    """The client sent its body too slowly (slow-loris protection)."""


class BodyTooLargeError(ImageTooLargeError):
    """A streamed (chunked) body grew past the limit while it was being read."""


# (status, type) per domain error; the first matching class wins, so order subclasses first.
STATUS: list[tuple[type[MidserveError], int, str]] = [
    (UnknownModelError, 404, "unknown_model"),
    (UnsupportedMediaError, 415, "unsupported_media_type"),
    (InvalidRequestError, 422, "invalid_request"),
    (InvalidImageError, 422, "invalid_image"),
    (ImageTooLargeError, 413, "too_large"),
    (UnauthorizedError, 401, "unauthorized"),
    (BodyTimeoutError, 408, "request_timeout"),
    (OverloadedError, 503, "overloaded"),
    (ModelNotReadyError, 503, "model_not_ready"),
    (DeadlineExceededError, 504, "deadline_exceeded"),
]


def classify_error(exc: MidserveError) -> tuple[int, str]:
    for cls, status, kind in STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


def error_body(kind: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"type": kind, "message": message, **extra}}


def error_response(exc: MidserveError) -> JSONResponse:
    status, kind = classify_error(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, ModelNotReadyError):
        headers["Retry-After"] = "5"
    elif isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, BodyTimeoutError | BodyTooLargeError):
        # The rest of the body was never read: close, or a dribbling client keeps the socket.
        headers["Connection"] = "close"
    return JSONResponse(error_body(kind, str(exc)), status_code=status, headers=headers)


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
