"""Preparing views (decode, resize, cut) on threads against processes, in one run.

    PYTHONPATH=. .venv/bin/python studies/preprocess_workers.py [--images DIR] [--rounds 3]

The server prepares views on a thread pool (``MIDSERVE_PREPROCESS_WORKERS``) beside the
event loop and the forward threads. Threads share the GIL; processes do not, but each
prepared image's views must then be pickled back to the server. This measures images/s of
1 thread, N threads and N processes (N = the cores) preparing the sample photos with the
default model's center crop and its 10 views, processes' copying back included, as medians
of interleaved rounds; a thread pool near N times one thread means the GIL costs little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

from app.bench import SAMPLES
from app.config import default_models_dir
from app.preparer import ImagePreparer
from app.repository import ModelRepository
from app.runtime.machine import cores
from app.tta.limits import DecodeLimits
from app.tta.stages import parse_policy

MODEL = "tf_efficientnet_lite0"
POLICIES = {"center": "center", "ten_views": "fixed:5,mfixed:5"}
_PREPARER: ImagePreparer | None = None


def preparer() -> ImagePreparer:
    """One per process (and shared by its threads, as the server shares it)."""
    global _PREPARER
    if _PREPARER is None:
        torch.set_num_threads(1)
        model = ModelRepository(default_models_dir()).load(MODEL, "cpu")
        _PREPARER = ImagePreparer(model.cfg, torch.device("cpu"), DecodeLimits(), jpeg_draft=True)
    return _PREPARER


def prepare(data: bytes, policy: str) -> list[torch.Tensor]:
    """The image's view batches, as the forward would receive them."""
    prepared = preparer().views(data, parse_policy(policy), seed=0)
    return [g.batch for g in prepared.groups]


def rate(pool: Executor, photos: list[bytes], policy: str) -> float:
    start = time.perf_counter()
    done = list(pool.map(prepare, photos, [policy] * len(photos), chunksize=4))
    assert len(done) == len(photos)
    return len(photos) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=SAMPLES)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    photos = [p.read_bytes() for p in sorted(args.images.rglob("*.JPEG"))]
    if not photos:
        raise SystemExit(f"no .JPEG photos under {args.images}")
    n = cores()
    opened: dict[str, Executor] = {
        "1_thread": ThreadPoolExecutor(1),
        f"{n}_threads": ThreadPoolExecutor(n),
        f"{n}_processes": ProcessPoolExecutor(n),
    }
    rates: dict[str, list[float]] = {f"{p} {w}": [] for p in POLICIES for w in opened}
    try:
        for pool in opened.values():  # load the model and warm each worker, untimed
            rate(pool, photos[: 4 * n], "center")
        for _ in range(args.rounds):
            for policy_name, policy in POLICIES.items():
                for name, pool in opened.items():
                    rates[f"{policy_name} {name}"].append(rate(pool, photos, policy))
    finally:
        for pool in opened.values():
            pool.shutdown()
    medians = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    result: dict[str, object] = {"images_per_s": medians, "photos": len(photos), "cores": n}
    for policy in POLICIES:
        one = medians[f"{policy} 1_thread"]
        for kind in ("threads", "processes"):
            result[f"{policy}_{kind}_vs_1"] = round(medians[f"{policy} {n}_{kind}"] / one, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
