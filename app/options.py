"""How an engine runs a model: built once from ``Settings`` and passed to every caller.

Serving, ``classify``, ``evaluate``, ``finetune``'s checks and ``bench`` all build their
engine from one ``EngineOptions``, so an evaluation measures the numeric path the server
serves unless it is told otherwise. No torch in here: settings, parameters and errors
stay importable without it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Protocol

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[DtypeName, ...] = ("auto", "float32", "bfloat16", "float16")
BackendName = Literal["auto", "torch", "openvino"]


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bfloat16 convolutions run natively (oneDNN), not emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class EngineSettings(Protocol):
    """The fields of ``app.config.Settings`` an engine is built from; named here rather
    than imported, since Settings takes its dtype names from this module."""

    device: str
    dtype: DtypeName
    chunk_views: int
    compile: bool | None
    fuse: bool
    jpeg_draft: bool
    threads: int
    forward_workers: int
    warmup: bool
    max_pixels: int
    max_aspect_ratio: float
    backend: BackendName
    tune: bool
    tune_seconds: float
    tune_cache_dir: Any


@dataclass(frozen=True)
class DecodeLimits:
    """What an uploaded image may be before it is decoded in full."""

    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 16.0


@dataclass(frozen=True)
class ForwardPlan:
    """How forwards run: how many at once, threads each, views per forward, and the numeric
    path (dtype, runtime backend, torch.compile). The tuner (app/tuning.py) picks one per
    model; without it every model gets ``EngineOptions.forward_plan``."""

    workers: int
    threads: int
    chunk_views: int
    dtype: str = "float32"
    backend: str = "torch"
    compile: bool = False

    def describe(self) -> str:
        compiled = " compiled" if self.compile else ""
        return (
            f"{self.backend} {self.dtype}{compiled}, {self.workers}x{self.threads} threads, "
            f"{self.chunk_views} views/forward"
        )


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: DtypeName = "auto"  # auto: bfloat16 on CPUs with native bf16, else float32
    chunk_views: int = 0  # views per forward; 0 = the device's default (see forward_plan)
    compile: bool | None = None  # torch.compile the forward; None: off unless tuned so
    fuse: bool = True  # inference rewrites (app/fusion.py), checked against the original
    jpeg_draft: bool = False  # decode large JPEGs at reduced scale
    threads: int = 0  # intra-op threads per forward; 0 = cores / forward_workers
    forward_workers: int = 0  # forwards at once; 0 = 2 on a CPU with 2+ cores, else 1
    warmup: bool = True
    limits: DecodeLimits = DecodeLimits()
    backend: BackendName = "auto"  # torch | openvino; auto: the tuner picks (torch untuned)
    tune: bool = False  # time candidate plans at load (app/tuning.py); Settings turn it on
    tune_seconds: float = 5.0  # timing budget per model
    tune_cache_dir: str = ""  # "" = ~/.cache/midserve/tuning

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> EngineOptions:
        return cls(
            device=settings.device,
            dtype=settings.dtype,
            chunk_views=settings.chunk_views,
            compile=settings.compile,
            fuse=settings.fuse,
            jpeg_draft=settings.jpeg_draft,
            threads=settings.threads,
            forward_workers=settings.forward_workers,
            warmup=settings.warmup,
            limits=DecodeLimits(settings.max_pixels, settings.max_aspect_ratio),
            backend=settings.backend,
            tune=settings.tune,
            tune_seconds=settings.tune_seconds,
            tune_cache_dir=str(settings.tune_cache_dir or ""),
        )

    def with_changes(self, **changes: Any) -> EngineOptions:
        """A copy with some fields replaced; ``None`` values (unset CLI flags) are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def forward_plan(self, device_type: str, cores: int | None = None) -> ForwardPlan:
        """On a CPU with 2+ cores: two single-threaded forwards rather than one two-threaded
        one (about 1.3x the throughput on a 2-core VM, and no OpenMP barrier stalls when a
        decode thread or the event loop takes a core), with batches of up to 8 views (with
        the fused network 8 gave about 1.15x the HTTP throughput of 5; 10 or 16 less than 8).
        A lone request still uses both cores: the batcher gives each idle worker an even
        share of a short queue. GPUs: one forward, large chunks."""
        cores = cores or os.cpu_count() or 1
        dtype = self.default_dtype(device_type)
        backend = "torch" if self.backend == "auto" else self.backend
        compiled = bool(self.compile)
        if device_type != "cpu":
            workers, chunk = self.forward_workers or 1, self.chunk_views or 128
            return ForwardPlan(workers, self.threads, chunk, dtype, backend, compiled)
        workers = self.forward_workers or (2 if cores >= 2 else 1)
        threads = self.threads or max(1, cores // workers)
        return ForwardPlan(workers, threads, self.chunk_views or 8, dtype, backend, compiled)

    def default_dtype(self, device_type: str) -> str:
        """``auto``: bfloat16 on CPUs with native bf16 (measured on one Xeon: same top-1 as
        float32 on all 100 sample photos, max probability difference 0.04; other CPUs may
        differ, which is what tuning is for), float32 elsewhere; an explicit dtype is kept."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if device_type == "cpu" and cpu_has_native_bf16() else "float32"

    def fixed(self) -> dict[str, Any]:
        """The plan dimensions a setting forces; the tuner leaves them alone."""
        out: dict[str, Any] = {}
        if self.dtype != "auto":
            out["dtype"] = self.dtype
        if self.backend != "auto":
            out["backend"] = self.backend
        if self.compile is not None:
            out["compile"] = self.compile
        if self.chunk_views:
            out["chunk_views"] = self.chunk_views
        if self.forward_workers:
            out["workers"] = self.forward_workers
        if self.threads:
            out["threads"] = self.threads
        return out
