"""One inference request in protocol terms: its parameters as midserve's classify
parameters (validated by the same code as /v1), and the predictions as output tensors
(``probabilities``, the classification extension, per-image extras)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.api.params import ClassifyParams, parse_classify_params
from app.api.v2.tensors import InferRequestBody, OutputTensor
from app.config import Settings
from app.errors import InvalidRequestError, LimitExceededError
from app.labels import LabelSet
from app.model_config import ModelConfig
from app.pipeline import Prediction

IMAGE_INPUT = "image"
PROBABILITIES = "probabilities"
# per-image extras: name -> (datatype, what it holds)
EXTRAS = {
    "views": ("INT32", "views run"),
    "view_equivalents": ("FP32", "compute: the views' pixels over one view at the input size"),
    "agreement": ("FP32", "share of the views whose own top-1 is the answer"),
    "stages_run": ("INT32", "stages of a staged policy that ran (1 for a plain one)"),
}
REQUEST_PARAMS = ("views", "crops", "level", "top_k", "seed", "label")


def metadata_tensors(num_classes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as model metadata lists them; -1: a variable dimension."""
    inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    outputs = [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]}]
    outputs += [{"name": n, "datatype": t, "shape": [-1]} for n, (t, _) in EXTRAS.items()]
    return inputs, outputs


def _wire_text(value: Any) -> list[str]:
    """A protocol parameter (bool, number, string; a list for labels) as /v1's raw text."""
    items = value if isinstance(value, list) else [value]
    return ["true" if v is True else "false" if v is False else str(v) for v in items]


def classification_counts(body: InferRequestBody) -> dict[str, int]:
    counts = {}
    for out in body.outputs:
        k = (out.get("parameters") or {}).get("classification")
        if k is None:
            continue
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InvalidRequestError(f"output {out['name']!r}: classification must be >= 1")
        counts[out["name"]] = k
    return counts


def image_elements(body: InferRequestBody, settings: Settings) -> list[bytes]:
    """The encoded images: the BYTES input ``image`` of shape [N]."""
    named = {t.name: t for t in body.inputs}
    if IMAGE_INPUT not in named:
        raise InvalidRequestError(f"no input {IMAGE_INPUT!r}; inputs: {', '.join(named)}")
    tensor = named[IMAGE_INPUT]
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            f"input {IMAGE_INPUT!r} must be BYTES (encoded images), got {tensor.datatype}"
        )
    if len(tensor.shape) != 1:
        raise InvalidRequestError(f"input {IMAGE_INPUT!r} must have shape [N], got {tensor.shape}")
    limit = settings.max_images_per_request
    if len(tensor.elements) > limit:
        raise LimitExceededError(f"{len(tensor.elements)} images: at most {limit} per request")
    if not tensor.elements:
        raise InvalidRequestError("no images in the request")
    return tensor.elements


def classify_params(
    body: InferRequestBody,
    cfg: ModelConfig,
    labels: LabelSet,
    settings: Settings,
    n_images: int,
    top_k: int,
) -> ClassifyParams:
    """The request parameters midserve knows, checked as /v1 checks them; others ignored.
    ``top_k`` is raised to the largest classification count asked for."""
    raw = {k: _wire_text(v) for k, v in body.parameters.items() if k in REQUEST_PARAMS}
    if top_k:
        given = int(raw["top_k"][0]) if raw.get("top_k", [""])[0].isdigit() else 0
        raw["top_k"] = [str(max(top_k, given))]
    return parse_classify_params(raw, cfg, labels, settings, n_images)


def output_tensors(
    preds: Sequence[Prediction], wanted: Sequence[str], counts: dict[str, int]
) -> list[OutputTensor]:
    """The outputs asked for (all when none were), in that order."""
    n = len(preds)
    names = list(wanted) or [PROBABILITIES, *EXTRAS]
    out = []
    for name in names:
        if name in counts:
            k = counts[name]
            values = [f"{t.prob:f}:{t.index}:{t.label}".encode() for p in preds for t in p.top[:k]]
            out.append(OutputTensor(name, "BYTES", [n, len(values) // max(n, 1)], values))
        elif name == PROBABILITIES:
            probs = np.stack([p.probs.float().cpu().numpy() for p in preds])
            out.append(OutputTensor(name, "FP32", list(probs.shape), probs))
        else:
            datatype = EXTRAS[name][0]
            column = {
                "views": [len(p.views) for p in preds],
                "view_equivalents": [p.view_equivalents for p in preds],
                "agreement": [p.agreement for p in preds],
                "stages_run": [sum(s.ran for s in p.stages) if p.stages else 1 for p in preds],
            }[name]
            dtype = np.float32 if datatype == "FP32" else np.int32
            out.append(OutputTensor(name, datatype, [n], np.asarray(column, dtype=dtype)))
    return out


def requested_outputs(body: InferRequestBody) -> list[str]:
    """The names of the outputs asked for, checked before any work is done."""
    names = [o["name"] for o in body.outputs]
    known = [PROBABILITIES, *EXTRAS]
    for name in names:
        if name not in known:
            raise InvalidRequestError(f"unknown output {name!r}; outputs: {', '.join(known)}")
    return names
