"""The ``midserve`` command: serve | classify | models | settings | evaluate | finetune | bench ...

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

from app.bench import cli as bench_cli
from app.cli_args import add_engine_args, add_model_arg, settings_from_args
from app.errors import MidserveError
from app.jobs.evaluate import cli as evaluate_cli
from app.jobs.finetune import cli as finetune_cli
from app.jobs.import_fixres import cli as import_fixres_cli
from app.jobs.quantize import cli as quantize_cli

if TYPE_CHECKING:
    from app.tta.stages import StagedPolicy
    from app.tta.views import ViewSpec

Handler = Callable[[argparse.Namespace], int]


def _views_from_args(args: argparse.Namespace, default: str) -> ViewSpec | StagedPolicy:
    """The views asked for: a view spec, or a staged policy (a cascade's later stages on
    other models of the repository), as the server reads its ``views`` parameter."""
    from app.tta.stages import parse_policy
    from app.tta.views import default_policy

    if args.views and args.crops:
        raise MidserveError("give --views or --crops, not both")
    if args.crops:
        return default_policy(args.crops)
    policy = parse_policy(args.views or default)
    return policy if policy.staged else policy.first


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify local image files; one JSON line (or a short table) per image, in order."""
    from app.api.results import image_result
    from app.local_pipeline import local_pipeline
    from app.repository import ModelRepository
    from app.request import ClassifyRequest, check_level
    from app.runtime.load import load_engine
    from app.runtime.plan import EngineOptions

    settings = settings_from_args(args)
    options = EngineOptions.from_settings(settings).with_changes(
        chunk_views=args.chunk_views or None, compile=False
    )
    repository = ModelRepository(settings.models_dir)
    engine = load_engine(repository, args.model, options)
    pipeline = local_pipeline(repository, engine, options)
    cfg = engine.cfg
    request = ClassifyRequest(
        spec=_views_from_args(args, cfg.default_views),
        level=check_level(args.level or cfg.default_level),
        top_k=args.top_k,
        seed=args.seed,
    )
    for name in request.policy.models:  # a cascade's other models: loaded, or a clear error
        pipeline.preparer.stage_model(name)
    failed = 0
    total_views, t_start = 0, time.perf_counter()
    for path in args.images:
        try:
            pred = pipeline.classify(Path(path).read_bytes(), request)
        except (OSError, MidserveError) as exc:
            failed += 1
            err = {"file": str(path), "error": str(exc), "type": type(exc).__name__}
            print(json.dumps(err) if args.json else f"{path}: ERROR {exc}", flush=True)
            continue
        total_views += len(pred.views)
        if args.json:
            print(json.dumps({"model": cfg.name, **image_result(pred, 0, str(path))}))
        else:
            best = ", ".join(f"{t.label} ({t.prob:.3f})" for t in pred.top)
            by = "" if pred.answered_by == [cfg.name] else f", by {'+'.join(pred.answered_by)}"
            print(f"{path}: {best}  [{len(pred.views)} views, {pred.level}{by}]")
    elapsed = time.perf_counter() - t_start
    if not args.json and total_views:
        print(
            f"{total_views} views in {elapsed:.2f} s = {total_views / elapsed:.1f} views/s",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from app.repository import ModelRepository

    repo = ModelRepository(settings_from_args(args).models_dir)
    for name in repo.names():
        cfg = repo.config(name)
        ok, why = repo.available(name)
        state = "available" if ok else f"unavailable: {why}"
        print(f"{name}\t{cfg.arch}\t{cfg.input_size}px crop_pct={cfg.crop_pct}\t{state}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """The settings in effect (MIDSERVE_NAME=value), or with --markdown their reference table."""
    from pydantic import ValidationError

    from app.config import Settings
    from app.settings_doc import effective_values, markdown

    if args.markdown:
        print(markdown(), end="")
        return 0
    try:
        settings = Settings()
    except ValidationError as exc:
        raise MidserveError(f"the MIDSERVE_* environment does not validate: {exc}") from exc
    print("\n".join(effective_values(settings)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from app.api.http_protocol import event_loop, protocol_class
    from app.main import create_app
    from app.runtime.plan import EngineOptions

    settings = settings_from_args(args)
    if args.models:
        settings = settings.model_copy(update={"models": args.models.split(",")})
    if args.compile:
        settings = settings.model_copy(update={"compile": True})
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; with this
    # handler in place that re-raise ends the process with status 0 (a clean, asked-for stop)
    # instead of -15, which supervisors would report as a crash.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    options = None
    if args.previous_paths:
        options = EngineOptions.from_settings(settings).with_changes(
            jpeg_draft=False, uint8_views=False
        )
    app = create_app(settings, options)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        loop=event_loop(),  # uvloop; asyncio's loop only where uvloop cannot import
        # httptools with a header-read timeout, a head bound and the connection limit
        # (docs/reliability.md, "Slow clients")
        http=protocol_class(
            settings.header_read_timeout_s, settings.max_connections, app.state.metrics
        ),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=30,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify image files with matched views")
    p.add_argument("images", nargs="+", help="image files")
    add_model_arg(p)
    p.add_argument(
        "--views",
        default=None,
        help="e.g. fixed:5,mfixed:5,random:10,mrandom:10; staged: center|margin<0.4|full@288; "
        "a cascade: center|margin<0.4|OTHER_MODEL:full,mfull",
    )
    p.add_argument("--crops", type=int, default=None, help="crop count; the default policy mixes")
    p.add_argument("--level", default=None, choices=["feature", "logit", "softmax"])
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="fixes random view positions")
    p.add_argument("--chunk-views", type=int, default=0, help="views per forward (0 = auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    add_engine_args(p)
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser("models", help="list the model repository")
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser(
        "settings",
        help="the MIDSERVE_* settings in effect, or their reference",
        description="MIDSERVE_NAME=value for every setting in effect (an empty value is "
        "unset; tokens hidden); --markdown: the reference instead",
    )
    p.add_argument("--markdown", action="store_true",
                   help="print docs/configuration.md: every setting, its type, default and "
                   "what it does")  # fmt: skip
    p.set_defaults(handler=cmd_settings)

    p = sub.add_parser("serve", help="run the HTTP server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", default=None, help="comma list of model names, or 'all'")
    add_engine_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--log-level", default="info")
    # the bench's baseline, no operator's choice: whole-image float32 views, full-size JPEGs
    p.add_argument("--previous-paths", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_serve)

    # the jobs' own command lines: argparse only, their work is imported when it runs
    evaluate_cli.register(sub)
    finetune_cli.register(sub)
    import_fixres_cli.register(sub)
    quantize_cli.register(sub)
    bench_cli.register(sub)
    return parser


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
