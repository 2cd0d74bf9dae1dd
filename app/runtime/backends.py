"""Runtimes besides torch for the whole forward: OpenVINO on CPUs.

Measured on a 2-vCPU Xeon with AMX (tf_efficientnet_lite0, one thread): OpenVINO in bf16
ran 175-210 views/s at every batch size, torch's fused bf16 70 (1 view) to 188 (16 views),
so on small batches it is worth having. The converted network returns (features, logits):
feature-level averaging runs the head on averaged features, which stays in torch. The
conversion takes about 16 s, so the converted model is kept beside the tuning cache and
read back (well under a second) on the next load. It is converted with a dynamic batch and
spatial size, so whole-image views of any shape run without a new conversion.

A backend that is not installed, a model with batch-norm sets (one network per
resolution) or a conversion that fails: the model runs on torch, with a log line.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import BackendUnavailableError
from app.repository import LoadedModel, pooled_features
from app.runtime.int8 import load_int8
from app.runtime.machine import cpu_has_native_bf16
from app.runtime.plan import EngineOptions, ForwardPlan
from app.runtime.tuning.cache import cache_key, cache_root, model_fingerprint

log = logging.getLogger(__name__)

OPENVINO_PRECISIONS = {"float32": "f32", "bfloat16": "bf16", "int8": "int8"}


def inference_precision(dtype: str) -> str:
    """OpenVINO's precision hint: an int8 network's remaining float ops run in bf16 where
    the CPU has it (measured: about 1.2x f32 for them), else f32."""
    if dtype != "int8":
        return OPENVINO_PRECISIONS[dtype]
    return "bf16" if cpu_has_native_bf16() else "f32"


def backend_missing(name: str) -> str | None:
    """Why ``name`` cannot run here, or None when it can."""
    if name == "torch":
        return None
    if name != "openvino":
        return f"unknown backend {name!r}"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'midserve[openvino]')"
    return None


class FeaturesAndLogits(nn.Module):
    """The network as one graph with both outputs a prediction needs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net: Any = self.net
        f = pooled_features(net, x)
        return f, net.get_classifier()(f)


def openvino_model(model: LoadedModel, cache_dir: Path) -> Any:
    """The model converted to OpenVINO, from the cache when it was converted before."""
    import openvino as ov

    key = cache_key(model_fingerprint(model), ov.__version__, torch.__version__)
    xml = cache_dir / "openvino" / f"{key}.xml"
    core = ov.Core()
    if xml.is_file():
        try:
            return core.read_model(xml)
        except RuntimeError as exc:
            log.warning("ignoring the cached OpenVINO model %s: %s", xml, exc)
    size = model.cfg.input_size
    wrapper = FeaturesAndLogits(copy.deepcopy(model.network).float().cpu().eval())
    with torch.no_grad():
        converted = ov.convert_model(
            wrapper,
            example_input=torch.randn(1, 3, size, size),
            input=[(ov.PartialShape([-1, 3, -1, -1]), ov.Type.f32)],
        )
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        tmp = xml.with_name(f"{key}.{os.getpid()}.tmp.xml")
        ov.save_model(converted, tmp, compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        tmp.replace(xml)
    except (OSError, RuntimeError) as exc:
        log.warning("could not cache the OpenVINO model in %s: %s", xml.parent, exc)
    return converted


def with_pixel_input(ov_model: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """A copy of the network that takes uint8 pixels [N, H, W, 3] (the views as cut) and
    normalises them in its own graph, where OpenVINO fuses it into the first convolution:
    no float pass and no NHWC -> NCHW copy on the host."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(ov_model.clone())
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
    steps.mean([m * 255.0 for m in mean]).scale([s * 255.0 for s in std])
    return ppp.build()


class OpenVinoForward:
    """A compiled OpenVINO model with one infer request per calling thread, so the
    engine's forward workers run in parallel (one stream each). Two inputs: uint8 pixels
    (served views) and float32 already normalised (probes, callers' tensors), each compiled
    on first use."""

    def __init__(
        self,
        ov_model: Any,
        dtype: str,
        workers: int,
        threads: int,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        import openvino as ov

        if dtype not in OPENVINO_PRECISIONS:
            raise BackendUnavailableError(f"OpenVINO does not run {dtype} on a CPU here")
        self._core = ov.Core()
        self._models = {"normalised": ov_model}
        self._pixel_model = lambda: with_pixel_input(ov_model, mean, std)
        self.precision = inference_precision(dtype)
        self._local = threading.local()
        self._teams: dict[tuple[str, int, int], Any] = {}
        self._compiling = threading.Lock()
        self.configure(workers, threads)

    def configure(self, workers: int, threads: int) -> None:
        """Compiled on first use per input and team (workers x threads): tuning switches
        teams back and forth."""
        self._generation = (workers, threads)

    def _compiled(self, kind: str) -> Any:
        workers, threads = self._generation
        team = (kind, workers, threads)
        with self._compiling:
            return self._teams.get(team) or self._compile(team)

    def _compile(self, team: tuple[str, int, int]) -> Any:
        kind, workers, threads = team
        if kind not in self._models:
            self._models[kind] = self._pixel_model()
        # the precision is always explicit: OpenVINO defaults to bf16 on CPUs with it
        config = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, workers * threads),
            "NUM_STREAMS": max(1, workers),
            # pinning binds the calling threads too, and a 2-thread torch team on one
            # core then runs about 10x slower in the same process
            "ENABLE_CPU_PINNING": False,
        }
        self._teams[team] = self._core.compile_model(self._models[kind], "CPU", config)
        return self._teams[team]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = "pixels" if x.dtype == torch.uint8 else "normalised"
        local = self._local
        key = (kind, self._generation)
        requests = local.__dict__.setdefault("requests", {})
        if key not in requests:
            requests[key] = self._compiled(kind).create_infer_request()
        if kind == "pixels":  # views are cut NHWC: this permute is the memory as it is
            data = x.permute(0, 2, 3, 1).contiguous().numpy()
        else:
            data = x.float().contiguous().numpy()
        out = requests[key].infer({0: data})
        # outputs by index: OpenVINO names them after the traced graph's nodes
        return torch.from_numpy(out[0].copy()), torch.from_numpy(out[1].copy())


def build_backend(
    model: LoadedModel, plan: ForwardPlan, has_bn_sets: bool, options: EngineOptions
) -> OpenVinoForward | None:
    """The plan's backend for this model, or None (with a log line) to run it on torch."""
    name = model.cfg.name
    why = backend_missing(plan.backend)
    if why is None and has_bn_sets:
        why = "the model has batch-norm sets (one network per resolution)"
    if why is None and model.device.type != "cpu":
        why = f"{plan.backend} runs on CPUs only here"
    if why is not None:
        log.info("model %s runs on torch, not %s: %s", name, plan.backend, why)
        return None
    if plan.dtype == "int8":  # a quantized network or nothing: no silent float fallback
        cfg = model.cfg
        quantized = load_int8(model).ov_model()
        return OpenVinoForward(quantized, "int8", plan.workers, plan.threads, cfg.mean, cfg.std)
    try:
        ov_model = openvino_model(model, cache_root(options.tune_cache_dir))
        cfg = model.cfg
        return OpenVinoForward(ov_model, plan.dtype, plan.workers, plan.threads, cfg.mean, cfg.std)
    except Exception as exc:  # any conversion or compile failure: torch serves it
        log.warning("model %s runs on torch: %s failed: %s", name, plan.backend, exc)
        return None
