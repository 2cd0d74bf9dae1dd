"""The CPU a server spends around the network, per request and per stage, in one run.

On a CPU, serving is capped by the forward and by everything else the server's process
does per request: the HTTP edge, JPEG decode, resize and view cutting, batching, answers.
A real server (app/serve_process.py) is loaded at concurrency 8 by a cheap client
(app/bench/load_client.py); around each load window its CPU is read from /proc
(app/bench/proc.py), in total and by thread: the event loop (edge, batching, answers),
the preparation threads, the forward threads. Interleaved with those windows, this process
runs the served plan's raw forward and measures its CPU per view, so "outside the network"
is taken two ways: the total less the forward threads, and the total less what the
network itself costs for the view-equivalents served. Images and view-equivalents are the
server's own counts (its /metrics, read outside the windows).
"""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.bench.ceiling import resized_jpegs
from app.bench.load_client import HEY, ClientRun, client_name, run_hey, run_httpx
from app.bench.proc import EDGE, FORWARD, GROUPS, add_cpu, cpu_between, snapshot
from app.runtime.engine import Engine
from app.serve_process import serve_process
from app.tta.views import ViewSpec

ROUNDS = 3
CONCURRENCY = 8
# the edge alone: the photo read whole, routed through every layer and the edge contract,
# its parameters validated and refused (top_k=0: 422 JSON); no image work, no forward
EDGE_PROBE = {"views": "center", "top_k": "0"}
TWELVE_MP = (4000, 3000)
WARMUP_S = 0.5
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def budget_cases(spec: ViewSpec) -> dict[str, tuple[str, str | None]]:
    """name -> (uploads, views; None: the model's default policy, no ``views`` sent)."""
    return {
        "center_imagenet_c8": ("imagenet", "center"),
        "center_12mp_c8": ("12mp", "center"),
        "default_imagenet_c8": ("imagenet", None),
        "default_12mp_c8": ("12mp", None),
        f"views{spec.total}_imagenet_c8": ("imagenet", str(spec)),
    }


def representative(photos: list[tuple[str, bytes]], count: int) -> list[tuple[str, bytes]]:
    """``count`` photos spread over the set's pixel counts (its 1/2k, 3/2k, ... quantiles):
    hey posts one file per run, so each round loads one of these."""
    ranked = sorted(photos, key=lambda p: math.prod(Image.open(io.BytesIO(p[1])).size))
    return [ranked[min(len(ranked) - 1, int((i + 0.5) * len(ranked) / count))]
            for i in range(count)]  # fmt: skip


def forward_cpu(engine: Engine, seconds: float) -> tuple[float, float]:
    """The served plan's raw forward as the tuner times it (``plan.workers`` threads at
    once on uint8 views at the input size, the same tensor again and again) and this
    process's CPU over the same window: (views/s, CPU seconds per view)."""
    plan, size = engine.plan, engine.cfg.input_size
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (plan.chunk_views, size, size, 3), dtype=torch.uint8,
                           generator=g)  # fmt: skip
    x = pixels.permute(0, 3, 1, 2)
    counts = [0] * plan.workers
    start = threading.Barrier(plan.workers + 1)
    stop_at = [math.inf]

    def work(i: int) -> None:
        if engine.device.type == "cpu" and plan.threads:
            torch.set_num_threads(plan.threads)
        engine.run_views(x)  # untimed, before the window opens
        start.wait()
        while time.perf_counter() < stop_at[0]:
            engine.run_views(x)
            counts[i] += plan.chunk_views

    workers = [threading.Thread(target=work, args=(i,)) for i in range(plan.workers)]
    for w in workers:
        w.start()
    start.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at[0] = t0 + seconds
    for w in workers:
        w.join()
    cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
    views = max(sum(counts), 1)
    return views / elapsed, cpu / views


def served_counts(base: str, model: str) -> dict[str, float]:
    """The server's own totals: images answered, their views and view-equivalents."""
    with _DIRECT.open(f"{base}/metrics", timeout=10) as res:
        text = res.read().decode()
    wanted = {"midserve_views_per_request_sum": "views",
              "midserve_view_equivalents_per_request_sum": "view_equivalents",
              "midserve_view_equivalents_per_request_count": "images"}  # fmt: skip
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model") == model:
                out[wanted[sample.name]] += sample.value
    return out


@dataclass(frozen=True)
class Window:
    """One load window: the client's view, the server's CPU, the server's counts."""

    client: ClientRun
    cpu: dict[str, float]
    served: dict[str, float]


class Loader:
    """One server, one client kind: load windows with the server's CPU read around them."""

    def __init__(self, base: str, pid: int, model: str, client: str) -> None:
        self.base, self.pid, self.model, self.client = base, pid, model, client

    def load(self, upload: Path, params: dict[str, str], seconds: float) -> ClientRun:
        if self.client == HEY:
            query = f"?{urllib.parse.urlencode(params)}" if params else ""
            url = f"{self.base}/v1/models/{self.model}/classify{query}"
            return run_hey(url, upload, CONCURRENCY, seconds)
        body = upload.read_bytes()
        return run_httpx(self.base, self.model, body, params, CONCURRENCY, seconds)

    def window(self, upload: Path, params: dict[str, str], seconds: float) -> Window:
        counts0 = served_counts(self.base, self.model)
        before = snapshot(self.pid)
        run = self.load(upload, params, seconds)
        after = snapshot(self.pid)
        counts1 = served_counts(self.base, self.model)
        return Window(run, cpu_between(before, after),
                      {k: counts1[k] - counts0[k] for k in counts0})  # fmt: skip


def summarize_case(windows: list[Window], raw_views_per_s: float,
                   forward_s_per_view: float) -> dict[str, Any]:  # fmt: skip
    """One case over its rounds: per image (one image a request), milliseconds of server
    CPU in all and by thread group, outside the network both ways, and images/s against
    the forward-only limit (the raw forward's view-equivalents/s over this case's)."""
    ok = sum(w.client.ok for w in windows)
    n = max(ok, 1)
    elapsed = sum(w.client.elapsed_s for w in windows)
    served = add_cpu(w.served for w in windows)
    images = max(served["images"], 1.0)
    veq = served["view_equivalents"] / images
    cpu = add_cpu(w.cpu for w in windows)
    ms = {k: 1000 * v / n for k, v in cpu.items()}
    images_per_s = ok / elapsed
    limit = raw_views_per_s / max(veq, 1e-9)
    return {
        "requests": ok,
        "errors": sum(w.client.errors for w in windows),
        "images_per_s": round(images_per_s, 2),
        "views_per_s": round(images_per_s * served["views"] / images, 2),
        "views_per_image": round(served["views"] / images, 3),
        "view_equivalents_per_image": round(veq, 3),
        "server_ms": round(ms["total"], 3),
        "threads_ms": {k: round(ms[k], 3) for k in (*GROUPS, "unattributed")},
        "outside_network_ms": round(ms["total"] - ms[FORWARD], 3),
        "outside_network_ms_by_forward_cost": round(
            ms["total"] - 1000 * forward_s_per_view * veq, 3
        ),
        "forward_only_limit_images_per_s": round(limit, 2),
        "of_forward_limit": round(images_per_s / limit, 3),
        "client_ms": round(1000 * sum(w.client.cpu_s for w in windows) / n, 3),
    }


def cpu_budget_phase(models_dir: Path, model_name: str, engine: Engine,
                     photos: list[tuple[str, bytes]], spec: ViewSpec, duration_s: float,
                     env: dict[str, str], client: str, out: dict[str, Any]) -> None:  # fmt: skip
    """Rounds of: the served plan's raw forward with its CPU (``engine``, tuned as the
    server tunes: ``env`` gives it the same budget and cache), then each case's load
    window on one server; one photo per round (``representative``), ImageNet-size and
    re-encoded at 12 MP. Writes ``out["cpu_outside_network"]``."""
    chosen = client_name(client)
    label = "httpx (hey not installed)" if client == "auto" and chosen != HEY else chosen
    picks = representative(photos, ROUNDS)
    bodies = {"imagenet": [data for _, data in picks],
              "12mp": resized_jpegs([data for _, data in picks], TWELVE_MP, ROUNDS)}  # fmt: skip
    cases = budget_cases(spec)
    windows: dict[str, list[Window]] = {name: [] for name in cases}
    edge: list[Window] = []
    raw: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        # hey posts a file: the uploads go to a temporary folder, never beside the photos
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="midserve-")))
        uploads = {kind: [workdir / f"{kind}-{i}.jpg" for i in range(len(data))]
                   for kind, data in bodies.items()}  # fmt: skip
        for kind, paths in uploads.items():
            for path, data in zip(paths, bodies[kind], strict=True):
                path.write_bytes(data)
        base, proc = stack.enter_context(
            serve_process(models_dir, model_name, env=env, ready_timeout_s=180)
        )
        loader = Loader(base, proc.pid, model_name, chosen)
        for r in range(ROUNDS):
            raw.append(forward_cpu(engine, duration_s / ROUNDS))
            for name, (kind, views) in cases.items():
                params = {"seed": "0"} if views is None else {"views": views, "seed": "0"}
                upload = uploads[kind][r]
                if r == 0:
                    loader.load(upload, params, WARMUP_S)
                windows[name].append(loader.window(upload, params, duration_s / ROUNDS))
            edge.append(loader.window(uploads["imagenet"][r], EDGE_PROBE, duration_s / ROUNDS / 2))
    raw_views_per_s = statistics.median(v for v, _ in raw)
    forward_s_per_view = statistics.median(c for _, c in raw)
    rows = {name: {"uploads": kind, "views": views or "the model's default",
                   **summarize_case(windows[name], raw_views_per_s, forward_s_per_view)}
            for name, (kind, views) in cases.items()}  # fmt: skip
    many = f"views{spec.total}_imagenet_c8"
    out["cpu_outside_network"] = {
        "client": label,
        "concurrency": CONCURRENCY,
        "rounds": ROUNDS,
        "photos": [
            f"{name} ({'x'.join(map(str, Image.open(io.BytesIO(data)).size))})"
            for name, data in picks
        ],
        "served_plan": engine.plan.describe(),
        "raw_forward_views_per_s": round(raw_views_per_s, 2),
        "forward_cpu_ms_per_view": round(1000 * forward_s_per_view, 3),
        "cases": rows,
        "center_imagenet_outside_network_ms": rows["center_imagenet_c8"]["outside_network_ms"],
        "center_imagenet_edge_loop_ms": rows["center_imagenet_c8"]["threads_ms"][EDGE],
        "edge_only_ms": edge_only_ms(edge),
        "default_imagenet_of_forward_limit": rows["default_imagenet_c8"]["of_forward_limit"],
        f"views{spec.total}_of_raw_forward": round(rows[many]["views_per_s"] / raw_views_per_s, 3),
    }


def edge_only_ms(windows: list[Window]) -> float:
    """Server CPU per request of ``EDGE_PROBE``: what the edge costs a request without the
    image work, its share of a classify request's event-loop time."""
    answered = max(sum(w.client.ok + w.client.errors for w in windows), 1)
    return round(1000 * add_cpu(w.cpu for w in windows)["total"] / answered, 3)


def print_budget(section: dict[str, Any]) -> None:
    """The section as a table on stderr, one row per case, milliseconds per image."""
    cols = ["img/s", "veq/img", "server", *GROUPS, "unattr.", "outside", "outside*", "of limit",
            "client"]  # fmt: skip
    print(f"CPU per image (ms) at c{section['concurrency']}, client {section['client']}; "
          f"raw forward {section['raw_forward_views_per_s']} views/s, "
          f"{section['forward_cpu_ms_per_view']} ms CPU a view ({section['served_plan']}); "
          "outside* = server - forward CPU a view x view-equivalents; the edge alone "
          f"(the photo read, parameters refused, 422): {section['edge_only_ms']} ms",
          file=sys.stderr)  # fmt: skip
    width = max(len(name) for name in section["cases"])
    print(f"{'case':<{width}}  " + "  ".join(f"{c:>9}" for c in cols), file=sys.stderr)
    for name, row in section["cases"].items():
        threads = row["threads_ms"]
        values = [row["images_per_s"], row["view_equivalents_per_image"], row["server_ms"],
                  *(threads[g] for g in GROUPS), threads["unattributed"],
                  row["outside_network_ms"], row["outside_network_ms_by_forward_cost"],
                  row["of_forward_limit"], row["client_ms"]]  # fmt: skip
        print(f"{name:<{width}}  " + "  ".join(f"{v:>9.3f}" for v in values), file=sys.stderr)
