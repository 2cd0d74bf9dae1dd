"""A real Prometheus (the Debian binary) in a subprocess, with its own config and data dir."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from app.serve_process import free_port, running_process


def derive_config(shipped: Path, targets: list[str], self_address: str) -> dict[str, Any]:
    """docker/prometheus.yml pointed at ``targets`` (host:port) and scraping every second.

    Only the midserve job's service discovery is replaced (Docker DNS does not exist here);
    its metrics path and relabelling are kept as shipped.
    """
    cfg = yaml.safe_load(shipped.read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    midserve = jobs["midserve"]
    midserve.pop("dns_sd_configs")
    midserve["static_configs"] = [{"targets": targets}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [self_address]}]
    return cfg


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result as a list of {metric, value} (a scalar becomes one)."""
        res = httpx.get(self.base + "/api/v1/query", params={"query": expr}, timeout=10)
        body = res.json()
        if res.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({res.status_code}): {expr}\n{body}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def wait_for(self, expr: str, want: float, timeout_s: float = 60) -> None:
        """Until ``expr`` evaluates to ``want`` (scrapes are asynchronous), bounded in time."""
        deadline = time.monotonic() + timeout_s
        while (got := self.value(expr)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} = {got}, waited {timeout_s} s for {want}")
            time.sleep(0.25)


@contextlib.contextmanager
def running_prometheus(
    binary: str, shipped: Path, targets: list[str], workdir: Path
) -> Iterator[Prometheus]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(derive_config(shipped, targets, address)))
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]
    base = f"http://{address}"
    with running_process(
        cmd,
        base + "/-/ready",
        log_path=workdir / "prometheus.log",
        name="prometheus",
        ready_timeout_s=60,
        stop_timeout_s=20,
    ):
        yield Prometheus(base)
