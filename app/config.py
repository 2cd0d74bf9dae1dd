"""Server and engine settings (environment variables with the prefix ``MIDSERVE_``).

No import-time singleton: ``get_settings()`` is cached and tests override it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.options import BackendName, DtypeName

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


def default_models_dir() -> Path:
    """The ``models/`` folder beside the package (a source checkout), else ./models."""
    beside = Path(__file__).resolve().parent.parent / "models"
    return beside if beside.is_dir() else Path.cwd() / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIDSERVE_", env_file=None, extra="ignore")

    # models and devices
    models_dir: Path = Field(default_factory=default_models_dir)
    models: list[str] = ["tf_efficientnet_lite0"]  # names, or ["all"] for every available
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: DtypeName = "auto"  # auto (bfloat16 on CPUs with native bf16, else float32) | ...
    chunk_views: int = 0  # views per forward chunk; 0 = per-device default
    compile: bool | None = None  # torch.compile the forward; unset: tuned (off unless budget)
    fuse: bool = True  # fold batch norms, static SAME padding (app/fusion.py); checked at load
    jpeg_draft: bool = False  # decode large JPEGs at reduced scale (bench/jpeg_draft.py)
    threads: int = 0  # torch intra-op threads per forward; 0 = cores / forward_workers
    forward_workers: int = 0  # forwards running at once; 0 = 2 on a CPU with 2+ cores, else 1
    warmup: bool = True
    # tuning at load (app/tuning.py): each of dtype, chunk_views, forward_workers, threads,
    # compile and backend set above is kept; the others are timed on this machine
    tune: bool = True
    tune_seconds: float = Field(default=5.0, ge=0)  # timing budget per model
    tune_cache_dir: Path | None = None  # default ~/.cache/midserve/tuning
    backend: BackendName = "auto"  # auto | torch | openvino (pip install 'midserve[openvino]')

    # request limits
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 16.0
    max_images_per_request: int = 16
    max_views_per_request: int = 64
    max_top_k: int = 100

    # batching and backpressure
    max_batch_views: int = 0  # views per forward across requests; 0 = chunk_views
    max_wait_ms: float = 2.0
    max_queue_views: int = 512
    request_timeout_s: float = 30.0
    preprocess_workers: int = 2
    body_read_timeout_s: float = 15.0  # per body chunk; ends slow-loris uploads
    body_min_rate_bytes_s: float = 50_000.0  # whole body: read_timeout + 1 s per this many bytes

    # security
    auth_tokens: list[str] = []
    auth_tokens_file: Path | None = None
    open_probes: bool = True  # /metrics, /healthz, /readyz need no token

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """Fail at start-up, not at model load, on a device torch would not parse."""
        if not DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
