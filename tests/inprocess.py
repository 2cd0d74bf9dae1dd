"""The real application in this process: ``create_app(Settings(...))`` behind FastAPI's
TestClient (which runs the lifespan: the service starts, models load in the background),
and concurrent requests on the app's own event loop.

Everything but the socket is the server's: routing, middleware (body limits, request
counting), error handlers, the batcher and its forward threads. Tests that need a real
socket (slow clients, raw HTTP, signals) start a subprocess with tests/server.py instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

BASE_URL = "http://testserver"
Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def tiny_settings(models_dir: Path, models: list[str] | None = None, **settings: Any) -> Settings:
    """The suite's in-process settings: the tiny model on one CPU thread, float32, untuned
    (answers compare exactly with the in-process float32 engine)."""
    base: dict[str, Any] = {
        "models": models or ["tiny"],
        "models_dir": models_dir,
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "tune": False,
    }
    return Settings(**{**base, **settings})


def wait_until_ready(client: TestClient, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (res := client.get("/readyz")).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app was not ready within {timeout_s:g} s: {res.text}")
        time.sleep(0.05)


@contextlib.contextmanager
def in_process_app(settings: Settings, *, wait_ready: bool = True) -> Iterator[TestClient]:
    """The app built from ``settings``, started; yielded once /readyz answers 200 (or at
    once with ``wait_ready=False``); shut down on exit."""
    with TestClient(create_app(settings), base_url=BASE_URL) as client:
        if wait_ready:
            wait_until_ready(client)
        yield client


@contextlib.contextmanager
def app_with_grpc(
    repo: Path, *, wait_ready: bool = True, **settings: Any
) -> Iterator[tuple[TestClient, Any]]:
    """The app of ``tiny_settings(repo, **settings)`` with its gRPC server on a free port
    of 127.0.0.1, and the official gRPC client of it (tritonclient[grpc]). A port taken
    between ``free_port`` and the bind is tried again on a new one."""
    from tritonclient import grpc as grpcclient

    from app.serve_process import free_port

    for attempt in range(3):
        port = free_port()
        try:
            with in_process_app(
                tiny_settings(repo, grpc_port=port, grpc_host="127.0.0.1", **settings),
                wait_ready=wait_ready,
            ) as client:
                yield client, grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
                return
        except RuntimeError as exc:
            if "bind" not in str(exc).lower() or attempt == 2:
                raise


def concurrently(client: TestClient, calls: list[Call], timeout_s: float = 60.0) -> list[Any]:
    """Run ``calls`` at once (asyncio.gather) on the app's event loop, each with an
    httpx.AsyncClient over ASGI; their responses in order."""

    async def run() -> list[Any]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(
            transport=transport, base_url=BASE_URL, timeout=timeout_s
        ) as http:
            return list(await asyncio.gather(*(call(http) for call in calls)))

    portal = client.portal
    assert portal is not None, "concurrently() needs a started client (inside its with block)"
    return portal.call(run)
