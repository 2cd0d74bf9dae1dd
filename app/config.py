"""Server and engine settings (environment variables with the prefix ``MIDSERVE_``).

No import-time singleton: ``get_settings()`` is cached and tests override it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.runtime.plan import ServedOptions


def default_models_dir() -> Path:
    """The ``models/`` folder beside the package (a source checkout), else ./models."""
    beside = Path(__file__).resolve().parent.parent / "models"
    return beside if beside.is_dir() else Path.cwd() / "models"


class Settings(BaseSettings, ServedOptions):
    """Every setting, each declared once: the engine's (device, dtype, plan knobs, tuning,
    decode limits) are inherited from ``ServedOptions``; the server's are below."""

    model_config = SettingsConfigDict(
        env_prefix="MIDSERVE_", env_file=None, extra="ignore", frozen=True
    )

    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="The model repository: one folder per model, each with its model.toml.",
        json_schema_extra={"scope": "all"},
    )
    models: list[str] = Field(
        default=["tf_efficientnet_lite0"],
        description='The models to serve: repository names, or `["all"]` for every available one.',
    )

    # request limits
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024,
        description="Largest request body; a declared Content-Length over it is refused before "
        "reading, a chunked body as it streams (413).",
    )
    max_inflight_body_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Request-body bytes held at once by every request in flight (0: no bound): "
        "256 MiB is a dozen 20 MiB bodies, more than the decode workers take at a time; past "
        "it an upload is refused with 503 + Retry-After instead of piling up memory. At least "
        "`MAX_BODY_BYTES` (checked at start-up).",
    )
    max_images_per_request: int = Field(
        default=16, description="Images in one request; more are refused (422)."
    )
    max_views_per_request: int = Field(
        default=64,
        description="Views a request may ask for per image, bounding both their count and "
        "their view-equivalents; more are refused (422).",
    )
    max_top_k: int = Field(
        default=100,
        description="Largest `top_k` a request may ask for; never above the model's class count.",
    )

    # batching and backpressure
    max_batch_views: int | None = Field(
        default=None,
        ge=1,
        description="View-equivalents in one forward, gathered across requests. Unset: the "
        "served plan's `CHUNK_VIEWS`.",
    )
    max_wait_ms: float = Field(
        default=2.0,
        description="How long the batcher waits for more views while a forward's batch is "
        "not full; 0: run what is there.",
    )
    max_queue_views: int = Field(
        default=512,
        description="View-equivalents waiting for a forward, per model; past it a request is "
        "refused at once with 503 + Retry-After.",
    )
    request_timeout_s: float = Field(
        default=30.0,
        description="A request's deadline, from arrival to answer; past it the client gets "
        "504 and its queued views are dropped, not run.",
    )
    preprocess_workers: int = Field(
        default=2, description="Threads that decode images and cut their views."
    )
    forward_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="Watchdog on one forward: a forward running longer fails its batch (503) "
        "and takes the model out of readiness until a probe forward answers; 0: off.",
    )
    recovery_limit_s: float = Field(
        default=120.0,
        ge=0,
        description="A model out of readiness after a stalled forward this long (its probe "
        "forward not answered) fails liveness (/healthz, /v2/health/live: 503) so an "
        "orchestrator restarts the process; 0: never.",
    )
    body_read_timeout_s: float = Field(
        default=15.0,
        description="Longest wait for each chunk of a request body; ends slow-loris uploads (408).",
    )
    body_min_rate_bytes_s: float = Field(
        default=50_000.0,
        description="The whole body must arrive within `BODY_READ_TIMEOUT_S` + 1 s per this "
        "many bytes (408).",
    )

    # the Open Inference Protocol over gRPC, on its own port
    grpc_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Serve the Open Inference Protocol's `inference.GRPCInferenceService` on "
        "this port, the token in the `authorization` metadata; needs `pip install "
        "'midserve[grpc]'`. 0: off.",
    )
    grpc_host: str = Field(
        default="127.0.0.1",
        description="The address the gRPC port listens on (`0.0.0.0`: every interface, as a "
        "container needs).",
    )
    fault_injection: str = Field(
        default="",
        description="Tests and drills only: faults injected into the forward (`raise@N`, "
        "`hang@N[:S]`, `die@N`, `oom>V`) or the model's load (`hangload[:S]`; "
        "app/serving/faults.py), read once at start-up; never set in production, and no "
        "request can change it.",
    )

    # connections, at the HTTP protocol (app/api/http_protocol.py)
    header_read_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="A request's line and headers must arrive within this, from the "
        "connection's start or the previous response (408 for a partial request, a silent "
        "close for an idle connection); 0: off.",
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Open connections past which a request gets 503 `too_many_connections`.",
    )

    # security
    auth_tokens: list[str] = Field(
        default=[],
        description="Bearer tokens accepted on the classify and model endpoints (constant-time "
        "comparison); none: no authentication.",
        json_schema_extra={"secret": True},
    )
    auth_tokens_file: Path | None = Field(
        default=None,
        description="A file of more tokens, one a line (`#` starts a comment line), read at "
        "start-up.",
    )
    open_probes: bool = Field(
        default=True, description="/metrics, /healthz and /readyz need no token."
    )
    public_docs: bool = Field(
        default=False,
        description="/docs, /redoc and /openapi.json need no token even when tokens are set.",
    )

    @field_validator("max_batch_views", mode="before")
    @classmethod
    def _unset_server(cls, value: Any) -> Any:
        return ServedOptions._unset(value)

    @model_validator(mode="after")
    def _body_fits_the_inflight_bound(self) -> Settings:
        # a body over the bound could never be admitted: 503 "retry later" would be a lie
        bound = self.max_inflight_body_bytes
        if bound and self.max_body_bytes > bound:
            raise ValueError(
                f"MIDSERVE_MAX_BODY_BYTES ({self.max_body_bytes}) is over "
                f"MIDSERVE_MAX_INFLIGHT_BODY_BYTES ({bound}): such a body could never be "
                "admitted; raise the bound, lower the body limit, or set the bound to 0 (off)"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
