"""Evaluation results kept next to a model: ``models/<name>/eval.json``.

Written by ``midserve evaluate``, read by the server (one ``midserve_eval_top1`` gauge per
result). Schema ``midserve.eval/1``::

    {
      "schema": "midserve.eval/1",
      "model": "tf_efficientnet_lite0",
      "results": [
        {
          "model": "tf_efficientnet_lite0",     # model-repository name
          "config": "fixed:5,mfixed:5@softmax",  # view spec @ averaging level ("auto@softmax")
          "level": "softmax",                    # feature | logit | softmax
          "dataset": "imagenet-samples",         # --dataset-name, default the folder's name
          "dataset_path": "/abs/path",           # the folder evaluated
          "images": 100,                         # images scored (skipped ones excluded)
          "skipped": 0,                          # images that could not be decoded
          "top1": 0.91, "top5": 0.98,            # fractions of ``images``, 0..1
          "mean_views": 10.0,                    # views spent per image on average
          "diff_top1_vs_center": 0.02,           # paired difference to center:1@softmax
          "ci_low": 0.0, "ci_high": 0.04,        # its bootstrap 95 % interval
          "seed": 0,                             # fixes the random view positions
          "evaluated_at": "2026-01-01T00:00:00+00:00"
        }
      ]
    }

One entry per (dataset, config); a new evaluation replaces the entries it recomputes and
keeps the others. Evaluations run with ``--limit`` are written too (``images`` says how
many); only the keys listed in :class:`EvalResult` are guaranteed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from app.errors import EvalResultsError

EVAL_FILE = "eval.json"
EVAL_SCHEMA = "midserve.eval/1"


@dataclass(frozen=True)
class EvalResult:
    model: str
    config: str
    dataset: str
    top1: float
    top5: float
    images: int
    level: str = ""
    skipped: int = 0
    mean_views: float = math.nan
    diff_top1_vs_center: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    seed: int = 0
    dataset_path: str = ""
    evaluated_at: str = ""


_REQUIRED = ("model", "config", "dataset", "top1", "top5", "images")
_FIELDS = {f.name for f in fields(EvalResult)}


def _from_json(entry: Any, path: Path) -> EvalResult:
    if not isinstance(entry, dict) or any(k not in entry for k in _REQUIRED):
        raise EvalResultsError(f"{path}: every result needs {', '.join(_REQUIRED)}: {entry!r}")
    kept: dict[str, Any] = {
        k: (math.nan if v is None else v) for k, v in entry.items() if k in _FIELDS
    }
    try:
        result = EvalResult(**kept)
        top1, top5, images = float(result.top1), float(result.top5), int(result.images)
    except (TypeError, ValueError) as exc:
        raise EvalResultsError(f"{path}: malformed result {entry!r}: {exc}") from exc
    if not (0.0 <= top1 <= 1.0 and 0.0 <= top5 <= 1.0 and images >= 0):
        raise EvalResultsError(f"{path}: top1/top5 must be fractions 0..1: {entry!r}")
    return result


def read_eval_results(model_folder: Path) -> list[EvalResult]:
    """The results stored for one model; [] when it was never evaluated.

    A file that exists but cannot be parsed raises EvalResultsError (the server should log
    it and serve on without the gauges).
    """
    path = model_folder / EVAL_FILE
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalResultsError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != EVAL_SCHEMA:
        raise EvalResultsError(f"{path}: not a {EVAL_SCHEMA} document")
    results = doc.get("results")
    if not isinstance(results, list):
        raise EvalResultsError(f"{path}: 'results' must be a list")
    return [_from_json(e, path) for e in results]


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def write_eval_results(model_folder: Path, model: str, new: list[EvalResult]) -> Path:
    """Merge ``new`` into the model's eval.json (replacing the same dataset + config)."""
    try:
        old = read_eval_results(model_folder)
    except EvalResultsError:
        old = []  # a broken file is replaced rather than blocking new results
    replaced = {(r.dataset, r.config) for r in new}
    merged = [r for r in old if (r.dataset, r.config) not in replaced] + list(new)
    doc = {
        "schema": EVAL_SCHEMA,
        "model": model,
        "results": [{k: _json_safe(v) for k, v in asdict(r).items()} for r in merged],
    }
    path = model_folder / EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path
