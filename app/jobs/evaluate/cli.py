"""``midserve evaluate`` arguments; the evaluation is imported only when it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import app.jobs.evaluate as job
from app.cli_args import (
    add_engine_args,
    add_job_parser,
    add_model_arg,
    settings_from_args,
)
from app.errors import InvalidRequestError
from app.jobs.args import add_class_order_arg
from app.jobs.evaluate.configs import (
    AUTO_STAGE_MODELS,
    PRESETS,
    EvalOptions,
    parse_configs,
    parse_sweep,
)
from app.request import LEVELS


def cmd_evaluate(args: argparse.Namespace) -> int:
    from app.jobs.evaluate.run import run_evaluation

    configs = parse_configs(args.configs)
    sweep = parse_sweep(args.sweep, args.sweep_level)
    folders: list[Path] = args.data
    stage_models = args.stage_models or (
        [AUTO_STAGE_MODELS] if "policies" in " ".join(args.configs).split(";") else ["none"]
    )
    cascades = len(folders) > 1 or stage_models != ["none"]
    name = "cascades" if cascades else folders[0].resolve().name
    out = args.out or Path("runs") / "eval" / f"{args.model}-{name}"
    if args.workers < 0 or args.limit < 0 or args.time_images < 0:
        raise InvalidRequestError("--workers, --limit and --time-images must not be negative")
    if len(folders) > 1 and (args.labels_file or args.sweep):
        raise InvalidRequestError("--labels-file and --sweep take one --data folder")
    opts = EvalOptions(
        model=args.model,
        data=folders[0],
        out=out,
        configs=configs,
        sweep=sweep,
        labels_file=args.labels_file,
        class_order=args.class_order,
        dataset_name=args.dataset_name or "",
        limit=args.limit,
        seed=args.seed,
        models_dir=args.models_dir,
        device=args.device,
        dtype=args.dtype,
        workers=args.workers,
        batch_views=args.batch_views,
        write_model_results=not args.no_model_results,
        fresh=args.fresh,
        progress=not args.no_progress,
        time_images=args.time_images,
        policy_budget=args.write_policy,
        stage_budgets=tuple(args.stage_budgets),
    )
    settings = settings_from_args(args)
    if cascades:
        from app.jobs.evaluate.cascade import run_cascade_search

        searched = run_cascade_search(opts, folders, stage_models, settings)
        sys.stdout.write((out / "cascades.md").read_text())
        _say_written(searched, out)
        return 0
    report = run_evaluation(opts, settings)
    if report is not None:
        sys.stdout.write((out / "results.md").read_text())
        _say_written(report, out)
    return 0


def _say_written(report: dict[str, Any], out: Path) -> None:
    print(f"\nwritten to {out}", file=sys.stderr)
    written = report.get("policy_written")
    if written:
        print(f"views=auto now serves {written['spec']} (test-half top-1 "
              f"{100 * written['top1']:.1f} %, {written['view_equivalents']:.2f} "
              "view-equivalents per image)", file=sys.stderr)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    summary = "accuracy of view configs on a labelled folder (MID tables, Fig. 3)"
    p = add_job_parser(sub, "evaluate", summary, job.__doc__)
    add_model_arg(p)
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="labelled image folder(s); several: one policy search over all of "
                   "them, reported pooled and per folder")  # fmt: skip
    p.add_argument("--stage-models", nargs="+", default=None, metavar="MODEL",
                   help="models tried as a cascade's later stage: names, 'auto' (every other "
                   "model of the repository with the same classes) or 'none'; default: auto "
                   "with the policies preset, else none")  # fmt: skip
    p.add_argument("--labels-file", type=Path, default=None, help="val.txt or LOC_val_solution.csv")
    add_class_order_arg(p)
    p.add_argument("--dataset-name", default=None, help="name in eval.json (default: folder)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["closing"],
        help=f"'spec@level' items (';' separates several in one argument) or presets: "
        f"{', '.join(PRESETS)}; e.g. center:1@softmax 'fixed:5,mfixed:5@softmax' auto",
    )
    p.add_argument("--sweep", default=None, help="Fig. 3 sweep, e.g. random:1..40")
    p.add_argument("--sweep-level", default="softmax", choices=list(LEVELS))
    p.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="fixes every random view position")
    p.add_argument("--out", type=Path, default=None, help="output folder (resumed if present)")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decode workers")
    p.add_argument(
        "--batch-views",
        type=int,
        default=0,
        help="views per forward across images (0 = the device's chunk: 8 cpu, 128 cuda)",
    )
    p.add_argument("--no-model-results", action="store_true", help="do not write eval.json")
    p.add_argument(
        "--time-images",
        type=int,
        default=0,
        help="measure ms per image of each config alone on this many images",
    )
    p.add_argument(
        "--stage-budgets",
        type=float,
        nargs="+",
        default=[1.5, 2.0, 2.5, 3.0],
        metavar="VIEW_EQ",
        help="mean view-equivalents per image at which gated "
        "policies are searched (thresholds fitted on one half of the images)",
    )
    p.add_argument("--write-policy", type=float, default=None, metavar="BUDGET",
                   help="write the most accurate policy (plain or gated, chosen on the fit half) "
                   "within BUDGET view-equivalents per image on average into model.toml as "
                   "what views=auto serves, with its calibration temperatures")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    add_engine_args(p)
    p.set_defaults(handler=cmd_evaluate)
