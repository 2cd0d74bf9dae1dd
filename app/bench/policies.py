"""View policies side by side on one real server: ``midserve bench --policies``.

What a policy costs is images/s at a concurrency the server is busy at; what it buys back
is compute per image (a staged or cascade policy runs more views only for some images).
One server (app/serve_process.py) serves the model and every model a cascade names as a
later stage, so every policy runs on the same process; a cheap client (app/bench/
load_client.py: hey where installed) posts real photos at c8, several representative photos
a round (hey posts one file a window: a round's window is split over its photos, and
images/s is that of a stream with as many requests of each photo, so a gated policy's
escalation weighs as it does over a folder of uploads), and the policies take turns within
each round, so the machine's drift falls on all of them alike; every photo is posted once
per policy before the first round, so the shapes a policy first meets are not timed.
Images/s is the client's; view-equivalents and which model answered are the server's own
counts (its /metrics, read around each window).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
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
PHOTOS_PER_ROUND = 10
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


@dataclass(frozen=True)
class PhotoWindow:
    """One photo's window of one policy: the client's run and the server's counts."""

    run: ClientRun
    served: dict[str, float]  # the deltas of ``policy_counts`` around it

    @property
    def rate(self) -> float:
        return self.run.ok / self.run.elapsed_s if self.run.elapsed_s > 0 else 0.0

    def per_image(self, key: str) -> float:
        return self.served[key] / max(self.served["images"], 1.0)


def mix_rate(windows: Sequence[PhotoWindow]) -> float:
    """Images/s of a mix with as many requests of each photo (not as much time): the
    harmonic mean of the photos' rates, so a slow, escalated photo weighs as much as an
    easy one, as it does in a stream of uploads."""
    if any(w.rate <= 0 for w in windows):
        return 0.0
    return len(windows) / sum(1.0 / w.rate for w in windows)


def summarize_policy(rounds: list[list[PhotoWindow]]) -> dict[str, Any]:
    """One policy over its rounds: images/s of the equal-photo mix per round (median,
    min, max) and, from the server's counts, each photo's views, compute and whether a
    later model answered, averaged over the photos."""
    rates = [mix_rate(r) for r in rounds]
    windows = [w for r in rounds for w in r]

    served = [w for w in windows if w.served["images"] > 0]  # a short window may serve none

    def mean(key: str) -> float:
        return round(statistics.fmean(w.per_image(key) for w in served), 3) if served else 0.0

    answered = [w.served["answered_by_later"] / max(w.served["answered"], 1.0) for w in served]
    return {
        "requests": sum(w.run.ok for w in windows),
        "errors": sum(w.run.errors for w in windows),
        "images_per_s": round(statistics.median(rates), 2),
        "images_per_s_min": round(min(rates), 2),
        "images_per_s_max": round(max(rates), 2),
        "views_per_image": mean("views"),
        "view_equivalents_per_image": mean("view_equivalents"),
        "answered_by_later_share": round(statistics.fmean(answered), 3) if answered else 0.0,
    }


def policies_phase(models_dir: Path, model: str, photos: list[tuple[str, bytes]],
                   specs: Sequence[str], duration_s: float, env: dict[str, str], client: str,
                   out: dict[str, Any]) -> None:  # fmt: skip
    """ROUNDS rounds of one load window per policy (``duration_s`` each, split over the
    round's photos), on one server of ``model`` and the later models; writes
    ``out["policies"]``."""
    specs = list(dict.fromkeys(specs))
    models = [model, *(m for m in later_models(specs) if m != model)]
    chosen = client_name(client)
    label = "httpx (hey not installed)" if client == "auto" and chosen != HEY else chosen
    picks = representative(photos, ROUNDS * PHOTOS_PER_ROUND)
    rounds: dict[str, list[list[PhotoWindow]]] = {spec: [] for spec in specs}
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
        window = duration_s / PHOTOS_PER_ROUND
        for spec in specs:  # outside the counts: every photo once, each new shape met
            for upload in uploads:
                loader.load(upload, policy_params(spec), min(WARMUP_S, window))
        for r in range(ROUNDS):
            mine = uploads[r * PHOTOS_PER_ROUND : (r + 1) * PHOTOS_PER_ROUND]
            for spec in specs:
                windows = []
                for upload in mine:
                    before = policy_counts(base, model)
                    run = loader.load(upload, policy_params(spec), window)
                    after = policy_counts(base, model)
                    windows.append(PhotoWindow(run, {k: v - before[k] for k, v in after.items()}))
                rounds[spec].append(windows)
    rows = {spec: {"views": "the model's default" if spec == DEFAULT else spec,
                   **summarize_policy(rounds[spec])}
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
