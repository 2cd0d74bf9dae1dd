"""Classify parameters from the query string and/or multipart form fields, validated once.

``ClassifyQuery`` is the typed model of the parameters: the OpenAPI document is generated
from it, and ``parse_classify_params`` turns raw strings into the ``ClassifyRequest`` the
pipeline runs, with errors that say which parameter is wrong. No torch in here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from app.config import Settings
from app.errors import InvalidRequestError, LimitExceededError
from app.labels import LabelSet
from app.model_config import ModelConfig
from app.request import LEVELS, ClassifyRequest, Level, check_level
from app.tta.views import default_policy, parse_view_spec

MAX_SEED = 2**31 - 1


class ClassifyQuery(BaseModel):
    """The parameters of ``POST /v1/models/{model}/classify``, in the query or the form."""

    crops: int | None = Field(None, ge=1, description="number of views; a default mix is used")
    views: str | None = Field(None, description="view mix, e.g. fixed:5,mfixed:5,random:10")
    level: Level | None = Field(None, description=f"averaging level: {', '.join(LEVELS)}")
    top_k: int = Field(5, ge=1, description="classes returned per image")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="fixes random view positions")
    label: list[str] | None = Field(
        None, description="ground truth (class index or synset), one per image, for accuracy"
    )


PARAM_NAMES = tuple(ClassifyQuery.model_fields)


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema as a query parameter: optional means absent, never null."""
    options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
    out = {k: v for k, v in options[0].items() if k not in ("title", "description")}
    if prop.get("default") is not None:
        out["default"] = prop["default"]
    return out


def classify_openapi() -> dict[str, Any]:
    """The classify operation's parameters and body, generated from ``ClassifyQuery``."""
    props: dict[str, Any] = ClassifyQuery.model_json_schema()["properties"]
    schemas = {name: _query_schema(prop) for name, prop in props.items()}
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schemas[name],
            "description": props[name].get("description", ""),
        }
        for name in props
    ]
    form = {  # a form field holds one value; several labels go comma-separated
        name: schema["items"] if schema.get("type") == "array" else schema
        for name, schema in schemas.items()
    }
    form["images"] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": form, "required": ["images"]}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    }


@dataclass(frozen=True)
class ClassifyParams:
    request: ClassifyRequest
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


def _labels(raw: Mapping[str, Sequence[str]], labels: LabelSet, n_images: int) -> list[int | None]:
    values = [s.strip() for v in raw.get("label", ()) for s in v.split(",") if s.strip()]
    if values and len(values) != n_images:
        raise InvalidRequestError(
            f"{len(values)} label(s) for {n_images} image(s): give one label per image"
        )
    parsed: list[int | None] = []
    for value in values:
        idx = labels.index_of(value)
        if idx is None:
            raise InvalidRequestError(
                f"label {value[:40]!r} is neither a class index 0-{len(labels) - 1} "
                "nor a known class id"
            )
        parsed.append(idx)
    return parsed or [None] * n_images


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
    request = ClassifyRequest(spec, level, top_k, seed)
    return ClassifyParams(request, _labels(raw, labels, n_images))
