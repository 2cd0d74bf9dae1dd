"""The try-it web page: GET / answers app/static/index.html, its script and style are served
from /static/ui. Files ship inside the package (package-data), so no CDN and no build step."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

web = APIRouter()


@web.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The page itself needs no token; the API calls it makes carry the user's token."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def install_web(app: FastAPI) -> None:
    app.include_router(web)
    app.mount("/static/ui", StaticFiles(directory=STATIC_DIR), name="web-ui")
