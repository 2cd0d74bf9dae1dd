"""``midserve quantize`` arguments; the quantization is imported only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import app.jobs.quantize as job
from app.cli_args import add_job_parser, add_model_arg, settings_from_args


def cmd_quantize(args: argparse.Namespace) -> int:
    from app.jobs.quantize.run import quantize

    settings = settings_from_args(args)
    # NNCF draws its progress bars on stdout: there they would corrupt --json
    with contextlib.redirect_stdout(sys.stderr):
        report = quantize(settings.models_dir, args.model, args.images, args.max_images, args.seed)
    print(json.dumps(report, indent=1) if args.json else report_text(report))
    return 0


def report_text(report: dict) -> str:
    lines = [
        f"wrote {report['folder']}: calibrated on {report['calibration_views']} views of "
        f"{report['calibration_images']} photos, {report['check_views']} held-out check views",
        f"int8 vs float32 on the held-out views: top-1 agreement {report['top1_agreement']:.3f}, "
        f"mean max probability difference {report['mean_prob_diff']:.4f}",
    ]
    for name, row in report.get("top1", {}).items():
        ci = row.get("vs_int8")
        vs = f"  int8 - {name}: {ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]" if ci else ""
        lines.append(f"top-1 {name:8s} {row['top1']:.3f} (n={row['n']}){vs}")
    served = report.get("served_policy")
    if served:
        base = served["baseline"]
        lines.append(
            f"served policy {served['policy']} on the {served['n']} held-out photos: int8 "
            f"{served['top1']['int8']:.3f} vs {base} {served['top1'][base]:.3f}, int8 - {base} "
            f"{served['diff']:+.3f} [{served['lo']:+.3f}, {served['hi']:+.3f}] "
            f"({served['fixed']} fixed, {served['broken']} broken; view-equivalents "
            f"{served['view_equivalents']['int8']:.2f} vs {served['view_equivalents'][base]:.2f})"
        )
    why = report.get("not_offered")
    lines.append(f"the tuner will not offer int8 here: {why}" if why else
                 "the tuner will time int8 here beside the float paths")  # fmt: skip
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    summary = "quantize a model to int8 (OpenVINO), calibrated on real photos"
    p = add_job_parser(subparsers, "quantize", summary, job.__doc__)
    add_model_arg(p)
    p.add_argument("--images", type=Path, required=True, help="a folder of real photos")
    p.add_argument("--max-images", type=int, default=600, help="at most this many photos")
    p.add_argument("--seed", type=int, default=0, help="the calibration / held-out split")
    p.add_argument("--models-dir", type=Path, default=None, help="model repository folder")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(handler=cmd_quantize)
