from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import running_server


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model behind a real server; a long max-wait so concurrent requests batch."""
    env = {
        "MIDSERVE_MAX_WAIT_MS": "30",
        "MIDSERVE_MAX_BATCH_VIEWS": "48",
        "MIDSERVE_MAX_VIEWS_PER_REQUEST": "40",
        "MIDSERVE_MAX_IMAGES_PER_REQUEST": "4",
        "MIDSERVE_MAX_BODY_BYTES": "2000000",
    }
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(tiny_repo, env=env, log_path=log) as base:
        yield base
