"""REST routes of the Open Inference Protocol: server and model metadata, health, infer.

The same service, limits, deadlines, tokens and metrics as /v1; only the wire differs.
Errors leave as ``{"error": "message"}`` with the status the protocol's clients expect.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from app.api.edge import MODEL_VERSION, Edge
from app.api.errors import v2_error_response
from app.api.routes import EdgeRoute, edge_of, require_token, require_token_unless_open
from app.api.v2.infer import EXTRAS, PROBABILITIES, model_metadata, server_metadata
from app.api.v2.infer import infer as infer_outputs
from app.api.v2.tensors import (
    HEADER_LENGTH,
    InferRequestBody,
    encode_infer_response,
    parse_infer_request,
)
from app.errors import MidserveError, ModelNotReadyError


def _v2_errors(
    handler: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """Domain errors, from the handler or its dependencies (the token check), in the
    protocol's error body."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except MidserveError as exc:
            return v2_error_response(exc)

    return run


class V2Route(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _v2_errors(super().get_route_handler())


class V2EdgeRoute(EdgeRoute):
    """The hot route (infer): no dependency solving, the protocol's error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _v2_errors(super().get_route_handler())


router = APIRouter(prefix="/v2", route_class=V2Route)
Token = [Depends(require_token)]
OpenProbe = [Depends(require_token_unless_open)]
EdgeDep = Annotated[Edge, Depends(edge_of)]


@router.get("", dependencies=Token)
async def server_meta() -> dict[str, Any]:
    return server_metadata()


@router.get("/health/live", dependencies=OpenProbe)
async def live(edge: EdgeDep) -> Response:
    """As /healthz: false (503) once a model is past its recovery limit."""
    live = edge.health().live
    return JSONResponse({"live": live}, status_code=200 if live else 503)


@router.get("/health/ready", dependencies=OpenProbe)
async def ready(edge: EdgeDep) -> Response:
    if not edge.health().ready:
        return JSONResponse({"error": "models are still loading or failed"}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/models/{model}/ready", dependencies=OpenProbe)
@router.get("/models/{model}/versions/{version}/ready", dependencies=OpenProbe)
async def model_ready(edge: EdgeDep, model: str, version: str | None = None) -> Response:
    ok, why = edge.model_health(model, version)
    if not ok:
        raise ModelNotReadyError(f"model {model!r} is not ready: {why}")
    return JSONResponse({"name": model, "ready": True})


@router.get("/models/{model}", dependencies=Token)
@router.get("/models/{model}/versions/{version}", dependencies=Token)
async def model_meta(edge: EdgeDep, model: str, version: str | None = None) -> dict[str, Any]:
    return model_metadata(edge, model, version)


async def infer(request: Request, model: str, version: str | None = None) -> Response:
    edge = edge_of(request)
    edge.authorize(request.headers.get("authorization", ""))

    async def parse() -> InferRequestBody:
        return parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH))

    body, outputs = await infer_outputs(edge, model, version, "v2", parse)
    head: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if body.id is not None:
        head["id"] = body.id
    binary = _binary_outputs(body, [o.name for o in outputs])
    content, header_length = encode_infer_response(head, outputs, binary)
    if header_length is None:
        return Response(content, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(content, media_type="application/octet-stream", headers=headers)


for path in ("/models/{model}/infer", "/models/{model}/versions/{version}/infer"):
    router.add_api_route(path, infer, methods=["POST"], route_class_override=V2EdgeRoute)


def _binary_outputs(body: InferRequestBody, wanted: list[str]) -> set[str]:
    """Outputs to send as binary: each one's ``binary_data``, else the request's
    ``binary_data_output``."""
    default = body.parameters.get("binary_data_output") is True
    names = wanted or [PROBABILITIES, *EXTRAS]
    per_output = {o["name"]: (o.get("parameters") or {}).get("binary_data") for o in body.outputs}
    return {n for n in names if (per_output.get(n) if per_output.get(n) is not None else default)}
