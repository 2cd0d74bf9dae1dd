"""How an engine runs a model: ``EngineOptions`` (what settings ask for) and ``ForwardPlan``
(what a forward then does).

Each engine setting is declared once, here: ``app.config.Settings`` inherits these fields
(so each is also a ``MIDSERVE_*`` variable), and serving, ``classify``, ``evaluate``,
``finetune``'s checks and ``bench`` all build their engine from one ``EngineOptions``, so an
evaluation measures the numeric path the server serves unless it is told otherwise.

A knob left unset is ``None``: it is chosen at load (by the tuner, or by
``EngineOptions.forward_plan``'s defaults for this machine). The older spellings of unset
(``auto``, ``0``, an empty string) are read as ``None``. No torch in here: settings and
parameters stay importable without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.runtime.machine import cores, cpu_has_native_bf16
from app.tta.limits import DecodeLimits

DtypeName = Literal["float32", "bfloat16", "float16", "int8"]
DTYPE_NAMES: tuple[DtypeName, ...] = ("float32", "bfloat16", "float16", "int8")
BackendName = Literal["torch", "openvino"]
DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d{1,2})?)$")
UNSET_SPELLINGS = ("auto", "0", "", 0)

# the defaults a plan falls back to where the tuner does not run (measured on one Xeon;
# the tuner re-measures them on every machine)
CPU_CHUNK_VIEWS = 8
GPU_CHUNK_VIEWS = 128


@dataclass(frozen=True)
class ForwardPlan:
    """How forwards run: how many at once, threads each, views per forward, and the numeric
    path (dtype, runtime backend, torch.compile). The tuner (app/runtime/tuning/) picks one
    per model; without it every model gets ``EngineOptions.forward_plan``."""

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


class ServedOptions(BaseModel):
    """Where and how a model runs, as an operator sets it (``app.config.Settings`` inherits
    these). ``None``: chosen at load for this machine."""

    model_config = ConfigDict(frozen=True)

    device: str | None = Field(
        default=None,
        description="Where models run: `cpu`, `mps`, `cuda` or `cuda:N`. Unset (or `auto`): "
        "CUDA when torch sees a GPU, else the CPU.",
    )
    dtype: DtypeName | None = Field(
        default=None,
        description="The forward's numbers: float32, bfloat16 or float16 (autocast), or int8 "
        "(the entry's quantized network, on OpenVINO). Unset: tuned (int8 where the CPU has "
        "VNNI/AMX and the entry has a quantized network that agrees); untuned: bfloat16 on "
        "CPUs with native bf16, else float32.",
    )
    backend: BackendName | None = Field(
        default=None,
        description="The runtime that runs the network: `torch` or `openvino` (`pip install "
        "'midserve[openvino]'`; `make install` and the image include it). A model with "
        "batch-norm sets, or whose conversion fails, runs on torch. Unset: tuned; untuned: "
        "torch (openvino for int8).",
    )
    compile: bool | None = Field(
        default=None,
        description="`torch.compile` the forward. Unset: tuned, tried only when `TUNE_SECONDS` "
        "is at least 120 (its warm-up is 15-30 s a shape on a small CPU); untuned: off.",
    )
    chunk_views: int | None = Field(
        default=None,
        ge=1,
        description="Views per forward. Unset: tuned among 4, 8, 16 on a CPU (32, 64, 128 on "
        "a GPU); untuned: 8 on a CPU, 128 on a GPU.",
    )
    forward_workers: int | None = Field(
        default=None,
        ge=1,
        description="Forwards run at once. Unset: tuned (1 x all cores or 2 x half of them on "
        "a CPU); untuned: 2 on a CPU with 2+ cores, else 1.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads per forward. Unset: tuned; untuned: cores / "
        "forward_workers. In a container, match the CPU limit.",
    )
    fuse: bool = Field(
        default=True,
        description="Serve the network rewritten for inference (app/runtime/fusion.py): batch "
        "norms folded, TF SAME padding made static and, on a CPU, each activation fused into "
        "its convolution; checked against the original at load, which is served if they differ.",
    )
    int8: bool = Field(
        default=True,
        description="Offer the entry's int8 network (written by `midserve quantize`) to the "
        "tuner, which serves it only where the CPU has VNNI or AMX, it keeps float32's answers "
        "on held-out photos and it is faster (docs/benchmarks.md).",
    )
    warmup: bool = Field(
        default=True,
        description="Run one full chunk of views through each model at load, before it is "
        "ready, so the first request pays no set-up.",
    )
    max_pixels: int = Field(
        default=DecodeLimits.max_pixels,
        ge=1,
        description="Largest image, width x height, read from its header before decoding; "
        "larger ones (decompression bombs too) are refused as too large (413).",
    )
    max_aspect_ratio: float = Field(
        default=DecodeLimits.max_aspect_ratio,
        gt=0,
        description="Longest over shortest side; a more elongated image is refused as invalid "
        "(422): crop it first.",
    )
    # tuning at load (app/runtime/tuning/): every plan knob set above is kept, the others
    # are timed on this machine within the budget and the result cached on disk
    tune: bool = Field(
        default=True,
        description="At load, time candidate plans for the knobs left unset (dtype, backend, "
        "compile, chunk_views, forward_workers x threads) with the concurrency they would "
        "serve with, and serve the fastest whose outputs agree with the plain float32 network "
        "on fixed probes; the untuned default stays unless beaten by more than 5 %. What was "
        "tried: `GET /v1/models/{name}` (`tuning`), the log, `midserve_forward_plan_info`. "
        "false: serve exactly the plan the settings describe.",
    )
    tune_seconds: float = Field(
        default=5.0, ge=0, description="Timing budget per model at load, in seconds."
    )
    tune_cache_dir: Path | None = Field(
        default=None,
        description="Tuned plans and converted OpenVINO models, keyed by CPU/GPU model, "
        "cores, torch version, model weights and candidate space, so a restart does not tune "
        "again. Unset: `$XDG_CACHE_HOME/midserve/tuning` (`~/.cache/midserve/tuning`).",
    )

    @field_validator(
        "device", "dtype", "backend", "chunk_views", "forward_workers", "threads",
        "tune_cache_dir", mode="before",
    )  # fmt: skip
    @classmethod
    def _unset(cls, value: Any) -> Any:
        """One spelling of unset: the older ``auto`` / ``0`` / empty read as None."""
        return None if value in UNSET_SPELLINGS else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        """Fail at start-up, not at model load, on a device torch would not parse."""
        if value is not None and not DEVICE_RE.match(value):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
        return value

    @classmethod
    def from_settings(cls, settings: ServedOptions) -> Self:
        """Just the engine's fields of ``app.config.Settings`` (which inherits them); the
        code paths only the bench switches keep their defaults."""
        return cls.model_validate(settings.model_dump(include=set(cls.model_fields)))

    def with_changes(self, **changes: Any) -> Self:
        """A validated copy with some fields replaced; ``None`` values (unset CLI flags)
        are ignored."""
        given = {k: v for k, v in changes.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given})

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_pixels, self.max_aspect_ratio)

    def forward_plan(self, device_type: str) -> ForwardPlan:
        """On a CPU with 2+ cores: two single-threaded forwards rather than one two-threaded
        one (about 1.3x the throughput on a 2-core VM, and no OpenMP barrier stalls when a
        decode thread or the event loop takes a core), with batches of up to 8 views (with
        the fused network 8 gave about 1.15x the HTTP throughput of 5; 10 or 16 less than 8).
        A lone request still uses both cores: the batcher gives each idle worker an even
        share of a short queue. GPUs: one forward, large chunks. Set knobs are kept."""
        dtype = self.default_dtype(device_type)
        backend = self.backend or ("openvino" if dtype == "int8" else "torch")
        compiled = bool(self.compile)
        if device_type != "cpu":
            workers, chunk = self.forward_workers or 1, self.chunk_views or GPU_CHUNK_VIEWS
            return ForwardPlan(workers, self.threads or 0, chunk, dtype, backend, compiled)
        n = cores()
        workers = self.forward_workers or (2 if n >= 2 else 1)
        threads = self.threads or max(1, n // workers)
        chunk = self.chunk_views or CPU_CHUNK_VIEWS
        return ForwardPlan(workers, threads, chunk, dtype, backend, compiled)

    def default_dtype(self, device_type: str) -> str:
        """Unset: bfloat16 on CPUs with native bf16 (measured on one Xeon: same top-1 as
        float32 on all 100 sample photos, max probability difference 0.04; other CPUs may
        differ, which is what tuning is for), float32 elsewhere; a set dtype is kept."""
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if device_type == "cpu" and cpu_has_native_bf16() else "float32"

    def fixed(self) -> dict[str, Any]:
        """The plan dimensions a setting forces (as ``ForwardPlan`` names them); the tuner
        leaves them alone."""
        knobs = {
            "dtype": self.dtype,
            "backend": self.backend,
            "compile": self.compile,
            "chunk_views": self.chunk_views,
            "workers": self.forward_workers,
            "threads": self.threads,
        }
        return {k: v for k, v in knobs.items() if v is not None}


class EngineOptions(ServedOptions):
    """The served options, and two older preparation paths that are no operator's choice:
    the bench (``midserve bench --ceiling``), studies and tests switch them off to measure
    what the served paths save."""

    jpeg_draft: bool = Field(
        default=True,
        description="Decode a large JPEG at 1/2-1/8 scale, keeping at least twice the largest "
        "resize the request's views ask for (12-megapixel uploads: 4.8x the images/s, "
        "`midserve bench --ceiling`).",
    )
    uint8_views: bool = Field(
        default=True,
        description="Resize only the boxes views cover, cut them as uint8 and normalise in "
        "the forward; false: the older path (whole image, float32 on the host).",
    )
