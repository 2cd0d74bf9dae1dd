"""/v1: classify, model listing, probes, metrics. A codec around the edge contract
(api/edge.py): multipart or raw image bytes and query text in, JSON out; no tensors, no
metrics observed, no token or readiness rule of its own in here."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.edge import ClassifyCall, Edge
from app.api.errors import UnsupportedMediaError
from app.api.model_info import model_out, safe_model_out
from app.api.params import PARAM_NAMES, classify_openapi
from app.api.results import classify_answer
from app.config import Settings
from app.errors import InvalidImageError, InvalidRequestError, LimitExceededError
from app.schemas import ClassifyResponse, ErrorResponse, ModelList, ModelOut, Readiness
from app.serving.service import ClassifyService


def edge_of(request: Request) -> Edge:
    return request.app.state.edge


def _service(request: Request) -> ClassifyService:
    return request.app.state.service


def require_token(request: Request) -> None:
    """Bearer-token check when tokens are configured (the edge's one rule)."""
    edge_of(request).authorize(request.headers.get("authorization", ""))


def require_token_unless_open(request: Request) -> None:
    edge_of(request).authorize_probe(request.headers.get("authorization", ""))


class EdgeRoute(APIRoute):
    """A hot route: its endpoint is called with the request and the path parameters, no
    dependency solved per request (the endpoint asks the edge for tokens and the rest).
    The OpenAPI document is still built from the endpoint's signature, ``response_model``,
    ``responses`` and ``openapi_extra``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            response: Response = await endpoint(request, **request.path_params)
            return response

        return handler


router = APIRouter()
probes = APIRouter()


async def read_images(request: Request, settings: Settings) -> ClassifyCall:
    """The uploaded images (multipart field ``images`` or a raw image body) and the
    parameters: query text, and form fields merged after it."""
    ctype = request.headers.get("content-type", "").lower()
    raw: dict[str, list[str]] = {}
    for key, text in request.query_params.multi_items():
        raw.setdefault(key, []).append(text)
    if ctype.startswith("multipart/form-data"):
        limit = settings.max_images_per_request
        try:
            form = await request.form(max_files=limit, max_fields=64)
        except StarletteHTTPException as exc:
            if "files" in str(exc.detail).lower():
                msg = f"too many files: at most {limit} images per request"
                raise LimitExceededError(msg) from exc
            raise InvalidRequestError(f"malformed multipart body: {exc.detail}") from exc
        images: list[bytes] = []
        files: list[str | None] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "images":
                    raise InvalidRequestError(f"file in field {key!r}; upload images as 'images'")
                images.append(await value.read())
                files.append(value.filename)
            elif key in PARAM_NAMES:
                raw.setdefault(key, []).append(str(value))
        if not images:
            raise InvalidRequestError("multipart body has no file in the field 'images'")
        return ClassifyCall(images, raw, files)
    if ctype.startswith("image/") or ctype.startswith("application/octet-stream"):
        body = await request.body()
        if not body:
            raise InvalidImageError("empty body: no image bytes received")
        return ClassifyCall([body], raw, [None])
    raise UnsupportedMediaError(
        f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data with files "
        "in the field 'images', or a raw image body with Content-Type image/*"
    )


ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 408, 413, 415, 422, 503, 504)}


async def classify(request: Request, model: str) -> Response:
    edge = edge_of(request)
    edge.authorize(request.headers.get("authorization", ""))

    async def read() -> ClassifyCall:
        return await read_images(request, edge.settings)

    done = await edge.classify(model, None, "v1", read)
    call = done.call
    return classify_answer(
        done.model, done.outcomes, call.files, done.params.labels, done.status, done.elapsed_ms
    )


router.add_api_route(
    "/v1/models/{model}/classify",
    classify,
    methods=["POST"],
    response_model=ClassifyResponse,
    responses=ERRORS,  # type: ignore[arg-type]
    openapi_extra=classify_openapi(),
    summary="Classify images with matched test-time views",
    route_class_override=EdgeRoute,
)


ServiceDep = Annotated[ClassifyService, Depends(_service)]
EdgeDep = Annotated[Edge, Depends(edge_of)]


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
async def healthz(edge: EdgeDep) -> Response:
    """Alive: the process answers (models may still be loading), and no model has stayed
    out of readiness past ``recovery_limit_s`` after a stalled forward (503 names it: a
    restart is what brings it back)."""
    health = edge.health()
    if not health.live:
        body = {"status": "unrecovered", "models": health.unrecovered}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok"})


@probes.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    dependencies=[Depends(require_token_unless_open)],
)
async def readyz(edge: EdgeDep) -> Response:
    """Ready: every configured model is loaded, warmed up and not recovering from a stalled
    forward; 503 names the ones that are not, and why."""
    health = edge.health()
    body = {"ready": health.ready, "models": health.models}
    return JSONResponse(body, status_code=200 if health.ready else 503)


@probes.get("/metrics", dependencies=[Depends(require_token_unless_open)])
async def metrics(service: ServiceDep) -> Response:
    service.refresh_eval_metrics()
    registry = service.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
