"""The levels views are averaged at (MID, Eq. 3): features, logits or probabilities."""

from __future__ import annotations

from typing import Literal

from app.errors import InvalidRequestError

Level = Literal["feature", "logit", "softmax"]
LEVELS: tuple[Level, ...] = ("feature", "logit", "softmax")


def check_level(level: str) -> Level:
    for known in LEVELS:
        if level == known:
            return known
    raise InvalidRequestError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
