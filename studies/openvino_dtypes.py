"""The served OpenVINO paths' raw forward side by side, in one run: float32, bfloat16 and
the entry's int8 (``midserve quantize`` first), each with both thread teams.

    PYTHONPATH=. .venv/bin/python studies/openvino_dtypes.py [--seconds 3] [--rounds 3]

Whether int8 beats bf16 differs by CPU (AMX, VNNI without AMX, bf16 emulated or native),
which is why the tuner times it at load; this shows by how much here. Views/s per path
are medians over interleaved rounds (the host's speed drifts), on uint8 views as served.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from app.config import default_models_dir
from app.repository import ModelRepository
from app.runtime.engine import Engine
from app.runtime.int8 import int8_missing
from app.runtime.machine import cores
from app.runtime.plan import EngineOptions, ForwardPlan
from app.runtime.tuning.tuner import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--chunk", type=int, default=8, help="views per forward")
    parser.add_argument("--seconds", type=float, default=3.0, help="per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = ModelRepository(args.models_dir).load(args.model, "cpu")
    dtypes = ["float32", "bfloat16"]
    why_no_int8 = int8_missing(model)
    dtypes += [] if why_no_int8 else ["int8"]
    n = cores()
    teams = sorted({(1, n), (n, 1)})
    engines = {
        d: Engine(model, EngineOptions(backend="openvino", dtype=d, tune=False)) for d in dtypes
    }
    rates: dict[str, list[float]] = {f"{d} {w}x{t}": [] for d in dtypes for w, t in teams}
    for _ in range(args.rounds):
        for d, engine in engines.items():
            for w, t in teams:
                plan = ForwardPlan(w, t, args.chunk, d, "openvino")
                rates[f"{d} {w}x{t}"].append(measure(engine, plan, args.seconds))
    medians = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    best = {d: max(v for k, v in medians.items() if k.startswith(f"{d} ")) for d in dtypes}
    result = {"views_per_s": medians, "chunk": args.chunk, "int8_missing": why_no_int8}
    if "int8" in best:
        result["int8_vs_bfloat16"] = round(best["int8"] / best["bfloat16"], 3)
        result["int8_vs_float32"] = round(best["int8"] / best["float32"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
