"""Average the views of one image at the feature, logit or softmax level (MID, Eq. 3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.tta.levels import Level


def average_probabilities(
    features: torch.Tensor,
    logits: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    level: Level,
) -> torch.Tensor:
    """Class probabilities [C] of one image from its views' features [N, D] and logits [N, C].

    feature: softmax(head(mean features)); logit: softmax(mean logits) (identical to feature
    for a linear head); softmax: mean of per-view softmaxes (the MID paper's best).
    """
    if level == "feature":
        pooled = head(features.float().mean(0, keepdim=True))
        return torch.softmax(pooled.float(), dim=-1)[0]
    if logits.shape[0] == 1 and level in ("logit", "softmax"):  # one view: no mean to take
        return torch.softmax(logits[0].float(), dim=-1)
    if level == "logit":
        return torch.softmax(logits.float().mean(0), dim=-1)
    if level == "softmax":
        return torch.softmax(logits.float(), dim=-1).mean(0)
    raise ValueError(f"unknown level {level!r}")
