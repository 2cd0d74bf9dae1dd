"""REST routes of the Open Inference Protocol: server and model metadata, health, infer.

The same service, limits, deadlines, tokens and metrics as /v1; only the wire differs.
Errors leave as ``{"error": "message"}`` with the status the protocol's clients expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from app.api.errors import classify_error
from app.api.routes import ServiceDep, SettingsDep, require_token, require_token_unless_open
from app.api.v2.infer import (
    EXTRAS,
    PROBABILITIES,
    classification_counts,
    classify_params,
    image_elements,
    metadata_tensors,
    output_tensors,
    requested_outputs,
)
from app.api.v2.tensors import (
    HEADER_LENGTH,
    InferRequestBody,
    encode_infer_response,
    parse_infer_request,
)
from app.errors import (
    LimitExceededError,
    MidserveError,
    ModelNotReadyError,
    OverloadedError,
    UnknownModelError,
)
from app.pipeline import Prediction
from app.service import ClassifyService, ModelSlot

SERVER_NAME = "midserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification"]
MODEL_VERSION = "1"  # a model folder is one version
PLATFORM = "midserve_tta"

# bad input is 400 in this protocol (422 on /v1); the other kinds keep /v1's status
V2_STATUS = {"invalid_request": 400, "invalid_image": 400, "unsupported_media_type": 400}


def v2_error_response(exc: MidserveError) -> JSONResponse:
    status, kind = classify_error(exc)
    status = 413 if isinstance(exc, LimitExceededError) else V2_STATUS.get(kind, status)
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, ModelNotReadyError):
        headers["Retry-After"] = "5"
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


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


def _slot(service: ClassifyService, model: str, version: str | None) -> ModelSlot:
    slot = service.slot(model)
    if version is not None and version != MODEL_VERSION:
        raise UnknownModelError(f"{model} version {version}", [f"{model} version 1"])
    return slot


@router.get("", dependencies=Token)
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/health/live", dependencies=OpenProbe)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", dependencies=OpenProbe)
async def ready(service: ServiceDep) -> Response:
    if not service.ready:
        return JSONResponse({"error": "models are still loading or failed"}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/models/{model}/ready", dependencies=OpenProbe)
@router.get("/models/{model}/versions/{version}/ready", dependencies=OpenProbe)
async def model_ready(service: ServiceDep, model: str, version: str | None = None) -> Response:
    _slot(service, model, version).ready()  # not ready: 503 with the reason
    return JSONResponse({"name": model, "ready": True})


@router.get("/models/{model}", dependencies=Token)
@router.get("/models/{model}/versions/{version}", dependencies=Token)
async def model_metadata(
    service: ServiceDep, model: str, version: str | None = None
) -> dict[str, Any]:
    slot = _slot(service, model, version)
    cfg = service.repository.config(slot.name) if slot.engine is None else slot.engine.cfg
    inputs, outputs = metadata_tensors(cfg.num_classes)
    return {
        "name": slot.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


@router.post("/models/{model}/infer", dependencies=Token)
@router.post("/models/{model}/versions/{version}/infer", dependencies=Token)
async def infer(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    model: str,
    version: str | None = None,
) -> Response:
    started = time.perf_counter()
    slot = _slot(service, model, version)
    pipeline, _ = slot.ready()
    engine = pipeline.engine
    with service.observed(model) as record:
        try:
            body = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH))
            wanted = requested_outputs(body)
            counts = classification_counts(body)
            images = image_elements(body, settings)
            params = classify_params(
                body, engine.cfg, engine.model.labels, settings, len(images),
                max(counts.values(), default=0),
            )  # fmt: skip
            record.level = params.request.level
            outcomes = await service.classify(
                slot, images, params.request, params.labels, started + settings.request_timeout_s
            )
            preds: list[Prediction] = []
            for outcome in outcomes:
                if isinstance(outcome, MidserveError):  # a tensor has no holes: the request fails
                    raise outcome
                preds.append(outcome)
            binary = _binary_outputs(body, wanted)
            head: dict[str, Any] = {"model_name": slot.name, "model_version": MODEL_VERSION}
            if body.id is not None:
                head["id"] = body.id
            content, header_length = encode_infer_response(
                head, output_tensors(preds, wanted, counts), binary
            )
            binary_head = header_length is not None
            headers = {"Inference-Header-Content-Length": str(header_length)} if binary_head else {}
            ctype = "application/octet-stream" if binary_head else "application/json"
            response = Response(content, media_type=ctype, headers=headers)
        except MidserveError as exc:
            response = v2_error_response(exc)
            record.error = exc
        record.status = response.status_code
    return response


def _binary_outputs(body: InferRequestBody, wanted: list[str]) -> set[str]:
    """Outputs to send as binary: each one's ``binary_data``, else the request's
    ``binary_data_output``."""
    default = body.parameters.get("binary_data_output") is True
    names = wanted or [PROBABILITIES, *EXTRAS]
    per_output = {o["name"]: (o.get("parameters") or {}).get("binary_data") for o in body.outputs}
    return {n for n in names if (per_output.get(n) if per_output.get(n) is not None else default)}
