"""One model on one device: stacks of views in, per-view features and logits out.

The engine owns the numeric path (device, dtype, runtime backend, inference rewrites,
batch-norm sets, chunking, compile), run by a ``ForwardPlan``. It knows nothing of requests
or answers: ``app/pipeline.py`` owns everything around it (decode, views, averaging,
top-k). ``app/runtime/load.py`` is the one way a model becomes an engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.errors import BackendUnavailableError, InvalidRequestError
from app.model_config import ModelConfig
from app.repository import LoadedModel
from app.runtime.backends import OpenVinoForward, build_backend
from app.runtime.bn_sets import nearest_resolution, with_bn_set
from app.runtime.fusion import FusionReport, fuse_for_inference
from app.runtime.plan import EngineOptions, ForwardPlan
from app.tta.preprocess import ViewGroup, normalise

# int8: the quantized network runs in OpenVINO (app/runtime/int8.py); what stays in torch
# (the head on averaged features) runs in float32
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.float32,
}


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device; unset (or ``auto``): CUDA when there is one, else the CPU."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class ViewOutputs:
    """Per-view network outputs (rows in view order)."""

    features: torch.Tensor  # [N, D]
    logits: torch.Tensor  # [N, C]

    @classmethod
    def concat(cls, parts: list[ViewOutputs]) -> ViewOutputs:
        """Outputs of consecutive runs (the stages of a staged policy), in run order."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.features for p in parts]), torch.cat([p.logits for p in parts]))

    @classmethod
    def in_view_order(cls, parts: list[tuple[list[int], ViewOutputs]]) -> ViewOutputs:
        """Outputs of view groups (each with its views' positions) back in view order."""
        if len(parts) == 1:
            return parts[0][1]
        order = torch.tensor([i for idx, _ in parts for i in idx])
        rows = torch.empty_like(order)
        rows[order] = torch.arange(len(order))
        features = torch.cat([out.features for _, out in parts])[rows]
        logits = torch.cat([out.logits for _, out in parts])[rows]
        return cls(features, logits)


class Engine:
    """One model on one device, built from ``EngineOptions`` and run by a ``ForwardPlan``
    (the options' defaults, or the plan the tuner chose for this machine)."""

    def __init__(
        self,
        model: LoadedModel,
        options: EngineOptions | None = None,
        plan: ForwardPlan | None = None,
    ) -> None:
        options = options or EngineOptions()
        plan = plan or options.forward_plan(model.device.type)
        dtype = plan.dtype
        if dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be auto or one of {', '.join(DTYPES)}")
        self.options = options
        self.tuning: Any = (
            None  # the TuningReport when the plan was tuned (app/runtime/tuning/tuner.py)
        )
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        # one network per batch-norm set (the model's own at its input size): views run with
        # the set nearest their shorter side (app/runtime/bn_sets.py)
        networks = {model.cfg.input_size: model.network}
        for size, rel in sorted(model.cfg.bn_sets.items()):
            folder = model.cfg.folder or Path(".")
            networks[size] = with_bn_set(model.network, folder / rel).eval()
        # batch norms folded, SAME paddings static, activations fused: about 2.2x the
        # end-to-end throughput on CPU (app/runtime/fusion.py, `midserve bench` fusion_speedup); the
        # caller's network is left as it is (fine-tuning trains its batch norms)
        self.fusion: FusionReport | None = None
        # another runtime runs the whole forward (app/runtime/backends.py); torch keeps the head
        self._backend: OpenVinoForward | None = None
        if plan.backend != "torch":
            self._backend = build_backend(model, plan, len(networks) > 1, options)
            if self._backend is None:
                plan = dataclasses.replace(plan, backend="torch")
        if dtype == "int8" and self._backend is None:
            raise BackendUnavailableError(
                "int8 runs on the openvino backend only, from a model quantized by "
                "midserve quantize"
            )
        if options.fuse and self._backend is None:
            for size, network in networks.items():
                networks[size], report = fuse_for_inference(network, size, self.dtype)
                if size == model.cfg.input_size:
                    self.fusion = report
        self.variants = {
            size: dataclasses.replace(model, network=network) for size, network in networks.items()
        }
        self.model = self.variants[model.cfg.input_size]
        self.device = model.device
        # uint8 views (the served path) are normalised here, in the forward's thread
        self._mean = torch.tensor(model.cfg.mean).mul(255.0).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(model.cfg.std).mul(255.0).view(1, 3, 1, 1).to(self.device)
        self.plan = plan
        self.chunk_views = plan.chunk_views
        # torch.compile'd forward (opt-in): one static shape, so partial chunks are padded
        # to chunk_views and compiled once, at warm-up rather than on a request.
        compiled = plan.compile and self._backend is None
        self._compiled: Any = torch.compile(self._forward, dynamic=False) if compiled else None

    def apply(self, plan: ForwardPlan) -> None:
        """Run by another plan of the same numeric path (workers, threads, chunk size)."""
        if self._backend is not None:
            self._backend.configure(plan.workers, plan.threads)
        self.plan = dataclasses.replace(
            plan, dtype=self.dtype_name, backend=self.plan.backend, compile=self.plan.compile
        )
        self.chunk_views = plan.chunk_views

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def warm_up(self) -> None:
        """One full chunk through the network, so the first request pays no set-up."""
        size = self.cfg.input_size
        pixels = torch.zeros(self.chunk_views, size, size, 3, dtype=torch.uint8)
        self.run_views(pixels.permute(0, 3, 1, 2))  # as views arrive: uint8, channels_last

    # -- the forward pass -------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32 or self._backend is not None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _chunks(self, batch: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, batch.shape[0], self.chunk_views):
            yield batch[start : start + self.chunk_views]

    @property
    def bn_sets(self) -> list[int]:
        """Resolutions with their own batch-norm set (besides the model's input size)."""
        return [size for size in self.variants if size != self.cfg.input_size]

    def variant_for(self, height: int, width: int) -> LoadedModel:
        """The network for views of this shape: the batch-norm set nearest its shorter side."""
        if len(self.variants) == 1:
            return self.model
        return self.variants[nearest_resolution(list(self.variants), min(height, width))]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.variant_for(int(x.shape[-2]), int(x.shape[-1]))
        f = model.features(x)
        return f, model.head(f)

    def run_views(self, batch: torch.Tensor) -> ViewOutputs:
        """Features and logits of a stack of views of one shape [N, 3, H, W], chunked for
        the device: uint8 pixels (normalised here, or in the backend's graph) or float32
        already normalised."""
        feats, logits = [], []
        compiled = self._compiled
        # dynamo does not trace under inference_mode; no_grad is its equivalent there
        grad_off = torch.no_grad() if compiled is not None else torch.inference_mode()
        with grad_off, self._autocast():
            for chunk in self._chunks(batch):
                n = int(chunk.shape[0])
                x = chunk.to(self.device)
                if compiled is not None and n < self.chunk_views:
                    pad = x.new_zeros((self.chunk_views - n, *x.shape[1:]))
                    x = torch.cat([x, pad])
                if self._backend is not None:
                    f, out = self._backend(x)
                else:
                    if x.dtype == torch.uint8:
                        x = normalise(x, self._mean, self._std)
                    x = x.contiguous(memory_format=torch.channels_last)
                    f, out = (compiled or self._forward)(x)
                feats.append(f[:n].float())
                logits.append(out[:n].float())
        return ViewOutputs(torch.cat(feats), torch.cat(logits))

    def run_groups(self, groups: list[ViewGroup]) -> ViewOutputs:
        """Views of several shapes, a forward per shape; outputs in view order."""
        return ViewOutputs.in_view_order([(g.indices, self.run_views(g.batch)) for g in groups])

    @torch.inference_mode()
    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier on (averaged) features, in the engine's dtype: feature-level
        averaging runs it once per image, after the views' forwards."""
        with self._autocast():
            return self.model.head(features).float()
