"""The run folder: ``run.json`` says which run it holds, ``records*.jsonl`` one line per
finished image, so an interrupted run resumes and a different run is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.errors import EvalResultsError
from app.jobs.evaluate.configs import EvalConfig, EvalOptions
from app.model_config import ModelConfig

RUN_SCHEMA = "midserve.evalrun/1"


def run_key(opts: EvalOptions, configs: list[EvalConfig], cfg: ModelConfig) -> dict[str, Any]:
    """What must match for earlier records to count towards this run."""
    return {
        "schema": RUN_SCHEMA,
        "model": opts.model,
        "weights": cfg.weights.describe(),
        "input_size": cfg.input_size,
        "resize_size": cfg.resize_size,
        "data": str(opts.data.resolve()),
        "configs": [c.name for c in configs],
        "seed": opts.seed,
        # only when set: run folders written before the option existed still resume
        **({"class_order": opts.class_order} if opts.class_order != "ids" else {}),
    }


def prepare_out(out: Path, key: dict[str, Any], fresh: bool, rank: int) -> None:
    """Start or resume: an existing run folder must hold the same run."""
    run_file = out / "run.json"
    if rank == 0:
        if fresh:
            for p in out.glob("records*.jsonl"):
                p.unlink()
            run_file.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        if run_file.is_file():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise EvalResultsError(f"{run_file} is unreadable ({exc}); use --fresh") from exc
            differs = [k for k in key if old.get(k) != key[k]]
            if differs:
                raise EvalResultsError(
                    f"{out} holds results of a different run (differs in: {', '.join(differs)}); "
                    "give another --out or --fresh to discard them"
                )
        else:
            run_file.write_text(json.dumps(key, indent=2) + "\n")


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """Finished images of earlier (partial) runs; a torn last line is ignored."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("records*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "file" in rec:
                done[rec["file"]] = rec
    return done


def records_path(out: Path, rank: int, world: int) -> Path:
    return out / ("records.jsonl" if world == 1 else f"records-rank{rank}.jsonl")
