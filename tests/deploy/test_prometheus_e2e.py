"""End to end: two midserve replicas, a real Prometheus scraping them with the shipped
config, and every PromQL expression of the Grafana dashboard run against it.

Replica A takes the ordinary traffic, labelled requests and a burst over its tiny queue
(503s); replica B has a 0.1 s deadline (504s). Traffic goes in two rounds with scrapes in
between, so rates and quantiles see counters move. The table of every panel expression and
what Prometheus returned is written to artifacts/dashboard-proof.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.prometheus import Prometheus, running_prometheus
from tests.deploy.tools import DASHBOARD, DOCKER_DIR, MISSING, find_tool
from tests.helpers import PROJECT_ROOT, image_bytes, make_tiny_model
from tests.server import running_server, scrape, total

pytestmark = pytest.mark.slow

CLASSIFY = "/v1/models/tiny/classify"
PROOF = PROJECT_ROOT / "artifacts" / "dashboard-proof.md"
# What Grafana would put in for its variables on a dashboard showing every model.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$model": ".*"}
# Metric families a healthy server may legitimately not export, and why. An expression whose
# metric is absent from /metrics for one of these reasons is listed, not failed; a family
# the server does export must return data like any other.
MAY_BE_ABSENT = {
    "midserve_gpu_memory_": "no CUDA device: the server exports GPU memory only when "
    "torch.cuda.is_available()",
}
METRIC = re.compile(r"\b(midserve_[a-z0-9_]+|up)\b")


def dashboard_queries() -> list[dict[str, str]]:
    """Every target of every panel (rows included), in dashboard order."""
    board = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for p in board["panels"]:
        panels += [p, *p.get("panels", [])]
    return [
        {"panel": p["title"], "ref": t["refId"], "legend": t.get("legendFormat", ""),
         "expr": t["expr"]}
        for p in panels for t in p.get("targets", [])
    ]  # fmt: skip


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def write_eval_json(folder: Path) -> None:
    """An evaluation result in the evaluate job's schema (midserve.eval/1)."""
    doc = {
        "schema": "midserve.eval/1",
        "model": "tiny",
        "results": [
            {"model": "tiny", "config": "fixed:5,mfixed:5@softmax", "level": "softmax",
             "dataset": "noise", "images": 8, "top1": 0.25, "top5": 0.75},
        ],
    }  # fmt: skip
    (folder / "eval.json").write_text(json.dumps(doc))


def post(base: str, data: bytes, **params: Any) -> httpx.Response:
    return httpx.post(base + CLASSIFY, params=params, content=data,
                      headers={"content-type": "image/png"}, timeout=60)  # fmt: skip


def labelled_traffic(base: str) -> tuple[int, int, int]:
    """Labelled images whose label is the top-1 class (even) or the runner-up (odd).

    Fixed views are deterministic, so an unlabelled request first tells the prediction.
    Returns (labelled, top-1 hits, top-5 hits) sent.
    """
    sent = hits1 = hits5 = 0
    for i, level in enumerate(("softmax", "softmax", "logit", "logit")):
        data = image_bytes(96, 72, seed=i)
        first = post(base, data, crops=10, level=level)
        assert first.status_code == 200, first.text
        top = first.json()["results"][0]["top"]
        label = top[0]["index"] if i % 2 == 0 else top[1]["index"]
        res = post(base, data, crops=10, level=level, label=label)
        assert res.status_code == 200, res.text
        assert res.json()["results"][0]["top"][0]["index"] == top[0]["index"]
        sent, hits1, hits5 = sent + 1, hits1 + (i % 2 == 0), hits5 + 1
    return sent, hits1, hits5


def burst_until_overloaded(base: str, tries: int = 5) -> int:
    """Concurrent 10-view requests over a 20-view queue until some get 503 (bounded)."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            responses = await asyncio.gather(*(
                client.post(CLASSIFY, params={"crops": 10}, content=image_bytes(80, 80, seed=i),
                            headers={"content-type": "image/png"})
                for i in range(24)
            ))  # fmt: skip
        return [r.status_code for r in responses]

    for _ in range(tries):
        codes = asyncio.run(burst())
        assert set(codes) <= {200, 503}, codes
        if 503 in codes:
            return codes.count(503)
    raise AssertionError(f"no 503 in {tries} bursts over a 20-view queue")


def one_round(a: str, b: str) -> tuple[int, int, int]:
    counts = labelled_traffic(a)
    # a staged policy whose gate sends every image on: escalations and gate signals
    staged = post(a, image_bytes(), views="center|margin<1|full@96,mfull@96")
    assert staged.status_code == 200 and staged.json()["results"][0]["stages"][1]["ran"]
    bad = post(a, b"this is not an image")
    assert bad.status_code in (400, 415, 422), bad.text
    burst_until_overloaded(a)
    late = post(b, image_bytes(), crops=10)
    assert late.status_code == 504, late.text
    return counts


def requests_counted(bases: list[str]) -> float:
    return sum(total(scrape(base), "midserve_request_duration_seconds_count") for base in bases)


def fmt_value(value: str) -> str:
    v = float(value)
    return "NaN" if math.isnan(v) else f"{v:.4g}"


def fmt_result(result: list[dict[str, Any]]) -> str:
    parts = []
    for series in result:
        labels = ",".join(
            f"{k}={v}" for k, v in sorted(series["metric"].items()) if k not in ("__name__", "job")
        )
        parts.append(f"{{{labels}}} {fmt_value(series['value'][1])}")
    return "; ".join(parts) if parts else "(empty)"


def check_dashboard(prom: Prometheus, exported: set[str]) -> tuple[list[str], list[str]]:
    """Run every expression; (table rows, failures)."""
    rows, failures = [], []
    for q in dashboard_queries():
        expr = substitute(q["expr"])
        missing = {n for n in METRIC.findall(expr) if n != "up" and n not in exported}
        reasons = {
            reason for n in missing for prefix, reason in MAY_BE_ABSENT.items()
            if n.startswith(prefix)
        }  # fmt: skip
        unexplained = {n for n in missing if not any(n.startswith(p) for p in MAY_BE_ABSENT)}
        result = prom.query(expr)
        if unexplained:
            failures.append(f"{q['panel']} {q['ref']}: not exported: {sorted(unexplained)}")
            verdict = "FAIL: metric not exported"
        elif missing:
            verdict = "excluded: " + "; ".join(sorted(reasons))
        elif not result:
            failures.append(f"{q['panel']} {q['ref']}: no data for {expr}")
            verdict = "FAIL: no data"
        else:
            verdict = f"data ({len(result)} series)"
        cell = fmt_result(result).replace("|", "\\|")
        code = q["expr"].replace("|", "\\|")
        rows.append(f"| {q['panel']} | {q['ref']} | `{code}` | {cell} | {verdict} |")
    return rows, failures


def test_every_dashboard_expression_returns_data_from_a_real_prometheus(
    tmp_path: Path,
) -> None:
    binary = find_tool("prometheus")
    if binary is None:
        pytest.skip(MISSING["prometheus"])
    repo = tmp_path / "models"
    make_tiny_model(repo, "tiny")
    write_eval_json(repo / "tiny")
    queue = {"MIDSERVE_MAX_QUEUE_VIEWS": "20", "MIDSERVE_MAX_WAIT_MS": "100",
             "MIDSERVE_MAX_BATCH_VIEWS": "40"}  # fmt: skip
    deadline = {"MIDSERVE_REQUEST_TIMEOUT_S": "0.1", "MIDSERVE_MAX_WAIT_MS": "600",
                "MIDSERVE_MAX_BATCH_VIEWS": "40"}  # fmt: skip
    with (
        running_server(repo, env=queue, log_path=tmp_path / "a.log") as a,
        running_server(repo, env=deadline, log_path=tmp_path / "b.log") as b,
    ):
        targets = [a.removeprefix("http://"), b.removeprefix("http://")]
        shipped = DOCKER_DIR / "prometheus.yml"
        with running_prometheus(binary, shipped, targets, tmp_path / "prom") as prom:
            prom.wait_for('count(up{job="midserve"} == 1)', 2)
            sent = [0, 0, 0]
            for _ in range(2):  # counters must move between scrapes for rates to be > 0
                sent = [s + n for s, n in zip(sent, one_round(a, b), strict=True)]
                prom.wait_for("sum(midserve_request_duration_seconds_count)",
                              requests_counted([a, b]))  # fmt: skip
            # Prometheus holds what the servers counted, labelled accuracy included.
            assert prom.value("sum(midserve_labelled_images_total)") == sent[0] == 8
            assert prom.value("sum(midserve_top1_hits_total)") == sent[1] == 4
            assert prom.value("sum(midserve_top5_hits_total)") == sent[2] == 8
            exported = {
                key.split("{", 1)[0] for base in (a, b) for key in scrape(base)
            }  # fmt: skip
            board = json.loads(DASHBOARD.read_text())
            for var in board["templating"]["list"]:
                assert set(METRIC.findall(var["definition"])) <= exported, var["definition"]
            rows, failures = check_dashboard(prom, exported)

    PROOF.parent.mkdir(parents=True, exist_ok=True)
    header = [
        "# Dashboard proof: every panel expression against a real Prometheus\n",
        "Two midserve replicas (tiny test model), scraped every 1 s with docker/prometheus.yml's",
        f"midserve job; Grafana variables replaced by {GRAFANA_VARIABLES}.\n",
        "| panel | ref | expression | Prometheus returned | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    PROOF.write_text("\n".join(header + rows) + "\n")
    assert not failures, "\n".join(failures)
