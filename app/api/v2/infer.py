"""The Open Inference Protocol's codec, shared by its REST and gRPC transports: a parsed
request body -> the edge's ``ClassifyCall`` (typed parameters, validated by the same code as
/v1), predictions -> output tensors (``probabilities``, the classification extension,
per-image extras), and the server and model metadata."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from app.api.edge import MODEL_VERSION, ClassifyCall, Edge, Protocol
from app.api.v2.tensors import InferRequestBody, OutputTensor
from app.config import Settings
from app.errors import InvalidRequestError, LimitExceededError
from app.pipeline import Prediction

SERVER_NAME = "midserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "midserve_tta"

IMAGE_INPUT = "image"
PROBABILITIES = "probabilities"
# per-image extras: name -> (datatype, what it holds)
EXTRAS = {
    "views": ("INT32", "views run"),
    "view_equivalents": ("FP32", "compute: the views' pixels over one view at the input size"),
    "agreement": ("FP32", "share of the views whose own top-1 is the answer"),
    "stages_run": ("INT32", "stages of a staged policy that ran (1 for a plain one)"),
    "answered_by": ("BYTES", "the models whose views the answer averages, '+'-joined"),
}
REQUEST_PARAMS = ("views", "crops", "level", "top_k", "seed", "label")


def metadata_tensors(num_classes: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as model metadata lists them; -1: a variable dimension."""
    inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    outputs = [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]}]
    outputs += [{"name": n, "datatype": t, "shape": [-1]} for n, (t, _) in EXTRAS.items()]
    return inputs, outputs


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


def classify_call(
    body: InferRequestBody, settings: Settings, counts: dict[str, int]
) -> ClassifyCall:
    """The images and the parameters midserve knows (others ignored), typed as sent;
    ``top_k`` is raised to the largest classification count asked for (``counts``)."""
    images = image_elements(body, settings)
    params: dict[str, Any] = {k: v for k, v in body.parameters.items() if k in REQUEST_PARAMS}
    wanted = max(counts.values(), default=0)
    if wanted:
        given = params.get("top_k")
        if isinstance(given, str) and given.strip().isdigit():
            given = int(given)
        if given is None or (isinstance(given, int) and not isinstance(given, bool)):
            params["top_k"] = max(wanted, given or 0)
    return ClassifyCall(images, params)


async def infer(
    edge: Edge,
    model: str,
    version: str | None,
    protocol: Protocol,
    parse: Callable[[], Awaitable[InferRequestBody]],
) -> tuple[InferRequestBody, list[OutputTensor]]:
    """One inference, as both transports run it: ``parse()`` the body inside the request's
    metrics record (a bad body counts with its status), the outputs asked for checked
    before any work, the edge's classify (where any image's error fails the request: a
    tensor has no holes), the predictions as those outputs. Domain errors raise."""
    asked: list[tuple[InferRequestBody, list[str], dict[str, int]]] = []

    async def read() -> ClassifyCall:
        body = await parse()
        wanted, counts = requested_outputs(body), classification_counts(body)
        asked.append((body, wanted, counts))
        return classify_call(body, edge.settings, counts)

    done = await edge.classify(model, version, protocol, read)
    body, wanted, counts = asked[0]
    preds = [o for o in done.outcomes if isinstance(o, Prediction)]  # all of them, here
    return body, output_tensors(preds, wanted, counts)


def model_metadata(edge: Edge, model: str, version: str | None) -> dict[str, Any]:
    cfg = edge.config(model, version)
    inputs, outputs = metadata_tensors(cfg.num_classes)
    return {
        "name": model,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


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
            if datatype == "BYTES":
                joined = ["+".join(p.answered_by).encode() for p in preds]
                out.append(OutputTensor(name, datatype, [n], joined))
                continue
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
