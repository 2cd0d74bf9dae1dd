"""REST routes of the Open Inference Protocol: server and model metadata, health, infer.

The same service, limits, deadlines, tokens and metrics as /v1; only the wire differs.
Errors leave as ``{"error": "message"}`` with the status the protocol's clients expect.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from app.api.errors import error_headers
from app.api.routes import ServiceDep, require_token, require_token_unless_open
from app.api.v2 import handlers
from app.api.v2.handlers import (
    EXTENSIONS,
    MODEL_VERSION,
    SERVER_NAME,
    SERVER_VERSION,
    v2_status,
)
from app.api.v2.infer import EXTRAS, PROBABILITIES
from app.api.v2.tensors import (
    HEADER_LENGTH,
    InferRequestBody,
    encode_infer_response,
    parse_infer_request,
)
from app.errors import MidserveError


def v2_error_response(exc: MidserveError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=v2_status(exc), headers=error_headers(exc))


class V2Route(APIRoute):
    """Domain errors, from the handler or its dependencies (the token check), in the
    protocol's error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except MidserveError as exc:
                return v2_error_response(exc)

        return run


router = APIRouter(prefix="/v2", route_class=V2Route)
Token = [Depends(require_token)]
OpenProbe = [Depends(require_token_unless_open)]


@router.get("", dependencies=Token)
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/health/live", dependencies=OpenProbe)
async def live(service: ServiceDep) -> Response:
    """As /healthz: false (503) once a model is past its recovery limit."""
    if service.unrecovered():
        return JSONResponse({"live": False}, status_code=503)
    return JSONResponse({"live": True})


@router.get("/health/ready", dependencies=OpenProbe)
async def ready(service: ServiceDep) -> Response:
    if not service.ready:
        return JSONResponse({"error": "models are still loading or failed"}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/models/{model}/ready", dependencies=OpenProbe)
@router.get("/models/{model}/versions/{version}/ready", dependencies=OpenProbe)
async def model_ready(service: ServiceDep, model: str, version: str | None = None) -> Response:
    handlers.model_slot(service, model, version).ready()  # not ready: 503 with the reason
    return JSONResponse({"name": model, "ready": True})


@router.get("/models/{model}", dependencies=Token)
@router.get("/models/{model}/versions/{version}", dependencies=Token)
async def model_metadata(
    service: ServiceDep, model: str, version: str | None = None
) -> dict[str, Any]:
    return handlers.model_metadata(service, model, version)


@router.post("/models/{model}/infer", dependencies=Token)
@router.post("/models/{model}/versions/{version}/infer", dependencies=Token)
async def infer(
    request: Request, service: ServiceDep, model: str, version: str | None = None
) -> Response:
    raw = await request.body()
    length = request.headers.get(HEADER_LENGTH)
    body, outputs = await handlers.infer(
        service, model, version, lambda: parse_infer_request(raw, length), v2_status
    )
    head: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if body.id is not None:
        head["id"] = body.id
    binary = _binary_outputs(body, [o.name for o in outputs])
    content, header_length = encode_infer_response(head, outputs, binary)
    if header_length is None:
        return Response(content, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(content, media_type="application/octet-stream", headers=headers)


def _binary_outputs(body: InferRequestBody, wanted: list[str]) -> set[str]:
    """Outputs to send as binary: each one's ``binary_data``, else the request's
    ``binary_data_output``."""
    default = body.parameters.get("binary_data_output") is True
    names = wanted or [PROBABILITIES, *EXTRAS]
    per_output = {o["name"]: (o.get("parameters") or {}).get("binary_data") for o in body.outputs}
    return {n for n in names if (per_output.get(n) if per_output.get(n) is not None else default)}
