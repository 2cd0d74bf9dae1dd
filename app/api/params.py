"""Classify parameters from the query string and/or multipart form fields, validated once.

``ClassifyQuery`` is the typed model of the parameters and the one place they are checked:
the OpenAPI document is generated from it, and ``parse_classify_params`` merges the raw
strings, validates them with it (the bounds that are settings, and the model's labels,
come in as validation context) and turns pydantic's errors into domain errors that say
which parameter is wrong. No torch in here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.config import Settings
from app.errors import InvalidRequestError, LimitExceededError
from app.labels import LabelSet
from app.model_config import ModelConfig
from app.request import LEVELS, ClassifyRequest, Level, check_level
from app.tta.stages import StagedPolicy, parse_policy
from app.tta.views import ViewSpec, default_policy

MAX_SEED = 2**31 - 1
_INTEGER = re.compile(r"-?[0-9]+")
MAX_INTEGER_LENGTH = 12  # longer digit strings are refused as text, before any range check

# Our own pydantic error types; ``ctx["message"]`` is the domain error's message.
INVALID, OVER_LIMIT = "midserve_invalid", "midserve_over_limit"

T = TypeVar("T")


@dataclass(frozen=True)
class QueryContext:
    """What a request is validated against beyond the parameters themselves: the bounds
    that are settings (or the model's class count) and the model's labels."""

    max_views: int  # views per request (``Settings.max_views_per_request``)
    max_top_k: int  # ``top_k_limit``
    labels: LabelSet
    images: int  # images in the request: one label each, when labelled


def top_k_limit(num_classes: int, settings: Settings) -> int:
    """The largest ``top_k`` a model answers: its class count, capped by the setting."""
    return min(num_classes, settings.max_top_k)


# Upper bounds that come from the validation context, by parameter (the lower ones are in
# the fields, and so in the OpenAPI document).
CONTEXT_BOUNDS = {"crops": "max_views", "top_k": "max_top_k"}


def _error(message: str, over_limit: bool = False) -> PydanticCustomError:
    return PydanticCustomError(
        OVER_LIMIT if over_limit else INVALID, "{message}", {"message": message}
    )


def _field_name(info: ValidationInfo) -> str:
    return info.field_name or "value"


def _context(info: ValidationInfo) -> QueryContext | None:
    return info.context if isinstance(info.context, QueryContext) else None


def _one(value: Any, name: str) -> Any:
    """A parameter's one value: raw values come as a list (query and form merged, empty
    ones dropped), and a parameter given twice is an error."""
    if not isinstance(value, list):
        return value
    if len(value) > 1:
        raise _error(f"parameter {name!r} was given {len(value)} times")
    return value[0] if value else None


def _integer(value: Any, info: ValidationInfo) -> Any:
    """Digits with an optional minus sign (whitespace around allowed), or an int."""
    value = _one(value, _field_name(info))
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    text = value.strip() if isinstance(value, str) else ""
    if not (_INTEGER.fullmatch(text) and len(text) <= MAX_INTEGER_LENGTH):
        raise _error(f"{_field_name(info)} must be an integer, got {str(value)[:40]!r}")
    return int(text)


def _domain(parse: Callable[[Any], T]) -> Callable[[Any, ValidationInfo], T]:
    """``parse`` of the parameter's one value, its domain errors turned into pydantic
    errors that keep their message."""

    def run(value: Any, info: ValidationInfo) -> T:
        value = _one(value, _field_name(info))
        try:
            return parse(value)
        except LimitExceededError as exc:
            raise _error(str(exc), over_limit=True) from exc
        except InvalidRequestError as exc:
            raise _error(str(exc)) from exc

    return run


def _labels(value: Any, info: ValidationInfo) -> list[int]:
    """Class indices or ids, one per image (comma-separated or repeated); [] for none."""
    texts = value if isinstance(value, list) else [value]
    values = [s.strip() for v in texts for s in str(v).split(",") if s.strip()]
    ctx = _context(info)
    if not values:
        return []
    if ctx is None:
        raise _error("labels cannot be checked without the model's label set")
    if len(values) != ctx.images:
        raise _error(f"{len(values)} label(s) for {ctx.images} image(s): give one label per image")
    parsed = []
    for text in values:
        idx = ctx.labels.index_of(text)
        if idx is None:
            raise _error(
                f"label {text[:40]!r} is neither a class index 0-{len(ctx.labels) - 1} "
                "nor a known class id"
            )
        parsed.append(idx)
    return parsed


def _view_spec(value: Any) -> StagedPolicy:
    if isinstance(value, StagedPolicy):
        return value
    if isinstance(value, ViewSpec):
        return StagedPolicy.single(value)
    return parse_policy(value)


# The wire form of each parameter is text; the model holds the parsed value.
QueryInt = Annotated[int | None, BeforeValidator(_integer)]
ViewsText = Annotated[
    StagedPolicy, PlainValidator(_domain(_view_spec)), WithJsonSchema({"type": "string"})
]
LevelText = Annotated[Level, BeforeValidator(_domain(check_level))]
LabelTexts = Annotated[
    list[int],
    PlainValidator(_labels),
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]


class ClassifyQuery(BaseModel):
    """The parameters of ``POST /v1/models/{model}/classify``, in the query or the form."""

    crops: QueryInt = Field(None, ge=1, description="number of views; a default mix is used")
    views: ViewsText | None = Field(
        None,
        description="view mix, e.g. fixed:5,mfixed:5,random:10; or a staged policy: "
        "center|margin<0.4|full@288,mfull@288 (later views only where the gate is below); "
        "a later stage may run on another served model: center|margin<0.4|MODEL:full,mfull",
    )
    level: LevelText | None = Field(None, description=f"averaging level: {', '.join(LEVELS)}")
    top_k: Annotated[int, BeforeValidator(_integer)] = Field(
        5, ge=1, description="classes returned per image"
    )
    seed: QueryInt = Field(None, ge=0, le=MAX_SEED, description="fixes random view positions")
    label: LabelTexts | None = Field(
        None, description="ground truth (class index or synset), one per image, for accuracy"
    )

    @model_validator(mode="before")
    @classmethod
    def _crops_or_views(cls, data: Any) -> Any:
        """Both choose the views: at most one of them (each given at most once)."""
        if not isinstance(data, Mapping):
            return data
        crops, views = (_one(data.get(name), name) for name in ("crops", "views"))
        if crops is not None and views is not None:
            raise _error("give either 'crops' or 'views', not both")
        return data

    @classmethod
    def bounds(cls, name: str, context: QueryContext | None) -> tuple[int | None, int | None]:
        """(lowest, highest) value of an integer parameter; None: unbounded (or unknown
        without the context)."""
        meta = cls.model_fields[name].metadata
        lo = next((m.ge for m in meta if isinstance(m, annotated_types.Ge)), None)
        hi = next((m.le for m in meta if isinstance(m, annotated_types.Le)), None)
        if name in CONTEXT_BOUNDS and context is not None:
            hi = getattr(context, CONTEXT_BOUNDS[name])
        return cast("int | None", lo), cast("int | None", hi)  # the fields are ints

    @field_validator(*CONTEXT_BOUNDS)
    @classmethod
    def _within_the_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        name = _field_name(info)
        _, hi = cls.bounds(name, _context(info))
        if value is None or hi is None or value <= hi:
            return value
        if name == "crops":  # asking for more views than the server runs: a limit
            raise _error(f"{name}={value} is over the limit of {hi}", over_limit=True)
        raise _error(range_message(name, value, _context(info)))

    @field_validator("views")
    @classmethod
    def _views_within_the_limit(
        cls, spec: StagedPolicy | None, info: ValidationInfo
    ) -> StagedPolicy | None:
        ctx = _context(info)
        if spec is not None and ctx is not None and spec.total > ctx.max_views:
            message = f"{spec.total} views requested; the limit is {ctx.max_views}"
            raise _error(message, over_limit=True)
        return spec

    @property
    def spec(self) -> StagedPolicy | None:
        """The views asked for: ``crops`` as the default mix for that count, or ``views``."""
        if self.crops is not None:
            return StagedPolicy.single(default_policy(self.crops))
        return self.views


PARAM_NAMES = tuple(ClassifyQuery.model_fields)


def range_message(name: str, value: object, context: QueryContext | None) -> str:
    """What an integer parameter outside its bounds is told."""
    lo, hi = ClassifyQuery.bounds(name, context)
    return f"{name} must be between {lo} and {hi}, got {value}"


def domain_error(exc: ValidationError, context: QueryContext | None) -> InvalidRequestError:
    """The first problem pydantic found (parameters are checked in field order), as the
    domain error the API maps to a status, its message naming the parameter."""
    err = exc.errors(include_url=False)[0]
    kind, loc = err["type"], err["loc"]
    ctx = err.get("ctx") or {}
    if kind == OVER_LIMIT:
        return LimitExceededError(str(ctx["message"]))
    if kind == INVALID:
        return InvalidRequestError(str(ctx["message"]))
    name = str(loc[0]) if loc else "request"
    if kind in ("greater_than_equal", "less_than_equal"):
        return InvalidRequestError(range_message(name, err["input"], context))
    return InvalidRequestError(f"{name}: {err['msg']}")


def merge_params(raw: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """The given values as ``ClassifyQuery`` input: each parameter's non-empty values (an
    empty one counts as absent; /v1 gives lists of text, the Open Inference Protocol one
    typed value, or a list of labels), with the model's default views (unless crops are
    given) and level filled in."""
    values: dict[str, Any] = {}
    for name in PARAM_NAMES:
        value = raw.get(name, ())
        given = [v for v in (value if isinstance(value, list | tuple) else [value]) if v != ""]
        if given:
            values[name] = given
    if "crops" not in values:
        values.setdefault("views", cfg.default_views)
    values.setdefault("level", cfg.default_level)
    return values


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


def parse_classify_params(
    raw: Mapping[str, Any],
    cfg: ModelConfig,
    labels: LabelSet,
    settings: Settings,
    n_images: int,
) -> ClassifyParams:
    """``raw`` maps each parameter name to its values: /v1's text (query and form merged)
    or the protocol's typed values; both are checked by the one model."""
    values = merge_params(raw, cfg)
    context = QueryContext(
        settings.max_views_per_request, top_k_limit(cfg.num_classes, settings), labels, n_images
    )
    try:
        query = ClassifyQuery.model_validate(values, context=context)
    except ValidationError as exc:
        raise domain_error(exc, context) from None
    spec, level = query.spec, query.level
    assert spec is not None and level is not None  # merge_params filled the model's defaults
    # the default top_k is the field's, for models of fewer classes as many as they have
    top_k = query.top_k if "top_k" in query.model_fields_set else min(query.top_k, cfg.num_classes)
    plain = spec if spec.staged else spec.first  # a plain spec stays a ViewSpec
    request = ClassifyRequest(plain, level, top_k, query.seed)
    labelled: list[int | None] = [*query.label] if query.label else [None] * n_images
    return ClassifyParams(request, labelled)
