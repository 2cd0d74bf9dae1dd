"""View policies side by side on one real server: ``midserve bench --policies``.

What a policy costs is images/s at a concurrency the server is busy at; what it buys back
is compute per image (a staged or cascade policy runs more views only for some images).
One server (app/serve_process.py) serves the model and every model a cascade names as a
later stage, so every policy runs on the same process; a cheap client (app/bench/
load_client.py: hey where installed) posts real photos at c8, one representative photo a
round (as the CPU budget does), and the policies take turns within each round, so the
machine's drift falls on all of them alike. Images/s is the client's; view-equivalents and
which model answered are the server's own counts (its /metrics, read around each window).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.bench.cpu_budget import CONCURRENCY, ROUNDS, WARMUP_S, Loader, representative
from app.bench.load_client import HEY, ClientRun, client_name
from app.errors import InvalidRequestError
from app.serve_process import serve_process
from app.tta.stages import parse_policy

DEFAULT = "default"  # the model's own policy: no ``views`` sent
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def later_models(specs: Sequence[str]) -> list[str]:
    """The other models the specs' later stages run on, in order of first use; a spec that
    does not parse stops the bench before any server starts."""
    models: list[str] = []
    for spec in specs:
        if spec == DEFAULT:
            continue
        try:
            models += parse_policy(spec).models
        except InvalidRequestError as exc:
            raise SystemExit(f"--policies {spec!r}: {exc}") from None
    return list(dict.fromkeys(models))


def policy_params(spec: str) -> dict[str, str]:
    """The query of one policy's requests (``default``: the model's own, no ``views``)."""
    return {"seed": "0"} if spec == DEFAULT else {"views": spec, "seed": "0"}


def policy_counts(base: str, model: str) -> dict[str, float]:
    """The server's totals for ``model``: images, their views and view-equivalents, and
    the images whose answer averaged views of a later model (any model but ``model``)."""
    with _DIRECT.open(f"{base}/metrics", timeout=10) as res:
        text = res.read().decode()
    sums = {"midserve_views_per_request_sum": "views",
            "midserve_view_equivalents_per_request_sum": "view_equivalents",
            "midserve_view_equivalents_per_request_count": "images"}  # fmt: skip
    out = dict.fromkeys([*sums.values(), "answered", "answered_by_later"], 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name in sums:
                out[sums[sample.name]] += sample.value
            elif sample.name == "midserve_answers_by_model_total":
                out["answered"] += sample.value
                if set(sample.labels["answered_by"].split("+")) - {model}:
                    out["answered_by_later"] += sample.value
    return out


def summarize_policy(runs: list[ClientRun], served: dict[str, float]) -> dict[str, Any]:
    """One policy over its rounds: images/s per round (median, min, max; one image a
    request) and, from the server's counts over its windows, compute per image and the
    share of images a later model answered."""
    rates = [r.ok / r.elapsed_s if r.elapsed_s > 0 else 0.0 for r in runs]
    images = max(served["images"], 1.0)
    return {
        "requests": sum(r.ok for r in runs),
        "errors": sum(r.errors for r in runs),
        "images_per_s": round(statistics.median(rates), 2),
        "images_per_s_min": round(min(rates), 2),
        "images_per_s_max": round(max(rates), 2),
        "views_per_image": round(served["views"] / images, 3),
        "view_equivalents_per_image": round(served["view_equivalents"] / images, 3),
        "answered_by_later_share": round(
            served["answered_by_later"] / max(served["answered"], 1.0), 3
        ),
    }


def policies_phase(models_dir: Path, model: str, photos: list[tuple[str, bytes]],
                   specs: Sequence[str], duration_s: float, env: dict[str, str], client: str,
                   out: dict[str, Any]) -> None:  # fmt: skip
    """ROUNDS rounds of one load window per policy (``duration_s`` each), one photo a
    round, on one server of ``model`` and the later models; writes ``out["policies"]``."""
    specs = list(dict.fromkeys(specs))
    models = [model, *(m for m in later_models(specs) if m != model)]
    chosen = client_name(client)
    label = "httpx (hey not installed)" if client == "auto" and chosen != HEY else chosen
    picks = representative(photos, ROUNDS)
    runs: dict[str, list[ClientRun]] = {spec: [] for spec in specs}
    served: dict[str, dict[str, float]] = {spec: {} for spec in specs}
    with contextlib.ExitStack() as stack:
        # hey posts a file: the uploads go to a temporary folder, never beside the photos
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="midserve-")))
        uploads = [workdir / f"photo-{i}.jpg" for i in range(len(picks))]
        for path, (_, data) in zip(uploads, picks, strict=True):
            path.write_bytes(data)
        base, proc = stack.enter_context(
            serve_process(models_dir, models, env=env, ready_timeout_s=180)
        )
        loader = Loader(base, proc.pid, model, chosen)
        for r in range(ROUNDS):
            for spec in specs:
                params = policy_params(spec)
                if r == 0:  # outside the counts: the first requests of each policy
                    loader.load(uploads[r], params, WARMUP_S)
                before = policy_counts(base, model)
                runs[spec].append(loader.load(uploads[r], params, duration_s))
                after = policy_counts(base, model)
                for key, value in after.items():
                    served[spec][key] = served[spec].get(key, 0.0) + value - before[key]
    rows = {spec: {"views": "the model's default" if spec == DEFAULT else spec,
                   **summarize_policy(runs[spec], served[spec])}
            for spec in specs}  # fmt: skip
    first = rows[specs[0]]["images_per_s"]
    for row in rows.values():
        row["images_per_s_vs_first"] = round(row["images_per_s"] / max(first, 1e-9), 3)
    out["policies"] = {
        "client": label,
        "concurrency": CONCURRENCY,
        "rounds": ROUNDS,
        "window_s": duration_s,
        "models_served": models,
        "photos": [
            f"{name} ({'x'.join(map(str, Image.open(io.BytesIO(data)).size))})"
            for name, data in picks
        ],
        "policies": rows,
    }


def print_policies(section: dict[str, Any]) -> None:
    """The section as a table on stderr, one row per policy."""
    print(f"policies at c{section['concurrency']}, client {section['client']}, "
          f"{section['rounds']} rounds of {section['window_s']:g} s each, one server of "
          f"{', '.join(section['models_served'])}; img/s: median (min-max) of the rounds",
          file=sys.stderr)  # fmt: skip
    rows = section["policies"]
    width = max(len(spec) for spec in rows)
    cols = ["img/s", "min-max", "vs first", "veq/img", "later", "errors"]
    print(f"{'policy':<{width}}  " + "  ".join(f"{c:>13}" for c in cols), file=sys.stderr)
    for spec, row in rows.items():
        values = [f"{row['images_per_s']:.2f}",
                  f"{row['images_per_s_min']:.1f}-{row['images_per_s_max']:.1f}",
                  f"{row['images_per_s_vs_first']:.3f}",
                  f"{row['view_equivalents_per_image']:.3f}",
                  f"{row['answered_by_later_share']:.3f}", str(row["errors"])]  # fmt: skip
        print(f"{spec:<{width}}  " + "  ".join(f"{v:>13}" for v in values), file=sys.stderr)
