"""A small soak (studies/soak.py with 300 requests, run as the script it is): mixed sizes,
formats and view counts, no errors. The full 10,000-request run is
`python -m studies.soak` (not part of the test suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT
from tests.server import SERVER_ENV


@pytest.mark.slow
def test_300_mixed_requests_all_succeed(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    res = subprocess.run(
        [sys.executable, "-m", "studies.soak", "--requests", "300", "--concurrency", "8",
         "--window", "100", "--out", str(out)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **SERVER_ENV},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["statuses"] == {"200": 300} and result["errors"] == 0
    assert result["latency_ms"]["first"]["p99"] > 0 and result["latency_ms"]["last"]["p99"] > 0
