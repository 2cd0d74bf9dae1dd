"""Start a process, poll a URL until it answers 200, stop it; and on top of that
``midserve serve`` in a subprocess on 127.0.0.1 and a free port.

The one launcher for every real server outside ``midserve serve`` itself: the bench's HTTP
phase (app/bench/run.py), the test suite's servers and its Prometheus, studies/soak.py.
Standard library only, so it imports without the dev extras.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def answers_200(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 (any other status, or no answer: False)."""
    try:
        with _DIRECT.open(url, timeout=timeout_s) as res:
            return int(res.status) == 200
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


def _log_tail(path: Path | None, chars: int = 2000) -> str:
    if path is None or not path.is_file():
        return ""
    return ":\n" + path.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def running_process(
    cmd: Sequence[str],
    ready_url: str,
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    inherit_output: bool = False,
    name: str = "process",
    ready_timeout_s: float = 120.0,
    stop_timeout_s: float = 30.0,
    poll_s: float = 0.2,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd``; yield the process once ``ready_url`` answers 200; then terminate it
    (kill after ``stop_timeout_s``). Its output goes to ``log_path``, else to this process's
    own stdout/stderr with ``inherit_output``, else nowhere. Raises RuntimeError (with the
    log's tail) when the process exits or is not ready within ``ready_timeout_s``."""
    log = open(log_path, "wb") if log_path else None  # noqa: SIM115
    out = log if log is not None else (None if inherit_output else subprocess.DEVNULL)
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            list(cmd), env=dict(env) if env is not None else None, stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
        )  # fmt: skip
        deadline = time.monotonic() + ready_timeout_s
        while not answers_200(ready_url):
            if proc.poll() is not None:
                if log is not None:
                    log.flush()
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} before {ready_url} answered"
                    + _log_tail(log_path)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within {ready_timeout_s:g} s")
            time.sleep(poll_s)
        yield proc
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()


def serve_command(
    models_dir: Path, models: str | Sequence[str], port: int, log_level: str = "warning"
) -> list[str]:
    names = models if isinstance(models, str) else ",".join(models)
    return [
        sys.executable, "-m", "app.cli", "serve", "--host", HOST, "--port", str(port),
        "--models", names, "--models-dir", str(models_dir), "--log-level", log_level,
    ]  # fmt: skip


@contextlib.contextmanager
def serve_process(
    models_dir: Path,
    models: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    log_path: Path | None = None,
    inherit_output: bool = False,
    log_level: str = "warning",
    ready_timeout_s: float = 120.0,
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``midserve serve`` for ``models`` (names, or one comma-separated string) in a
    subprocess on 127.0.0.1 and a free port (or ``port``: a replica restarted where its
    balancer expects it), with this environment plus ``env``; yield its base URL and process
    once /readyz answers 200 (every model loaded), or /healthz with ``wait_ready=False``;
    then stop it (SIGTERM: a graceful shutdown). ``extra_args`` go to ``midserve serve``."""
    port = free_port() if port is None else port
    base = f"http://{HOST}:{port}"
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    probe = "/readyz" if wait_ready else "/healthz"
    with running_process(
        [*serve_command(models_dir, models, port, log_level), *extra_args],
        base + probe,
        env=full_env,
        log_path=log_path,
        inherit_output=inherit_output,
        name="midserve serve",
        ready_timeout_s=ready_timeout_s,
    ) as proc:
        yield base, proc
