"""The ``midserve`` command: serve | classify | models | evaluate | finetune | bench ...

Each subcommand lives with its concern; this module only wires argparse to them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import MidserveError

if TYPE_CHECKING:
    from app.tta.views import ViewSpec

Handler = Callable[[argparse.Namespace], int]
DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)


def _views_from_args(args: argparse.Namespace, default: str) -> ViewSpec:
    from app.tta.views import default_policy, parse_view_spec

    if args.views and args.crops:
        raise MidserveError("give --views or --crops, not both")
    if args.crops:
        return default_policy(args.crops)
    return parse_view_spec(args.views or default)


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify local image files; one JSON line (or a short table) per image, in order."""
    from app.config import Settings
    from app.engine import Engine, pick_device
    from app.repository import ModelRepository
    from app.tta.preprocess import DecodeLimits

    settings = Settings()
    repo = ModelRepository(args.models_dir or settings.models_dir)
    model = repo.load(args.model, pick_device(args.device))
    limits = DecodeLimits(settings.max_pixels, settings.max_aspect_ratio)
    engine = Engine(
        model, args.dtype, args.chunk_views, limits, False, settings.fuse, settings.jpeg_draft
    )
    spec = _views_from_args(args, model.cfg.default_views)
    level = args.level or model.cfg.default_level
    failed = 0
    total_views, t_start = 0, time.perf_counter()
    for path in args.images:
        try:
            data = Path(path).read_bytes()
            pred = engine.classify(data, spec, level=level, top_k=args.top_k, seed=args.seed)
        except (OSError, MidserveError) as exc:
            failed += 1
            err = {"file": str(path), "error": str(exc), "type": type(exc).__name__}
            print(json.dumps(err) if args.json else f"{path}: ERROR {exc}", flush=True)
            continue
        total_views += len(pred.views)
        if args.json:
            print(json.dumps({"file": str(path), "model": model.cfg.name, **pred.to_json()}))
        else:
            best = ", ".join(f"{t.label} ({t.prob:.3f})" for t in pred.top)
            print(f"{path}: {best}  [{len(pred.views)} views, {pred.level}]")
    elapsed = time.perf_counter() - t_start
    if not args.json and total_views:
        print(
            f"{total_views} views in {elapsed:.2f} s = {total_views / elapsed:.1f} views/s",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from app.config import Settings
    from app.repository import ModelRepository

    repo = ModelRepository(args.models_dir or Settings().models_dir)
    for name in repo.names():
        cfg = repo.config(name)
        ok, why = repo.available(name)
        state = "available" if ok else f"unavailable: {why}"
        print(f"{name}\t{cfg.arch}\t{cfg.input_size}px crop_pct={cfg.crop_pct}\t{state}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import signal

    import uvicorn

    if args.models:
        os.environ["MIDSERVE_MODELS"] = json.dumps(args.models.split(","))
    if args.models_dir:
        os.environ["MIDSERVE_MODELS_DIR"] = str(args.models_dir)
    if args.device:
        os.environ["MIDSERVE_DEVICE"] = args.device
    if args.dtype:
        os.environ["MIDSERVE_DTYPE"] = args.dtype
    if args.compile:
        os.environ["MIDSERVE_COMPILE"] = "true"
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; with this
    # handler in place that re-raise ends the process with status 0 (a clean, asked-for stop)
    # instead of -15, which supervisors would report as a crash.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify image files with matched views")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--views", default=None, help="e.g. fixed:5,mfixed:5,random:10,mrandom:10")
    p.add_argument("--crops", type=int, default=None, help="crop count; the default policy mixes")
    p.add_argument("--level", default=None, choices=["feature", "logit", "softmax"])
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="fixes random view positions")
    p.add_argument("--chunk-views", type=int, default=0, help="views per forward (0 = auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    _add_model_args(p)
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser("models", help="list the model repository")
    p.add_argument("--models-dir", type=Path, default=None)
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser("serve", help="run the HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", default=None, help="comma list of model names, or 'all'")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=cmd_serve)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands that live with their jobs (evaluate, finetune, bench, ...)."""
    registers = []
    for module in ("app.jobs.evaluate", "app.jobs.finetune", "app.bench"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        registers.append(mod.register)
    return registers


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except MidserveError as exc:
        print(f"midserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
