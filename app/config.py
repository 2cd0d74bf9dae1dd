"""Server and engine settings (environment variables with the prefix ``MIDSERVE_``).

No import-time singleton: ``get_settings()`` is cached and tests override it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.runtime.plan import EngineOptions


def default_models_dir() -> Path:
    """The ``models/`` folder beside the package (a source checkout), else ./models."""
    beside = Path(__file__).resolve().parent.parent / "models"
    return beside if beside.is_dir() else Path.cwd() / "models"


class Settings(BaseSettings, EngineOptions):
    """Every setting, each declared once: the engine's (device, dtype, plan knobs, tuning,
    decode limits) are inherited from ``EngineOptions``; the server's are below."""

    model_config = SettingsConfigDict(
        env_prefix="MIDSERVE_", env_file=None, extra="ignore", frozen=True
    )

    models_dir: Path = Field(default_factory=default_models_dir)
    models: list[str] = ["tf_efficientnet_lite0"]  # names, or ["all"] for every available

    # request limits
    max_body_bytes: int = 20 * 1024 * 1024
    # request-body bytes held at once by every request in flight (0: no bound): 256 MiB is a
    # dozen 20 MiB bodies, more than the decode workers take at a time; past it an upload
    # is refused with 503 + Retry-After instead of piling up memory. At least max_body_bytes.
    max_inflight_body_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    max_images_per_request: int = 16
    max_views_per_request: int = 64
    max_top_k: int = 100

    # batching and backpressure
    max_batch_views: int | None = Field(default=None, ge=1)  # views a forward; unset: chunk
    max_wait_ms: float = 2.0
    max_queue_views: int = 512
    request_timeout_s: float = 30.0
    preprocess_workers: int = 2
    forward_timeout_s: float = Field(default=30.0, ge=0)  # watchdog on one forward; 0: off
    # a model out of readiness after a stalled forward this long (its probe forward not
    # answered) fails liveness (/healthz, /v2/health/live: 503) so an orchestrator restarts
    # the process; 0: never
    recovery_limit_s: float = Field(default=120.0, ge=0)
    body_read_timeout_s: float = 15.0  # per body chunk; ends slow-loris uploads
    body_min_rate_bytes_s: float = 50_000.0  # whole body: read_timeout + 1 s per this many bytes

    # the Open Inference Protocol over gRPC, on its own port (0: off); needs tritonclient[grpc]
    grpc_port: int = Field(default=0, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    # tests and drills only: faults injected into the forward (app/faults.py); never set
    # in production, and no request can change it
    fault_injection: str = ""

    # connections, at the HTTP protocol (app/api/http_protocol.py): a request's line and
    # headers must arrive within this, from the connection's start or the previous response
    # (0: off); requests while more connections are open get 503 too_many_connections
    header_read_timeout_s: float = Field(default=10.0, ge=0)
    max_connections: int = Field(default=1000, ge=1)

    # security
    auth_tokens: list[str] = []
    auth_tokens_file: Path | None = None
    open_probes: bool = True  # /metrics, /healthz, /readyz need no token
    # /docs, /redoc and /openapi.json need the token when tokens are set, unless this is true
    public_docs: bool = False

    @field_validator("max_batch_views", mode="before")
    @classmethod
    def _unset_server(cls, value: Any) -> Any:
        return EngineOptions._unset(value)

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
