"""The one launcher (app/serve_process.py): start a process, wait for its URL, stop it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.serve_process import answers_200, free_port, running_process


def test_a_process_is_yielded_once_its_url_answers_and_stopped_after(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "ready").write_text("ok")
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
           "--directory", str(tmp_path)]  # fmt: skip
    url = f"http://127.0.0.1:{port}/ready"
    with running_process(cmd, url, log_path=tmp_path / "log.txt", name="http.server") as proc:
        assert proc.poll() is None and answers_200(url)
        assert not answers_200(f"http://127.0.0.1:{port}/absent")  # a 404 is not ready
    assert proc.returncode is not None and not answers_200(url)


def test_a_process_that_exits_early_fails_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"]
    with (
        pytest.raises(RuntimeError, match=r"(?s)early exited with 3 .*bad config"),
        running_process(cmd, f"http://127.0.0.1:{free_port()}/", log_path=tmp_path / "log",
                        name="early"),
    ):  # fmt: skip
        pass


def test_a_process_never_ready_is_stopped_after_the_timeout() -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    with (
        pytest.raises(RuntimeError, match="sleeper was not ready within 0.5 s"),
        running_process(cmd, f"http://127.0.0.1:{free_port()}/", name="sleeper",
                        ready_timeout_s=0.5, stop_timeout_s=5),
    ):  # fmt: skip
        pass
