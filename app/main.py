"""create_app(): the FastAPI application. Heavy loading happens after start-up, in the
background, so probes answer at once and /readyz tells when every model is warm."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.api.edge import Edge
from app.api.errors import install_error_handlers
from app.api.middleware import RequestMiddleware
from app.api.routes import probes, require_token, router
from app.api.v2.routes import router as v2_router
from app.api.web import install_web
from app.config import Settings, get_settings
from app.metrics import Metrics
from app.runtime.plan import EngineOptions
from app.serving.service import ClassifyService

log = logging.getLogger(__name__)


def _docs_assets() -> Path:
    """Swagger UI / ReDoc files shipped in the fastapi-offline wheel (no CDN)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _load_tokens(settings: Settings) -> list[str]:
    tokens = [t for t in settings.auth_tokens if t]
    if settings.auth_tokens_file is not None:
        lines = settings.auth_tokens_file.read_text().splitlines()
        tokens += [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return tokens


def create_app(settings: Settings | None = None, options: EngineOptions | None = None) -> FastAPI:
    """The app; ``options`` (the bench's older preparation paths) replace the engine options
    ``settings`` give."""
    settings = settings or get_settings()
    metrics = Metrics()
    service = ClassifyService(settings, metrics, options)

    tokens = _load_tokens(settings)
    edge = Edge(service, tokens)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        grpc_server = None
        if settings.grpc_port:  # imported only when asked for: grpcio is an optional extra
            from app.api.v2.grpc_server import start_grpc

            grpc_server = await start_grpc(edge, settings.grpc_host, settings.grpc_port)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=settings.request_timeout_s)
        await service.stop()

    app = FastAPI(
        title="midserve",
        summary="Test-time augmentation (Matched Inference Distributions) for image classifiers",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the tokens unless MIDSERVE_PUBLIC_DOCS
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.edge = edge
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(probes)
    app.include_router(v2_router)
    app.add_middleware(RequestMiddleware.from_settings, settings=settings, metrics=metrics)
    app.mount("/static/docs", StaticFiles(directory=_docs_assets()), name="docs-assets")
    install_web(app)

    docs_guard = [] if settings.public_docs else [Depends(require_token)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs_guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs_guard)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="midserve API",
            swagger_js_url="/static/docs/swagger-ui-bundle.js",
            swagger_css_url="/static/docs/swagger-ui.css",
            swagger_favicon_url="/static/docs/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False, dependencies=docs_guard)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="midserve API",
            redoc_js_url="/static/docs/redoc.standalone.js",
            redoc_favicon_url="/static/docs/favicon.png",
            with_google_fonts=False,
        )

    return app
