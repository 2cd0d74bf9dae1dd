"""What one classification asks for, typed and validated: shared by HTTP, CLI and jobs.

No torch in here, so parsing request parameters never pulls in the network code.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import InvalidRequestError
from app.tta.levels import LEVELS, Level, check_level
from app.tta.stages import StagedPolicy
from app.tta.views import ViewSpec

__all__ = ["LEVELS", "ClassifyRequest", "Level", "check_level"]


@dataclass(frozen=True)
class ClassifyRequest:
    """The views to build, how to average them, how many classes to return; ``seed`` fixes
    random view positions (None: drawn per image, and returned so the answer reproduces)."""

    spec: ViewSpec | StagedPolicy  # a plain spec is a policy of one stage
    level: Level = "softmax"
    top_k: int = 5
    seed: int | None = None

    @property
    def policy(self) -> StagedPolicy:
        spec = self.spec
        return StagedPolicy.single(spec) if isinstance(spec, ViewSpec) else spec

    def checked(self, num_classes: int) -> ClassifyRequest:
        check_level(self.level)
        if not 1 <= self.top_k <= num_classes:
            raise InvalidRequestError(
                f"top_k must be between 1 and {num_classes}, got {self.top_k}"
            )
        return self
