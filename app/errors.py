"""Domain errors. Nothing here knows about HTTP: the API layer maps each ``kind`` to a
status code; the same ``kind`` labels the error metrics and the JSON error body."""

from __future__ import annotations


class MidserveError(Exception):
    """Base class of every error midserve raises on purpose."""

    kind = "internal_error"


class InvalidImageError(MidserveError):
    """The bytes are not an image we can decode (empty, truncated, unsupported format)."""

    kind = "invalid_image"


class ImageTooLargeError(MidserveError):
    """The image (or request body) is larger than a configured limit."""

    kind = "too_large"


class InvalidRequestError(MidserveError):
    """A request parameter is malformed or out of range (views spec, level, top_k, label...)."""

    kind = "invalid_request"


class LimitExceededError(InvalidRequestError):
    """A request asks for more than a configured limit allows (views, images)."""


class UnknownModelError(MidserveError):
    """A model name that is not in the model repository."""

    kind = "unknown_model"

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown model {name!r}; known models: {', '.join(self.known) or 'none'}")


class ModelConfigError(MidserveError):
    """A model.toml that cannot be read or is inconsistent."""


class ModelLoadError(MidserveError):
    """Weights could not be found or do not fit the architecture."""


class WeightsMismatchError(ModelLoadError):
    """A checkpoint whose tensors do not match the architecture one to one."""

    def __init__(self, missing: list[str], unexpected: list[str], shape: list[str]) -> None:
        self.missing, self.unexpected, self.shape = missing, unexpected, shape
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shape:
            parts.append(f"shape mismatches ({len(shape)}): {', '.join(shape[:20])}")
        super().__init__("weights do not match the architecture: " + "; ".join(parts))


class ModelNotReadyError(MidserveError):
    """The model exists but is still loading, or failed to load."""

    kind = "model_not_ready"


class OverloadedError(MidserveError):
    """The batch queue is full; the client should retry later."""

    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class DeadlineExceededError(MidserveError):
    """A request did not finish within its deadline."""

    kind = "deadline_exceeded"


class ForwardError(MidserveError):
    """A forward pass failed on the server's side (the model raised): not the client's fault,
    and not retried (a failure the inputs cause would fail again)."""

    kind = "forward_failed"


class ForwardStalledError(ForwardError):
    """A forward pass gave no result within the watchdog's limit; the model is recovering."""

    kind = "forward_stalled"


class ForwardOutOfMemoryError(ForwardError):
    """Out of memory even after splitting the batch down to one view."""

    kind = "out_of_memory"


class WorkerDiedError(ForwardError):
    """The forward worker died running this batch, and again on the one retry."""

    kind = "forward_worker_died"


class DataError(MidserveError):
    """A training or evaluation data folder that cannot be used (missing, empty, wrong classes)."""


class EvalResultsError(MidserveError):
    """An evaluation results file (eval.json, records) that cannot be read or does not match."""


class BackendUnavailableError(MidserveError):
    """A runtime backend that is not installed here, or that could not convert a model."""
