"""A real midserve server in a subprocess (app/serve_process.py), with the suite's defaults,
and readers of its /metrics.

Servers started here run the production default: the load-time tuner on, with a small
budget and the session's tuning cache (MIDSERVE_TUNE_CACHE_DIR, set by tests/conftest.py),
so the first server of the session tunes and later ones read the cache. The dtype stays
float32, so answers can be compared with the in-process float32 engine (within float
tolerance: the tuner may pick the OpenVINO float32 backend).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx

from app.serve_process import serve_process

SERVER_ENV = {
    "MIDSERVE_DEVICE": "cpu",
    "MIDSERVE_THREADS": "1",
    # comparisons with the in-process float32 engine; bf16 is tested on its own
    "MIDSERVE_DTYPE": "float32",
    "MIDSERVE_TUNE": "true",
    "MIDSERVE_TUNE_SECONDS": "0.5",
}


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
    port: int | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As running_server, also yielding the process (for signals and its memory); on
    ``port`` if given, else on a free one."""
    with serve_process(
        models_dir,
        models,
        env={**SERVER_ENV, **(env or {})},
        wait_ready=wait_ready,
        log_path=log_path,
        port=port,
    ) as (base, proc):
        yield base, proc


def scrape(target: str | httpx.Client) -> dict[str, float]:
    """Every sample on /metrics as {'name{label="v",...}': value} (parsed by prometheus_client),
    from a base URL or a client (an in-process app's TestClient)."""
    from prometheus_client.parser import text_string_to_metric_families

    if isinstance(target, str):
        text = httpx.get(target + "/metrics", timeout=10).text
    else:
        text = target.get("/metrics").text
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
