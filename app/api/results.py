"""/v1's JSON answers, rendered from the core's plain results and serialised once (orjson).

The shapes are the ones ``app/schemas.py`` documents in the OpenAPI document; building
plain dicts instead of pydantic models and dumping them keeps ~1 ms of CPU per request off
the event loop. ``tests/api`` validate answers against those schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.responses import Response

from app.answers import TopClass
from app.api.errors import classify_error, error_body, error_headers
from app.errors import MidserveError
from app.pipeline import Prediction


class JSONAnswer(Response):
    """A JSON response serialised by orjson (numpy-free plain data)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def top(classes: Sequence[TopClass]) -> list[dict[str, Any]]:
    return [{"index": t.index, "synset": t.synset, "label": t.label, "prob": t.prob}
            for t in classes]  # fmt: skip


def image_result(
    pred: Prediction, index: int = 0, file: str | None = None, label: int | None = None
) -> dict[str, Any]:
    """One image's answer as /v1 (and ``midserve classify``) write it; ``stages`` only for a
    staged policy and ``label`` only for a labelled image."""
    out: dict[str, Any] = {
        "index": index,
        "file": file,
        "top": top(pred.top),
        "level": pred.level,
        "views": len(pred.views),
        "view_equivalents": round(pred.view_equivalents, 4),
        "answered_by": pred.answered_by,
        "agreement": round(pred.agreement, 4),
        "temperature": pred.temperature,
        "spec": pred.spec,
        "policy": pred.policy,
    }
    if pred.stages:
        out["stages"] = [
            {
                "spec": s.spec,
                "views": s.views,
                "ran": s.ran,
                "gate": s.gate,
                "signal": s.signal,
                "model": s.model,
                "view_equivalents": s.view_equivalents,
            }
            for s in pred.stages
        ]
    out["seed"] = pred.seed
    if label is not None:
        out["label"] = label
    out["view_boxes"] = [
        {"kind": v.kind, "flip": v.flip, "box": b}
        for v, b in zip(pred.views, pred.boxes, strict=True)
    ]
    out["view_top1"] = top(pred.view_top1)
    out["timings_ms"] = {k: round(v * 1000.0, 3) for k, v in pred.timings.items()}
    return out


def image_error(exc: MidserveError, index: int, file: str | None) -> dict[str, Any]:
    return {"index": index, "file": file, "error": {"type": classify_error(exc)[1],
                                                    "message": str(exc)}}  # fmt: skip


def classify_answer(
    model: str,
    outcomes: Sequence[Prediction | MidserveError],
    files: Sequence[str | None],
    labels: Sequence[int | None],
    status: int,
    total_ms: float,
) -> Response:
    """Every image's result, or its own error; when every image failed (``status`` is
    then the first failure's), the error body of the first with the results beside it."""
    results: list[dict[str, Any]] = []
    first_error: MidserveError | None = None
    for index, (outcome, file, label) in enumerate(zip(outcomes, files, labels, strict=True)):
        if isinstance(outcome, MidserveError):
            first_error = first_error or outcome
            results.append(image_error(outcome, index, file))
        else:
            results.append(image_result(outcome, index, file, label))
    if status != 200 and first_error is not None:
        body = error_body(classify_error(first_error)[1], str(first_error))
        body["results"] = results
        return JSONAnswer(body, status_code=status, headers=error_headers(first_error))
    return JSONAnswer({"model": model, "results": results, "timings_ms": {"total": total_ms}})
