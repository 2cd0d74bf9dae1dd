"""``midserve bench`` arguments; the measurements are imported only when they run."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from app.bench import SAMPLES
from app.cli_args import add_engine_args, add_model_arg
from app.request import LEVELS


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from app.bench.run import run_bench

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per load request
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_bench(args)
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput vs the hardware bound and the naive pipeline")
    add_model_arg(p)
    add_engine_args(p)
    p.add_argument("--views", type=int, default=10, help="crop count (default policy)")
    p.add_argument("--views-spec", default=None, help="explicit view mix instead of --views")
    p.add_argument("--full-spec", default="full@288,mfull@288",
                   help="the whole-image policy measured beside the crops")  # fmt: skip
    p.add_argument("--level", default="softmax", choices=list(LEVELS))
    p.add_argument("--chunk-views", type=int, default=0, help="0 = the best measured chunk")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measurement")
    p.add_argument("--data", default=str(SAMPLES), help="folder of real photos")
    p.add_argument("--images", type=int, default=100)
    p.add_argument(
        "--check-dtype",
        default="bfloat16",
        choices=["", "bfloat16", "float16"],
        help="also report this dtype's agreement with float32 on the photos",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--no-fuse", action="store_true", help="serve the network as loaded, "
                   "without folded batch norms and static padding")  # fmt: skip
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurements")
    p.add_argument("--no-tune", action="store_true", help="skip the tuned engine")
    p.add_argument("--tune-seconds", type=float, default=5.0, help="tuning budget")
    p.add_argument("--tune-cache-dir", type=Path, default=None, help="default: the server's")
    p.add_argument("--ceiling", action="store_true", help="only the ceiling run: the served "
                   "plan's raw forward, HTTP as a share of it, three upload sizes, against the "
                   "older per-image path (app/bench/ceiling.py)")  # fmt: skip
    p.add_argument(
        "--cpu-budget",
        action="store_true",
        help="only the CPU budget run: server "
        "CPU per request around the network, by thread, at c8 (app/bench/cpu_budget.py)",
    )
    p.add_argument("--cpu-client", default="auto", choices=["auto", "hey", "httpx"],
                   help="load client of the CPU budget and of --policies "
                   "(auto: hey where installed)")  # fmt: skip
    p.add_argument(
        "--policies",
        nargs="+",
        metavar="SPEC",
        default=None,
        help="only these view policies, side by side on one server at c8 "
        "(app/bench/policies.py): images/s, view-equivalents per image, the share a "
        "cascade's later model answered; 'default': the model's own policy",
    )
    p.add_argument(
        "--policy-duration",
        type=float,
        default=2.0,
        help="seconds of each --policies window (3 rounds x policies x this)",
    )
    p.add_argument(
        "--http-matrix",
        action="store_true",
        help="HTTP at concurrency 1 and 8, batching on and off",
    )
    p.set_defaults(handler=cmd_bench)
