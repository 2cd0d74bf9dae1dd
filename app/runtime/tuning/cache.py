"""Where tuning results and converted models are kept between restarts, and under what key.

A tuned plan is only as good as the machine and software it was measured on, so the key
holds the CPU (or GPU) model, the core count, torch's version, the model (name, weights,
input size, a fingerprint of its tensors), the device and the candidate space: any change
means a new key, and the model is tuned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from app.repository import LoadedModel
from app.runtime.machine import cores, cpu_name

log = logging.getLogger(__name__)


def cache_root(configured: Path | None = None) -> Path:
    """The tuning cache folder: the setting, else $XDG_CACHE_HOME/midserve/tuning."""
    if configured is not None:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "midserve" / "tuning"


def machine_identity(device: torch.device) -> dict[str, Any]:
    """What a measurement depends on besides the model."""
    ident: dict[str, Any] = {"cpu": cpu_name(), "cores": cores(), "torch": torch.__version__}
    if device.type == "cuda":
        ident["gpu"] = torch.cuda.get_device_name(device)
    return ident


def model_fingerprint(model: LoadedModel) -> dict[str, Any]:
    """The model as served: its config and a hash of its tensors (cheap: sizes, and the
    bytes of the first and last few tensors), so new weights under the same name re-tune."""
    cfg = model.cfg
    state = list(model.network.state_dict().items())
    digest = hashlib.sha256()
    for name, tensor in state[:4] + state[-4:]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(str(sum(t.numel() for _, t in state)).encode())
    return {
        "model": cfg.name,
        "arch": cfg.arch,
        "weights": cfg.weights.describe(),
        "input_size": cfg.input_size,
        "bn_sets": sorted(cfg.bn_sets),
        "tensors": digest.hexdigest()[:16],
    }


def cache_key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_entry(path: Path) -> dict[str, Any] | None:
    """A cached result, or None when absent or unreadable (then the model is tuned again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_entry(path: Path, data: dict[str, Any]) -> None:
    """Written atomically; a read-only or full disk costs a re-tune next time, not a load."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not write the tuning cache %s: %s", path, exc)
