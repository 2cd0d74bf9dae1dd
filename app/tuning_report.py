"""What tuning tried and chose: the agreement test, the table, and its cached form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import ViewOutputs
from app.options import ForwardPlan
from app.schemas import TuningOut, TuningTrialOut

# bf16 paths differ from float32 by up to about 0.05 in probability on real photos
PROB_TOLERANCE = 0.1
# where float32's top class leads the next by this much, a candidate must pick it too
TOP1_MARGIN = 0.1
FEATURE_TOLERANCE = 0.1  # relative L2 error of the pooled features (feature averaging)


def agreement(reference: ViewOutputs, out: ViewOutputs) -> tuple[float, float, bool]:
    """(max probability difference, top-1 agreement, agrees) of ``out`` with float32.

    Synthetic probes can give flat outputs where a tiny rounding flips the top class, so
    top-1 must agree only where float32's margin is clear; probabilities and features must
    agree everywhere."""
    ref_p = torch.softmax(reference.logits.float(), -1)
    out_p = torch.softmax(out.logits.float(), -1)
    max_diff = float((ref_p - out_p).abs().max())
    same = ref_p.argmax(-1) == out_p.argmax(-1)
    top2 = ref_p.topk(min(2, ref_p.shape[-1]), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) >= TOP1_MARGIN
    feat_err = float(
        (out.features.float() - reference.features).norm()
        / reference.features.norm().clamp_min(1e-12)
    )
    ok = (
        max_diff <= PROB_TOLERANCE
        and bool(same[clear].all())
        and feat_err <= FEATURE_TOLERANCE
        and bool(torch.isfinite(out.logits).all())
    )
    return max_diff, float(same.float().mean()), ok


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

    def to_schema(self) -> TuningOut:
        return TuningOut(
            source=self.source,
            seconds=round(self.seconds, 3),
            budget_s=self.budget_s,
            chosen=self.chosen.describe(),
            default=self.default.describe(),
            candidates=[
                TuningTrialOut(
                    plan=t.plan.describe(), **dataclasses.asdict(t.plan),
                    views_per_s=t.views_per_s, max_prob_diff=t.max_prob_diff,
                    top1_agreement=t.top1_agreement, status=t.status, default=t.default,
                    chosen=t.plan == self.chosen,
                )
                for t in self.trials
            ],
        )  # fmt: skip
