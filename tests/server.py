"""A real midserve server in a subprocess (uvicorn on 127.0.0.1, a free port)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.helpers import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    models_dir: Path,
    models: str = "tiny",
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    log_path: Path | None = None,
) -> Iterator[str]:
    """Start ``midserve serve``; yield its base URL once /readyz answers (or /healthz)."""
    with server_process(models_dir, models, env=env, wait_ready=wait_ready, log_path=log_path) as (
        base,
        _,
    ):
        yield base


@contextlib.contextmanager
def server_process(
    models_dir: Path,
    models: str = "tiny",
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    log_path: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As running_server, also yielding the process (for signals and its memory)."""
    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "MIDSERVE_DEVICE": "cpu",
        "MIDSERVE_THREADS": "1",
        # exact comparisons with the in-process float32 engine; bf16 is tested on its own
        "MIDSERVE_DTYPE": "float32",
        # no timing at load: fast, deterministic start-up (tests/unit/test_tuning.py tunes)
        "MIDSERVE_TUNE": "false",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models",
        models,
        "--models-dir",
        str(models_dir),
        "--log-level",
        "warning",
    ]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        probe = "/readyz" if wait_ready else "/healthz"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if httpx.get(base + probe, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready within 120 s")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            log.close()  # type: ignore[union-attr]


def scrape(base: str) -> dict[str, float]:
    """Every sample on /metrics as {'name{label="v",...}': value} (parsed by prometheus_client)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for key, v in samples.items()
        if key.split("{", 1)[0] == name and all(w in key for w in want)
    )  # fmt: skip
