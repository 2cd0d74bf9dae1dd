"""Classify parameters parsed without a server: every bound in range, just outside it, the
wrong type and given twice, each refused with a domain error that names the parameter."""

from __future__ import annotations

import re

import pytest

from app.api.params import (
    MAX_SEED,
    ClassifyParams,
    ClassifyQuery,
    classify_openapi,
    parse_classify_params,
)
from app.config import Settings
from app.errors import InvalidRequestError, LimitExceededError
from app.labels import LabelSet
from app.model_config import ModelConfig, WeightsSource
from app.tta.views import default_policy, parse_view_spec

MAX_VIEWS, MAX_TOP_K, CLASSES = 40, 8, 10
SETTINGS = Settings(max_views_per_request=MAX_VIEWS, max_top_k=MAX_TOP_K)
CFG = ModelConfig("tiny", "resnet18", WeightsSource(kind="none"), num_classes=CLASSES)
LABELS = LabelSet(tuple(f"n{i:08d}" for i in range(CLASSES)), tuple(f"c{i}" for i in range(10)))
Params = dict[str, str | list[str]]


def parse(
    params: Params | None = None, n_images: int = 1, cfg: ModelConfig = CFG
) -> ClassifyParams:
    raw = {k: v if isinstance(v, list) else [v] for k, v in (params or {}).items()}
    return parse_classify_params(raw, cfg, LABELS, SETTINGS, n_images)


def refused(match: str, params: Params, n_images: int = 1) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError, match=match) as info:
        parse(params, n_images)
    return info.value


def test_no_parameters_give_the_models_defaults() -> None:
    request = parse().request
    assert request.spec == parse_view_spec(CFG.default_views)
    assert (request.level, request.top_k, request.seed) == (CFG.default_level, 5, None)
    assert parse().labels == [None]
    few = CFG.with_changes(num_classes=3)  # the default top_k, capped at the class count
    assert parse(cfg=few).request.top_k == 3


def test_empty_values_count_as_absent() -> None:
    empty: Params = {name: "" for name in ("crops", "views", "level", "top_k", "seed", "label")}
    assert parse(empty) == parse()


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [("crops", 1, MAX_VIEWS), ("top_k", 1, MAX_TOP_K), ("seed", 0, MAX_SEED)],
)
def test_integer_bounds(name: str, lo: int, hi: int) -> None:
    for value in (lo, hi, f" {lo} "):  # in range, whitespace around allowed
        parse({name: str(value)})
    error = refused(f"^{name} must be between {lo} and {hi}, got {lo - 1}$", {name: str(lo - 1)})
    assert not isinstance(error, LimitExceededError)
    if name == "crops":  # more views than the server runs: a limit
        with pytest.raises(LimitExceededError, match=f"^crops={hi + 1} is over the limit of {hi}$"):
            parse({"crops": str(hi + 1)})
    else:
        refused(f"^{name} must be between {lo} and {hi}, got {hi + 1}$", {name: str(hi + 1)})
    for text in ("ten", "1.0", "+5", "--5", "-", "٣", "99999999999999999999"):
        refused(f"^{re.escape(f'{name} must be an integer, got {text!r}')}$", {name: text})
    refused(f"^parameter '{name}' was given 2 times$", {name: [str(lo), str(lo)]})


def test_integer_values_reach_the_request() -> None:
    assert parse({"crops": "7"}).request.spec == default_policy(7)
    assert parse({"top_k": "8"}).request.top_k == 8
    assert parse({"seed": str(MAX_SEED)}).request.seed == MAX_SEED
    assert parse({"seed": "007"}).request.seed == 7


def test_top_k_is_bounded_by_the_class_count_too() -> None:
    few = CFG.with_changes(num_classes=3)
    assert parse({"top_k": "3"}, cfg=few).request.top_k == 3
    with pytest.raises(InvalidRequestError, match="^top_k must be between 1 and 3, got 4$"):
        parse({"top_k": "4"}, cfg=few)


def test_views_spec_and_its_limit() -> None:
    assert parse({"views": "center,full@96"}).request.spec == parse_view_spec("center,full@96")
    assert parse({"views": f"random:{MAX_VIEWS}"}).request.spec.total == MAX_VIEWS
    with pytest.raises(LimitExceededError, match=f"^41 views requested; the limit is {MAX_VIEWS}$"):
        parse({"views": f"random:{MAX_VIEWS + 1}"})
    refused("unknown view kind 'zoom'", {"views": "zoom:3"})
    refused("positive integer", {"views": "random:two"})
    refused("at most 5", {"views": "fixed:6"})
    refused("between 16 and 2048", {"views": "full@0"})
    refused("^parameter 'views' was given 2 times$", {"views": ["center", "center"]})
    over = CFG.with_changes(default_views=f"random:{MAX_VIEWS + 1}")  # the default counts too
    with pytest.raises(LimitExceededError, match="views requested"):
        parse(cfg=over)


def test_crops_and_views_exclude_each_other() -> None:
    refused("^give either 'crops' or 'views', not both$", {"crops": "3", "views": "center"})
    refused("not both", {"crops": "ten", "views": "center"})  # before either value is looked at
    refused("^parameter 'crops' was given 2 times$", {"crops": ["1", "2"], "views": "center"})


def test_level() -> None:
    for level in ("feature", "logit", "softmax"):
        assert parse({"level": level}).request.level == level
    refused("^level must be one of feature, logit, softmax, got 'median'$", {"level": "median"})
    refused("got 'Softmax'", {"level": "Softmax"})
    refused("^parameter 'level' was given 2 times$", {"level": ["logit", "softmax"]})


def test_labels_one_per_image() -> None:
    assert parse({"label": "3"}).labels == [3]
    # a synset or a class index, comma-separated or repeated
    assert parse({"label": "n00000004, 9"}, n_images=2).labels == [4, 9]
    assert parse({"label": ["1", "2"]}, n_images=2).labels == [1, 2]
    refused(
        r"^1 label\(s\) for 2 image\(s\): give one label per image$", {"label": "1"}, n_images=2
    )
    refused("^label '10' is neither a class index 0-9 nor a known class id$", {"label": "10"})
    refused("label 'n99999999'", {"label": "n99999999"})


def test_the_first_problem_in_parameter_order_is_reported() -> None:
    refused("^crops must be between", {"crops": "0", "level": "median", "top_k": "0"})
    refused("^level must be", {"level": "median", "top_k": "0", "seed": "-1"})
    refused("^top_k must be between", {"top_k": "0", "seed": "-1", "label": "10"})


def test_openapi_states_the_static_bounds() -> None:
    schemas = {p["name"]: p["schema"] for p in classify_openapi()["parameters"]}
    assert schemas["crops"] == {"type": "integer", "minimum": 1}
    assert schemas["top_k"] == {"type": "integer", "minimum": 1, "default": 5}
    assert schemas["seed"] == {"type": "integer", "minimum": 0, "maximum": MAX_SEED}
    assert schemas["views"] == {"type": "string"}
    assert schemas["label"] == {"type": "array", "items": {"type": "string"}}
    assert ClassifyQuery.bounds("crops", None) == (1, None)  # the rest is a setting
