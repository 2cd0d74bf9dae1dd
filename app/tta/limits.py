"""What an uploaded image may be before it is decoded in full. No torch in here: the
settings name these bounds without loading the network code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 16.0
