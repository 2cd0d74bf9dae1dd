"""The evaluation's report: rows with paired statistics against the center crop, written
as results.md / .csv / .json, the sweep plot, and the model's eval.json for the server."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DataError
from app.eval_results import EvalResult, write_eval_results
from app.jobs.datasets import LabelledFolder
from app.jobs.evaluate.compute import pareto_front, plot_policies
from app.jobs.evaluate.configs import BASELINE, TOP_K, EvalOptions
from app.jobs.evaluate.staged import Calibration, StagedRow, plain_halves, staged_rows
from app.jobs.evaluate.staged_tables import markdown_calibration_table, markdown_staged_table
from app.jobs.evaluate.tables import (
    Row,
    SweepPoint,
    crop_statistics,
    csv_table,
    gains_by_aspect,
    markdown_aspect_table,
    markdown_table,
    paired,
    plot_sweep,
    rows_to_json,
    sweep_csv,
)
from app.model_config import ModelConfig

log = logging.getLogger(__name__)


def mean_of(records: list[dict[str, Any]], field: str, name: str) -> float:
    """Mean of a per-image number (NaN for records written before it was kept)."""
    values = [r[field][name] for r in records if field in r]
    return float(np.mean(values)) if len(values) == len(records) else math.nan


def correct_at(records: list[dict[str, Any]], name: str, k: int) -> np.ndarray:
    """Per image: is the target among config ``name``'s top ``k``."""
    return np.array([r["target"] in r["top"][name][:k] for r in records], dtype=bool)


def build_report(
    opts: EvalOptions,
    folder: LabelledFolder,
    names: list[str],
    records: dict[str, dict[str, Any]],
    cfg: ModelConfig,
    resumed: int,
    timed: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Rows with paired statistics against the center crop and each config's compute
    (``timed``: measured milliseconds per image by config, when they were measured)."""
    ordered = [records[n] for n in names if n in records]
    scored = [r for r in ordered if "top" in r]
    skipped = [{"file": r["file"], "reason": r["skipped"]} for r in ordered if "skipped" in r]
    if not scored:
        raise DataError(
            f"no image of {opts.data} could be evaluated ({len(skipped)} skipped: "
            + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
            + ")"
        )
    base = correct_at(scored, BASELINE, 1)
    rows = []
    for c in opts.configs:
        c1 = correct_at(scored, c.name, 1)
        rows.append(
            Row(
                config=c.name,
                level=c.level,
                images=len(scored),
                top1=float(c1.mean()),
                top5=float(correct_at(scored, c.name, TOP_K).mean()),
                mean_views=float(np.mean([r["views"][c.name] for r in scored])),
                paired=None if c.name == BASELINE else paired(c1, base, seed=opts.seed),
                view_equivalents=mean_of(scored, "view_equivalents", c.name),
                gflops=mean_of(scored, "gflops", c.name),
                ms_per_image=(timed or {}).get(c.name, math.nan),
            )
        )
    sizes = [tuple(r["size"]) for r in scored]
    aspects = np.array([max(s) / min(s) for s in sizes])
    table_names = [c.name for c in opts.configs]
    report: dict[str, Any] = {
        "model": opts.model,
        "dataset": opts.dataset_name or opts.data.resolve().name,
        "dataset_path": str(opts.data.resolve()),
        "layout": folder.layout,
        "images_listed": len(names),
        "images": len(scored),
        "skipped": skipped,
        "unlabelled": len(folder.unlabelled),
        "resumed_images": resumed,
        "seed": opts.seed,
        "baseline": BASELINE,
        "rows": rows_to_json(rows),
        "crop_statistics": crop_statistics(sizes, cfg.input_size, cfg.resize_size),
        "by_aspect": gains_by_aspect(
            aspects, {n: correct_at(scored, n, 1) for n in table_names}, BASELINE
        ),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if opts.sweep:
        points = [
            SweepPoint(
                k,
                float(correct_at(scored, rc.name, 1).mean()),
                float(correct_at(scored, cc.name, 1).mean()),
            )
            for k, rc, cc in opts.sweep.configs()
        ]
        report["sweep"] = {"level": opts.sweep.level, "points": [asdict(p) for p in points]}
    report["_rows"] = rows
    plain = {
        c.name: c.spec
        for c in opts.configs
        if c.level == "softmax" and c.stages is None and c.spec is not None
    }
    staged: list[StagedRow] = []
    calibrations: list[Calibration] = []
    if all("probs" in r for r in scored):
        staged, calibrations = staged_rows(scored, plain, BASELINE, opts.budgets(), opts.seed)
    report["_staged"] = staged
    report["staged_split"] = "threshold and temperature fitted on one half, scored on the other"
    report["staged"] = [asdict(r) for r in staged]
    report["calibration"] = [asdict(c) for c in calibrations]
    report["_plain_halves"] = (
        {n: plain_halves(scored, n, opts.seed) for n in plain} if staged else {}
    )
    return report


def write_report(opts: EvalOptions, report: dict[str, Any], model_folder: Path | None) -> None:
    out = opts.out
    rows: list[Row] = report.pop("_rows")
    staged: list[StagedRow] = report.pop("_staged", [])
    halves: dict[str, dict[str, float]] = report.pop("_plain_halves", {})
    report["staged"] = [asdict(r) for r in staged]  # with the measured ms, where timed
    title = (
        f"{report['model']} on {report['dataset']} ({report['images']} images, "
        f"{len(report['skipped'])} skipped, seed {report['seed']})"
    )
    md = [f"# {title}\n", markdown_table(rows, BASELINE)]
    md.append("\n## Top-1 % by aspect ratio of the resized image\n\n")
    md.append(markdown_aspect_table(report["by_aspect"], [r.config for r in rows]))
    stats = report["crop_statistics"]
    md.append("\n## Room around the crop\n\n```\n" + json.dumps(stats, indent=2) + "\n```\n")
    if "sweep" in report:
        points = [SweepPoint(**p) for p in report["sweep"]["points"]]
        (out / "sweep.csv").write_text(sweep_csv(points))
        center = next(r.top1 for r in rows if r.config == BASELINE)
        plot_sweep(points, center, title, out / "sweep.png", report["sweep"]["level"])
        md.append("\n## Sweep (Fig. 3)\n\n![sweep](sweep.png)\n\n```\n" + sweep_csv(points))
        md.append("```\n")
    if staged:
        md.append("\n## Staged policies: more views only where the model is unsure\n\n")
        md.append(markdown_staged_table(staged, halves, BASELINE))
    if report["calibration"]:
        md.append("\n## Calibration and uncertainty\n\n")
        md.append(markdown_calibration_table([Calibration(**c) for c in report["calibration"]]))
    if not any(math.isnan(r.gflops) for r in rows):
        plot_policies(rows, title, out / "policies.png", staged)
        front = ", ".join(f"`{r.config}`" for r in pareto_front(rows))
        md.append(
            f"\n## Accuracy against compute\n\n![policies](policies.png)\n\nPareto front: {front}\n"
        )
    (out / "results.md").write_text("".join(md))
    (out / "results.csv").write_text(csv_table(rows))
    (out / "results.json").write_text(json.dumps(report, indent=2, default=nan_none) + "\n")
    if opts.write_model_results and model_folder is not None:
        results = [
            EvalResult(
                model=report["model"],
                config=r.config,
                dataset=report["dataset"],
                top1=r.top1,
                top5=r.top5,
                images=r.images,
                level=r.level,
                skipped=len(report["skipped"]),
                mean_views=r.mean_views,
                diff_top1_vs_center=r.paired.diff if r.paired else 0.0,
                ci_low=r.paired.ci_low if r.paired else 0.0,
                ci_high=r.paired.ci_high if r.paired else 0.0,
                seed=report["seed"],
                dataset_path=report["dataset_path"],
                evaluated_at=report["evaluated_at"],
            )
            for r in rows
        ]
        try:
            write_eval_results(model_folder, report["model"], results)
        except OSError as exc:
            log.warning("could not write %s/eval.json: %s", model_folder, exc)


def nan_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
