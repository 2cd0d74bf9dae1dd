"""The served network's raw forward per backend and dtype, OpenVINO int8 included (run
``midserve quantize`` first), for each thread team the tuner tries, in one run.

    PYTHONPATH=. .venv/bin/python studies/openvino_dtypes.py [--seconds 3] [--rounds 3]

Whether int8 beats bf16 differs by CPU (AMX, VNNI without AMX, bf16 emulated or native),
which is why the tuner times it at load; this shows by how much here. Views/s are
``midserve bench``'s raw forwards (``raw_by_backend``: interleaved rounds, medians) on uint8
views as served.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.bench.plans import raw_by_backend
from app.config import default_models_dir
from app.repository import ModelRepository
from app.runtime.int8 import int8_missing
from app.runtime.machine import cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--chunk", type=int, default=8, help="views per forward")
    parser.add_argument("--seconds", type=float, default=3.0, help="per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = ModelRepository(args.models_dir).load(args.model, "cpu")
    n = cores()
    rates: dict[str, float] = {}
    for workers, threads in sorted({(1, n), (n, 1)}):
        team = raw_by_backend(model, args.chunk, args.seconds * args.rounds, args.rounds,
                              (workers, threads))  # fmt: skip
        rates |= {f"{path} {workers}x{threads}": round(v, 1) for path, v in team.items()}
    result: dict[str, object] = {"views_per_s": rates, "chunk": args.chunk,
                                 "int8_missing": int8_missing(model)}  # fmt: skip

    def best(path: str) -> float:
        return max(v for k, v in rates.items() if k.startswith(f"{path} "))

    if result["int8_missing"] is None:
        for other in ("openvino_bfloat16", "openvino_float32"):
            result[f"int8_vs_{other}"] = round(best("openvino_int8") / best(other), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
