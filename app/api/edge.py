"""The one contract every protocol's edge calls: /v1 JSON, the Open Inference Protocol over
REST and over gRPC are codecs around it (bytes -> ``ClassifyCall``, ``Classified`` ->
bytes), so tokens, model lookup and readiness, health, the metrics record, the deadline,
the parameters' validation and the status of an error cannot drift between them.

Statuses live in ``api/errors.py`` (one table, a column per protocol); the codecs pick
their column. Nothing in here knows a wire format.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from app.api.errors import UnauthorizedError, error_status
from app.api.params import ClassifyParams, parse_classify_params
from app.config import Settings
from app.errors import MidserveError, UnknownModelError
from app.model_config import ModelConfig
from app.serving.models import ModelSlot
from app.serving.service import ClassifyService, Outcome

Protocol = Literal["v1", "v2", "grpc"]
MODEL_VERSION = "1"  # a model folder is one version


@dataclass
class ClassifyCall:
    """What a codec read off the wire: the encoded images and the classify parameters by
    name (/v1's raw text as lists of strings, or the protocol's typed values)."""

    images: list[bytes]
    params: Mapping[str, Any]
    files: list[str | None] = field(default_factory=list)  # /v1's upload names


@dataclass
class Classified:
    """One request's answer, for a codec to render: an outcome per image, in order."""

    model: str
    call: ClassifyCall
    params: ClassifyParams
    outcomes: list[Outcome]
    started: float  # perf_counter at arrival
    status: int = 200  # /v1: when every image failed, the first failure's status

    @property
    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000.0, 3)


@dataclass(frozen=True)
class Health:
    """What every liveness and readiness probe of every protocol answers from."""

    unrecovered: dict[str, str]  # models past their recovery limit, and why
    models: dict[str, dict[str, str]]  # every served model's state (and why, if not ready)

    @property
    def live(self) -> bool:
        """Alive unless a model stayed out of readiness past its recovery limit (only a
        restart brings it back); loading and failed-to-load models do not fail it."""
        return not self.unrecovered

    @property
    def ready(self) -> bool:
        """Every served model loaded, warm and not recovering."""
        return bool(self.models) and all(m["state"] == "ready" for m in self.models.values())


class Edge:
    """The service as every protocol sees it."""

    def __init__(self, service: ClassifyService, tokens: list[str]) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self.tokens = tokens

    # -- tokens ------------------------------------------------------------------------
    def authorize(self, authorization: str) -> None:
        """``authorization`` (``Bearer <token>``, the REST header or the gRPC metadata)
        against the tokens, in constant time over every token; none configured: open."""
        if not self.tokens:
            return
        scheme, _, given = authorization.partition(" ")
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(given.strip().encode(), token.encode())
        if scheme.lower() != "bearer" or not ok:
            raise UnauthorizedError("missing or invalid bearer token")

    def authorize_probe(self, authorization: str) -> None:
        """Probes (health, readiness, metrics) are open unless ``open_probes`` is false."""
        if not self.settings.open_probes:
            self.authorize(authorization)

    # -- health ------------------------------------------------------------------------
    def health(self) -> Health:
        return Health(self.service.unrecovered(), self.service.readiness())

    def model_health(self, model: str, version: str | None) -> tuple[bool, str]:
        """(ready, why not) of one model; an unknown model or version raises."""
        slot = self.slot(model, version)
        state, why = slot.health()
        return state == "ready", why or state

    # -- models ------------------------------------------------------------------------
    def slot(self, model: str, version: str | None = None) -> ModelSlot:
        """The served model by name (and version: each model folder is version 1)."""
        slot = self.service.slot(model)
        if version and version != MODEL_VERSION:
            raise UnknownModelError(f"{model} version {version}", [f"{model} version 1"])
        return slot

    def config(self, model: str, version: str | None = None) -> ModelConfig:
        """The model's config, loaded or not."""
        slot = self.slot(model, version)
        return self.service.repository.config(slot.name) if slot.engine is None else slot.engine.cfg

    # -- classify ----------------------------------------------------------------------
    async def classify(
        self,
        model: str,
        version: str | None,
        protocol: Protocol,
        read: Callable[[], Awaitable[ClassifyCall]],
    ) -> Classified:
        """One classify request: the model ready, then within its metrics record
        ``read()`` (a bad body counts as a request with its status), the parameters
        validated, every image through the service before the deadline. /v1 answers each
        image (an image's error is its own); the protocol's tensors have no holes, so there
        the first image that failed fails the request. Domain errors raise."""
        started = time.perf_counter()
        slot = self.slot(model, version)
        pipeline, _ = slot.ready()
        engine = pipeline.engine
        with self.service.observed(slot.name) as record:
            try:
                call = await read()
                params = parse_classify_params(
                    call.params, engine.cfg, engine.model.labels, self.settings,
                    len(call.images),
                )  # fmt: skip
                record.level = params.request.level
                outcomes = await self.service.classify(
                    slot, call.images, params.request, params.labels,
                    started + self.settings.request_timeout_s,
                )  # fmt: skip
                failed = [o for o in outcomes if isinstance(o, MidserveError)]
                if failed and protocol != "v1":
                    raise failed[0]
            except MidserveError as exc:
                record.error, record.status = exc, status_in(exc, protocol)
                raise
            status = status_in(failed[0], protocol) if len(failed) == len(outcomes) else 200
            record.status = status
        return Classified(slot.name, call, params, outcomes, started, status)


def status_in(exc: MidserveError, protocol: Protocol) -> int:
    """The HTTP status a request failing with ``exc`` counts with in the metrics (gRPC is
    counted with the REST protocol's)."""
    row = error_status(exc)
    return row.v1 if protocol == "v1" else row.v2
