"""Classify parameters from the query string and/or multipart form fields, validated once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.config import Settings
from app.engine import check_level
from app.errors import InvalidRequestError, LimitExceededError
from app.labels import LabelSet
from app.model_config import ModelConfig
from app.tta.averaging import Level
from app.tta.views import ViewSpec, default_policy, parse_view_spec

PARAM_NAMES = ("crops", "views", "level", "top_k", "seed", "label")
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class ClassifyParams:
    spec: ViewSpec
    level: Level
    top_k: int
    seed: int | None
    labels: list[int | None]  # one per image (None: not labelled)


def _one(raw: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = [v for v in raw.get(name, ()) if v != ""]
    if len(values) > 1:
        raise InvalidRequestError(f"parameter {name!r} was given {len(values)} times")
    return values[0] if values else None


def _int(text: str, name: str, lo: int, hi: int) -> int:
    t = text.strip()
    if not (t.isascii() and t.lstrip("-").isdigit()) or len(t) > 12:
        raise InvalidRequestError(f"{name} must be an integer, got {text[:40]!r}")
    value = int(t)
    if not lo <= value <= hi:
        if name in ("crops",) and value > hi:
            raise LimitExceededError(f"{name}={value} is over the limit of {hi}")
        raise InvalidRequestError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def parse_classify_params(
    raw: Mapping[str, Sequence[str]],
    cfg: ModelConfig,
    labels: LabelSet,
    settings: Settings,
    n_images: int,
) -> ClassifyParams:
    """``raw`` maps each parameter name to its values (query and form merged)."""
    crops_text, views_text = _one(raw, "crops"), _one(raw, "views")
    if crops_text is not None and views_text is not None:
        raise InvalidRequestError("give either 'crops' or 'views', not both")
    max_views = settings.max_views_per_request
    if crops_text is not None:
        spec = default_policy(_int(crops_text, "crops", 1, max_views))
    else:
        spec = parse_view_spec(views_text or cfg.default_views)
    if spec.total > max_views:
        raise LimitExceededError(f"{spec.total} views requested; the limit is {max_views}")
    level = check_level(_one(raw, "level") or cfg.default_level)
    top_k_text = _one(raw, "top_k")
    max_k = min(cfg.num_classes, settings.max_top_k)
    top_k = _int(top_k_text, "top_k", 1, max_k) if top_k_text else min(5, cfg.num_classes)
    seed_text = _one(raw, "seed")
    seed = _int(seed_text, "seed", 0, MAX_SEED) if seed_text is not None else None
    label_values = [s.strip() for v in raw.get("label", ()) for s in v.split(",") if s.strip()]
    if label_values and len(label_values) != n_images:
        raise InvalidRequestError(
            f"{len(label_values)} label(s) for {n_images} image(s): give one label per image"
        )
    parsed: list[int | None] = []
    for value in label_values:
        idx = labels.index_of(value)
        if idx is None:
            raise InvalidRequestError(
                f"label {value[:40]!r} is neither a class index 0-{len(labels) - 1} "
                "nor a known class id"
            )
        parsed.append(idx)
    return ClassifyParams(spec, level, top_k, seed, parsed or [None] * n_images)
