from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.inprocess import in_process_app, tiny_settings

# a long max-wait so concurrent requests batch; small limits so each can be hit
LIMITS = {
    "max_wait_ms": 30,
    "max_batch_views": 48,
    "max_views_per_request": 40,
    "max_images_per_request": 4,
    "max_body_bytes": 2_000_000,
}


@pytest.fixture(scope="module")
def api(tiny_repo: Path) -> Iterator[TestClient]:
    """The real app with the tiny model, in this process, started and ready."""
    with in_process_app(tiny_settings(tiny_repo, **LIMITS)) as client:
        yield client
