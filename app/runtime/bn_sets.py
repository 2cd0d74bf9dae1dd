"""Batch-norm statistics per test resolution: FixRes at serve time.

FixRes shows that a network sees objects larger at a test resolution above its training one,
and that re-estimating the batch-norm statistics at the test resolution (label-free) repairs
much of the shift; RS-Nets keeps one set of batch-norm parameters per resolution in one
network. A model entry may carry such sets (``[bn_sets]`` in model.toml: resolution -> a
safetensors file of every batch norm's affine parameters and running statistics, written by
``finetune --bn-only --bn-set``); the engine runs each view with the set nearest its shorter
side. The classifier is shared, so feature-level averaging across resolutions stays valid.
Sets load strictly: every batch-norm tensor present, shapes equal, nothing else.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from app.errors import ModelLoadError
from app.model_config import ModelConfig, write_model_config
from app.repository import check_one_to_one

BN_DIR = "bn"


def bn_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """Every batch norm's weight, bias and running statistics, by state-dict name."""
    names = {
        f"{prefix}.{key}" if prefix else key
        for prefix, module in network.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for key in ("weight", "bias", "running_mean", "running_var")
        if getattr(module, key, None) is not None
    }
    return {k: v for k, v in network.state_dict().items() if k in names}


def with_bn_set(network: nn.Module, path: Path) -> nn.Module:
    """A copy of ``network`` with the batch-norm tensors of the set at ``path``."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(f"batch-norm set {path} does not exist")
    tensors = load_file(str(path))
    check_one_to_one(tensors, bn_state(network))
    out = copy.deepcopy(network)
    out.load_state_dict(tensors, strict=False)  # keys checked above: exactly the norms'
    return out


def nearest_resolution(sizes: list[int], resolution: int) -> int:
    """The set for a view whose shorter side is ``resolution``: nearest, the smaller on a tie."""
    return min(sorted(sizes), key=lambda s: abs(s - resolution))


def write_bn_set(cfg: ModelConfig, network: nn.Module, resolution: int) -> ModelConfig:
    """Save ``network``'s batch-norm tensors as the set for ``resolution`` in the model's
    folder and list it in its model.toml (the file first, so a listed set always exists)."""
    from safetensors.torch import save_file

    if cfg.folder is None:
        raise ModelLoadError(f"model {cfg.name} has no folder to write a batch-norm set into")
    rel = f"{BN_DIR}/{resolution}.safetensors"
    path = cfg.folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in bn_state(network).items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    out = cfg.with_changes(bn_sets={**cfg.bn_sets, resolution: rel})
    write_model_config(out, cfg.folder)
    return out
