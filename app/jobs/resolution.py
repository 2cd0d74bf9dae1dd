"""FixRes test sizes: which input sizes a network can be fine-tuned or served at."""

from __future__ import annotations

from torch import nn

from app.errors import InvalidRequestError


def network_stride(network: nn.Module) -> int:
    """The network's total stride (timm's last ``feature_info`` reduction), 1 if unknown."""
    info = getattr(network, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info else 1
    except (KeyError, IndexError, TypeError):
        return 1


def check_test_size(size: int, network: nn.Module, arch: str) -> None:
    """FixRes sizes are multiples of the network's total stride (32 for ResNet/EfficientNet)."""
    stride = network_stride(network)
    if size < stride or size % stride:
        lower = max(stride, size // stride * stride)
        raise InvalidRequestError(
            f"test size {size} is not a multiple of {arch}'s total stride {stride}; "
            f"use e.g. {lower} or {lower + stride}"
        )
