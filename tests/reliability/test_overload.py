"""Queue full: refused at once with 503 + Retry-After; everything accepted is answered.

The refusal latency is measured and written to artifacts/overload.md (not asserted: the
machine is shared), with the server's resident memory before and after the refusals."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import PROJECT_ROOT, image_bytes
from tests.server import scrape, server_process, total

CLASSIFY = "/v1/models/tiny/classify"
REFUSALS = 200


@pytest.mark.slow
def test_full_queue_refuses_fast_and_answers_every_accepted_request(
    tiny_repo: Path, tmp_path: Path
) -> None:
    # 20 queued views fill the queue; the batcher then waits 4 s for a fuller batch
    env = {
        "MIDSERVE_MAX_QUEUE_VIEWS": "20",
        "MIDSERVE_MAX_BATCH_VIEWS": "40",
        "MIDSERVE_MAX_WAIT_MS": "4000",
    }
    with server_process(tiny_repo, env=env, log_path=tmp_path / "server.log") as (base, proc):
        accepted: list[int] = []

        def queued(i: int) -> None:
            res = httpx.post(base + CLASSIFY + "?crops=10", content=image_bytes(80, 80, seed=i),
                             headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
            accepted.append(res.status_code)

        holders = [threading.Thread(target=queued, args=(i,)) for i in range(2)]
        for t in holders:
            t.start()
        while total(scrape(base), "midserve_queue_views") < 20:
            time.sleep(0.01)
        rss_before = psutil.Process(proc.pid).memory_info().rss
        latencies, statuses, retry_after = [], [], set()
        body = image_bytes(80, 80, seed=99)
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(REFUSALS):
                t0 = time.perf_counter()
                res = client.post(CLASSIFY + "?crops=10", content=body,
                                  headers={"content-type": "image/png"})  # fmt: skip
                latencies.append(time.perf_counter() - t0)
                statuses.append(res.status_code)
                if res.status_code == 503:
                    assert res.json()["error"]["type"] == "overloaded"
                    retry_after.add(int(res.headers["retry-after"]))
                if total(scrape(base), "midserve_batch_views_count") > 0:
                    break  # the held batch ran: the queue is no longer full
        rss_after = psutil.Process(proc.pid).memory_info().rss
        for t in holders:
            t.join()
        metrics = scrape(base)

    refused = [lat for lat, s in zip(latencies, statuses, strict=True) if s == 503]
    assert accepted == [200, 200], "an accepted request was not answered"
    assert len(refused) >= 20 and set(statuses) <= {200, 503}
    assert retry_after and min(retry_after) >= 1
    # only the accepted requests' views ever reached a forward pass
    assert total(metrics, "midserve_batch_views_sum") == 20 + 10 * statuses.count(200)

    ms = sorted(1000 * x for x in refused)
    p50, p99 = statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    report = PROJECT_ROOT / "artifacts" / "overload.md"
    report.parent.mkdir(exist_ok=True)
    report.write_text(
        "# Overload: queue full -> 503\n\n"
        f"{len(refused)} requests refused while the queue was full "
        f"(client-side latency incl. upload and decode, keep-alive connection).\n\n"
        f"| p50 ms | p99 ms | max ms | under 50 ms | Retry-After s | RSS before MB | "
        f"RSS after MB |\n|---|---|---|---|---|---|---|\n"
        f"| {p50:.1f} | {p99:.1f} | {ms[-1]:.1f} | {sum(x < 50 for x in ms)}/{len(ms)} | "
        f"{sorted(retry_after)} | {rss_before / 2**20:.0f} | {rss_after / 2**20:.0f} |\n"
    )
    print("\n" + report.read_text())
