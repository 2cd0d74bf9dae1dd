"""Routes: classify, model listing, probes, metrics. Routes translate HTTP to the service
and back: no tensors and no metrics observed in here."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.errors import (
    UnauthorizedError,
    UnsupportedMediaError,
    classify_error,
    error_body,
    error_response,
)
from app.api.model_info import model_out, safe_model_out
from app.api.params import PARAM_NAMES, classify_openapi, parse_classify_params
from app.config import Settings
from app.errors import (
    InvalidImageError,
    InvalidRequestError,
    LimitExceededError,
    MidserveError,
)
from app.schemas import (
    ClassifyResponse,
    ErrorDetail,
    ErrorResponse,
    ImageResult,
    ModelList,
    ModelOut,
    Readiness,
)
from app.service import ClassifyService, Outcome

router = APIRouter()
probes = APIRouter()


def _service(request: Request) -> ClassifyService:
    return request.app.state.service


def _settings(request: Request) -> Settings:
    return request.app.state.settings


# typed dependencies: what a route needs is in its signature
ServiceDep = Annotated[ClassifyService, Depends(_service)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def require_token(request: Request) -> None:
    """Bearer-token check when tokens are configured; constant time over every token."""
    check_bearer(request.app.state.tokens, request.headers.get("authorization", ""))


def check_bearer(tokens: list[str], authorization: str) -> None:
    """``authorization`` (``Bearer <token>``) against the tokens; none configured: open.
    Shared by REST (the header) and gRPC (the metadata)."""
    if not tokens:
        return
    scheme, _, given = authorization.partition(" ")
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not ok:
        raise UnauthorizedError("missing or invalid bearer token")


def require_token_unless_open(request: Request) -> None:
    if not _settings(request).open_probes:
        require_token(request)


async def read_images(
    request: Request, settings: Settings
) -> tuple[list[tuple[str | None, bytes]], dict[str, list[str]]]:
    """The uploaded images (multipart field ``images`` or a raw image body) and form fields."""
    ctype = request.headers.get("content-type", "").lower()
    fields: dict[str, list[str]] = {}
    if ctype.startswith("multipart/form-data"):
        limit = settings.max_images_per_request
        try:
            form = await request.form(max_files=limit, max_fields=64)
        except StarletteHTTPException as exc:
            if "files" in str(exc.detail).lower():
                msg = f"too many files: at most {limit} images per request"
                raise LimitExceededError(msg) from exc
            raise InvalidRequestError(f"malformed multipart body: {exc.detail}") from exc
        images: list[tuple[str | None, bytes]] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "images":
                    raise InvalidRequestError(f"file in field {key!r}; upload images as 'images'")
                images.append((value.filename, await value.read()))
            elif key in PARAM_NAMES:
                fields.setdefault(key, []).append(value)
        if not images:
            raise InvalidRequestError("multipart body has no file in the field 'images'")
        return images, fields
    if ctype.startswith("image/") or ctype.startswith("application/octet-stream"):
        body = await request.body()
        if not body:
            raise InvalidImageError("empty body: no image bytes received")
        return [(None, body)], fields
    raise UnsupportedMediaError(
        f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data with files "
        "in the field 'images', or a raw image body with Content-Type image/*"
    )


ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 408, 413, 415, 422, 503, 504)}


@router.post(
    "/v1/models/{model}/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,  # type: ignore[arg-type]
    openapi_extra=classify_openapi(),
    dependencies=[Depends(require_token)],
    summary="Classify images with matched test-time views",
)
async def classify(
    model: str, request: Request, service: ServiceDep, settings: SettingsDep
) -> Response:
    started = time.perf_counter()
    slot = service.slot(model)
    pipeline, _ = slot.ready()
    engine = pipeline.engine
    with service.observed(model) as record:
        try:
            images, fields = await read_images(request, settings)
            raw: dict[str, list[str]] = {}
            for key, value in request.query_params.multi_items():
                raw.setdefault(key, []).append(value)
            for key, values in fields.items():
                raw.setdefault(key, []).extend(values)
            labels = engine.model.labels
            params = parse_classify_params(raw, engine.cfg, labels, settings, len(images))
            record.level = params.request.level
            deadline = started + settings.request_timeout_s
            outcomes = await service.classify(
                slot, [data for _, data in images], params.request, params.labels, deadline
            )
            response = _classify_response(slot.name, images, params.labels, outcomes, started)
        except MidserveError as exc:
            response = error_response(exc)
            record.error = exc
        record.status = response.status_code
    return response


def _classify_response(
    model: str,
    images: list[tuple[str | None, bytes]],
    labels: list[int | None],
    outcomes: list[Outcome],
    started: float,
) -> Response:
    """Per-image results; when every image failed, the first failure's status."""
    results: list[ImageResult] = []
    first_error: MidserveError | None = None
    for index, ((filename, _), label, outcome) in enumerate(
        zip(images, labels, outcomes, strict=True)
    ):
        if isinstance(outcome, MidserveError):
            first_error = first_error or outcome
            error = ErrorDetail(type=classify_error(outcome)[1], message=str(outcome))
            results.append(ImageResult(index=index, file=filename, error=error))
            continue
        result = outcome.result(index, filename)
        if label is not None:
            result.label = label
        results.append(result)
    total_ms = round((time.perf_counter() - started) * 1000.0, 3)
    if first_error is not None and all(r.error is not None for r in results):
        status, kind = classify_error(first_error)
        body = error_body(kind, str(first_error))
        body["results"] = [r.model_dump(exclude_unset=True) for r in results]
        return JSONResponse(body, status_code=status)
    response = ClassifyResponse(model=model, results=results, timings_ms={"total": total_ms})
    # unset fields stay out of the JSON: a result has either its answer or its error
    return JSONResponse(response.model_dump(exclude_unset=True))


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_token)])
async def list_models(service: ServiceDep) -> ModelList:
    outs = [safe_model_out(service, slot) for slot in service.slots.values()]
    return ModelList(models=[m for m in outs if m is not None])


@router.get(
    "/v1/models/{model}",
    response_model=ModelOut,
    responses={404: {"model": ErrorResponse}},
    dependencies=[Depends(require_token)],
)
async def get_model(model: str, service: ServiceDep) -> ModelOut:
    return model_out(service, service.slot(model))


@probes.get("/healthz", dependencies=[Depends(require_token_unless_open)])
async def healthz(service: ServiceDep) -> Response:
    """Alive: the process answers (models may still be loading), and no model has stayed
    out of readiness past ``recovery_limit_s`` after a stalled forward (503 names it: a
    restart is what brings it back)."""
    unrecovered = service.unrecovered()
    if unrecovered:
        return JSONResponse({"status": "unrecovered", "models": unrecovered}, status_code=503)
    return JSONResponse({"status": "ok"})


@probes.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    dependencies=[Depends(require_token_unless_open)],
)
async def readyz(service: ServiceDep) -> Response:
    """Ready: every configured model is loaded, warmed up and not recovering from a stalled
    forward; 503 names the ones that are not, and why."""
    body = Readiness(ready=service.ready, models=service.readiness()).model_dump()
    return JSONResponse(body, status_code=200 if service.ready else 503)


@probes.get("/metrics", dependencies=[Depends(require_token_unless_open)])
async def metrics(service: ServiceDep) -> Response:
    service.refresh_eval_metrics()
    registry = service.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
