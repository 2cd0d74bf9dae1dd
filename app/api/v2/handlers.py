"""What REST and gRPC share: model lookup by name and version, model metadata, and one
inference from a parsed request to output tensors, through the same service as /v1."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.api.errors import classify_error
from app.api.v2.infer import (
    classification_counts,
    classify_params,
    image_elements,
    metadata_tensors,
    output_tensors,
    requested_outputs,
)
from app.api.v2.tensors import InferRequestBody, OutputTensor
from app.errors import LimitExceededError, MidserveError, UnknownModelError
from app.pipeline import Prediction
from app.service import ClassifyService, ModelSlot

SERVER_NAME = "midserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification"]
MODEL_VERSION = "1"  # a model folder is one version
PLATFORM = "midserve_tta"


# bad input is 400 in this protocol (422 on /v1); the other kinds keep /v1's status
V2_STATUS = {"invalid_request": 400, "invalid_image": 400, "unsupported_media_type": 400}


def v2_status(exc: MidserveError) -> int:
    """The HTTP status of a domain error in this protocol (gRPC maps from it)."""
    status, kind = classify_error(exc)
    return 413 if isinstance(exc, LimitExceededError) else V2_STATUS.get(kind, status)


def model_slot(service: ClassifyService, model: str, version: str | None) -> ModelSlot:
    slot = service.slot(model)
    if version and version != MODEL_VERSION:
        raise UnknownModelError(f"{model} version {version}", [f"{model} version 1"])
    return slot


def model_metadata(service: ClassifyService, model: str, version: str | None) -> dict[str, Any]:
    slot = model_slot(service, model, version)
    cfg = service.repository.config(slot.name) if slot.engine is None else slot.engine.cfg
    inputs, outputs = metadata_tensors(cfg.num_classes)
    return {
        "name": slot.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


async def infer(
    service: ClassifyService,
    model: str,
    version: str | None,
    parse: Callable[[], InferRequestBody],
    status_of: Callable[[MidserveError], int],
) -> tuple[InferRequestBody, list[OutputTensor]]:
    """One request, from ``parse()`` (run inside the metrics record, so a bad body counts
    as a request with its status) to its outputs; domain errors raise."""
    started = time.perf_counter()
    settings = service.settings
    slot = model_slot(service, model, version)
    pipeline, _ = slot.ready()
    engine = pipeline.engine
    with service.observed(slot.name) as record:
        try:
            body = parse()
            wanted = requested_outputs(body)
            counts = classification_counts(body)
            images = image_elements(body, settings)
            params = classify_params(
                body, engine.cfg, engine.model.labels, settings, len(images),
                max(counts.values(), default=0),
            )  # fmt: skip
            record.level = params.request.level
            outcomes = await service.classify(
                slot, images, params.request, params.labels, started + settings.request_timeout_s
            )
            preds: list[Prediction] = []
            for outcome in outcomes:
                if isinstance(outcome, MidserveError):  # a tensor has no holes: the request fails
                    raise outcome
                preds.append(outcome)
            outputs = output_tensors(preds, wanted, counts)
        except MidserveError as exc:
            record.error, record.status = exc, status_of(exc)
            raise
        record.status = 200
    return body, outputs
