from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.bad_inputs import BODY_LIMIT, MAX_PIXELS, READ_TIMEOUT_S
from tests.server import running_server


@pytest.fixture(scope="session")
def strict_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model behind a real server with small limits, so every limit can be hit."""
    env = {
        "MIDSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
        "MIDSERVE_MAX_PIXELS": str(MAX_PIXELS),
        "MIDSERVE_BODY_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "MIDSERVE_MAX_VIEWS_PER_REQUEST": "40",
        "MIDSERVE_MAX_IMAGES_PER_REQUEST": "4",
        "MIDSERVE_MAX_WAIT_MS": "2",
    }
    log = tmp_path_factory.mktemp("strict-server") / "server.log"
    with running_server(tiny_repo, env=env, log_path=log) as base:
        yield base
