"""What tuning tried and chose: the trials, the table, and its cached form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from app.runtime.plan import ForwardPlan


@dataclass
class Trial:
    plan: ForwardPlan
    views_per_s: float | None = None
    max_prob_diff: float | None = None
    top1_agreement: float | None = None
    status: str = "pending"  # measured | rejected: ... | skipped: ...
    default: bool = False


@dataclass
class TuningReport:
    key: str
    source: str  # tuned | cached
    seconds: float
    budget_s: float
    chosen: ForwardPlan
    default: ForwardPlan
    trials: list[Trial] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'plan':<52} {'views/s':>8} {'max dp':>7} {'top1':>5}  status"]
        for t in sorted(self.trials, key=lambda t: -(t.views_per_s or 0.0)):
            mark = " <- chosen" if t.plan == self.chosen else ""
            mark += " (default)" if t.default else ""
            rate = f"{t.views_per_s:8.1f}" if t.views_per_s else f"{'-':>8}"
            dp = f"{t.max_prob_diff:7.4f}" if t.max_prob_diff is not None else f"{'-':>7}"
            top1 = f"{t.top1_agreement:5.2f}" if t.top1_agreement is not None else f"{'-':>5}"
            lines.append(f"{t.plan.describe():<52} {rate} {dp} {top1}  {t.status}{mark}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "seconds": self.seconds,
            "budget_s": self.budget_s,
            "chosen": dataclasses.asdict(self.chosen),
            "default": dataclasses.asdict(self.default),
            "trials": [
                {**dataclasses.asdict(t), "plan": dataclasses.asdict(t.plan)} for t in self.trials
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], key: str) -> TuningReport | None:
        """The cached report, or None when it is for another key or malformed."""
        try:
            if data["key"] != key:
                return None
            trials = [Trial(**{**t, "plan": ForwardPlan(**t["plan"])}) for t in data["trials"]]
            chosen, default = ForwardPlan(**data["chosen"]), ForwardPlan(**data["default"])
            return cls(key, "cached", float(data["seconds"]), float(data["budget_s"]), chosen,
                       default, trials)  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None
