"""The model quantized to int8, as ``midserve quantize`` writes it into the model's entry:
the OpenVINO network with int8 weights and activations, and held-out real views that the
tuner checks it on against float32 before offering it (synthetic probes give near-uniform
outputs on a real network, where int8's errors do not show).

Offered only where the CPU has int8 dot-product units (VNNI or AMX), elsewhere int8 is
emulated and slower, and only where the served policy lost at most MAX_PHOTOS_LOST held-out
photos in int8 (the job scores it; the default model lost 2 of 51 until its stem was left in
float, and none since, docs/benchmarks.md). Whether it is faster than bf16 differs by CPU
(the tuner times it): from about 1.1x on AMX to 1.8x where bf16 is emulated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import BackendUnavailableError
from app.repository import LoadedModel
from app.runtime.machine import cpu_has_int8
from app.runtime.tuning.cache import cache_key, model_fingerprint

INT8_FOLDER = "int8"
MODEL_XML = "model.xml"
CHECK_VIEWS = "check_views.npy"  # uint8 [N, H, W, 3]: held-out center crops
CHECK_WHOLE = "check_whole.npz"  # uint8 [1, H, W, 3] each: the same photos whole (any shape)
META = "int8.json"
# int8 is offered only if the served policy, run whole on the held-out photos, answers at
# most this many more of them wrongly in int8 than in its float path (one photo: the noise
# floor of a folder of a hundred, as for JPEG draft decoding)
MAX_PHOTOS_LOST = 1


def int8_folder(model: LoadedModel) -> Path | None:
    return model.cfg.folder / INT8_FOLDER if model.cfg.folder is not None else None


def weights_key(model: LoadedModel) -> str:
    """Which float weights a quantized model was made from: stale after new weights."""
    return cache_key(model_fingerprint(model))


@dataclass
class Int8Model:
    """A quantized network for one model's weights, with its check views and how it was made."""

    folder: Path
    meta: dict[str, Any]

    def ov_model(self) -> Any:
        import openvino as ov

        return ov.Core().read_model(self.folder / MODEL_XML)

    def check_views(self) -> list[torch.Tensor]:
        """Batches of one shape each, [N, 3, H, W] uint8 channels_last as served views
        arrive: the held-out center crops, then each photo whole (the views a staged policy
        escalates to, where int8's rounding also moves the gate)."""
        batches = [np.load(self.folder / CHECK_VIEWS)]
        whole = self.folder / CHECK_WHOLE
        if whole.is_file():
            with np.load(whole) as arrays:
                batches += [arrays[k] for k in sorted(arrays.files)]
        return [torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2) for b in batches]


def int8_missing(model: LoadedModel) -> str | None:
    """Why ``model`` has no int8 candidate here, or None when it has one."""
    if model.device.type != "cpu":
        return "int8 runs on CPUs here"
    if not cpu_has_int8():
        return "this CPU has no int8 units (VNNI or AMX): int8 would be emulated"
    folder = int8_folder(model)
    if folder is None or not (folder / META).is_file():
        return f"no quantized model in the entry (midserve quantize --model {model.cfg.name})"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {folder / META}: {exc}"
    if meta.get("weights") != weights_key(model):
        return "the quantized model was made from other weights: run midserve quantize again"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed (pip install 'midserve[openvino]')"
    return None


def int8_not_offered(model: LoadedModel) -> str | None:
    """Why the tuner must not offer int8 for ``model``: none runs here (``int8_missing``),
    or the job measured it losing photos with the served policy. A forced int8
    (``MIDSERVE_DTYPE=int8``) is the operator's choice and runs all the same."""
    why = int8_missing(model)
    if why is not None:
        return why
    served = (read_int8_meta(model) or {}).get("served_policy") or {}
    lost = int(served.get("broken", 0)) - int(served.get("fixed", 0))
    if lost > MAX_PHOTOS_LOST:
        return (
            f"int8 answered {lost} more of {served.get('n')} held-out photos wrongly than "
            f"{served.get('baseline', 'float')} with the served policy {served.get('policy')!r} "
            f"(at most {MAX_PHOTOS_LOST} allowed)"
        )
    return None


def read_int8_meta(model: LoadedModel) -> dict[str, Any] | None:
    folder = int8_folder(model)
    try:
        return json.loads((folder / META).read_text()) if folder else None
    except (OSError, ValueError):
        return None


def load_int8(model: LoadedModel) -> Int8Model:
    """The model's quantized network, or a domain error saying why there is none."""
    why = int8_missing(model)
    folder = int8_folder(model)
    meta = read_int8_meta(model)
    if why is not None or folder is None or meta is None:
        raise BackendUnavailableError(f"model {model.cfg.name} has no int8 path: {why}")
    return Int8Model(folder, meta)
