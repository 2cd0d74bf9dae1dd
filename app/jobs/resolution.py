"""FixRes test sizes: which input sizes a network can be fine-tuned or served at."""

from __future__ import annotations

from torch import nn

from app.errors import InvalidRequestError
from app.repository import network_stride


def check_test_size(size: int, network: nn.Module, arch: str) -> None:
    """FixRes sizes are multiples of the network's total stride (32 for ResNet/EfficientNet);
    a network that does not say its stride constrains no size (stride 1): refusing sizes
    for a guessed stride would refuse sizes the network runs at."""
    stride = network_stride(network) or 1
    if size < stride or size % stride:
        lower = max(stride, size // stride * stride)
        raise InvalidRequestError(
            f"test size {size} is not a multiple of {arch}'s total stride {stride}; "
            f"use e.g. {lower} or {lower + stride}"
        )
