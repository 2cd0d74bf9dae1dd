"""What one classification asks for, typed and validated: shared by HTTP, CLI and jobs.

No torch in here, so parsing request parameters never pulls in the network code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.errors import InvalidRequestError
from app.tta.views import ViewSpec

Level = Literal["feature", "logit", "softmax"]
LEVELS: tuple[Level, ...] = ("feature", "logit", "softmax")


def check_level(level: str) -> Level:
    for known in LEVELS:
        if level == known:
            return known
    raise InvalidRequestError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")


@dataclass(frozen=True)
class ClassifyRequest:
    """The views to build, how to average them, how many classes to return; ``seed`` fixes
    random view positions (None: drawn per image, and returned so the answer reproduces)."""

    spec: ViewSpec
    level: Level = "softmax"
    top_k: int = 5
    seed: int | None = None

    def checked(self, num_classes: int) -> ClassifyRequest:
        check_level(self.level)
        if not 1 <= self.top_k <= num_classes:
            raise InvalidRequestError(
                f"top_k must be between 1 and {num_classes}, got {self.top_k}"
            )
        return self
