"""Whether a candidate plan computes what the plain float32 network computes: fixed,
image-like probes through both, compared on probabilities, top-1 and features."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.repository import LoadedModel
from app.runtime.engine import ViewOutputs
from app.tta.preprocess import normalise

PROBES = 8
# bf16 paths differ from float32 by up to about 0.05 in probability on real photos
PROB_TOLERANCE = 0.1
# where float32's top class leads the next by this much, a candidate must pick it too
TOP1_MARGIN = 0.1
FEATURE_TOLERANCE = 0.1  # relative L2 error of the pooled features (feature averaging)
# int8 on real held-out views: where float32 is clear, its top-1 kept on this share of them,
# and each view's largest probability difference this small on average
INT8_TOP1_AGREEMENT = 0.95
INT8_MEAN_PROB_DIFF = 0.05


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


def real_view_agreement(reference: ViewOutputs, out: ViewOutputs) -> tuple[float, float, bool]:
    """(mean max probability difference, top-1 agreement where float32 is clear, agrees)
    on real views: int8 rounding moves probabilities more than bf16 does, and what must
    hold is the answer on photos, not every probability of a synthetic probe."""
    ref_p = torch.softmax(reference.logits.float(), -1)
    out_p = torch.softmax(out.logits.float(), -1)
    mean_diff = float((ref_p - out_p).abs().amax(-1).mean())
    top2 = ref_p.topk(min(2, ref_p.shape[-1]), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) >= TOP1_MARGIN
    same = (ref_p.argmax(-1) == out_p.argmax(-1))[clear]
    top1 = float(same.float().mean()) if same.numel() else 1.0
    ok = (
        top1 >= INT8_TOP1_AGREEMENT
        and mean_diff <= INT8_MEAN_PROB_DIFF
        and bool(torch.isfinite(out.logits).all())
    )
    return mean_diff, top1, ok


def real_outputs(model: LoadedModel, run: Callable[[torch.Tensor], ViewOutputs],
                 batches: list[torch.Tensor]) -> tuple[ViewOutputs, ViewOutputs]:  # fmt: skip
    """(float32's, ``run``'s) outputs on uint8 view batches of any shapes, concatenated."""
    reference = [reference_outputs(model, normalised(model, b)) for b in batches]
    return ViewOutputs.concat(reference), ViewOutputs.concat([run(b) for b in batches])


def normalised(model: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 views [N, 3, H, W] as the plain network's float32 input."""
    mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(model.cfg.std).view(1, 3, 1, 1) * 255.0
    return normalise(pixels, mean, std)


def probe_batch(input_size: int, n: int = PROBES) -> torch.Tensor:
    """Fixed, image-like inputs: smooth random colour fields plus fine noise (pure noise
    gives near-uniform outputs, where agreement says little)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, 3, 6, 6, generator=g) * 1.5
    smooth = torch.nn.functional.interpolate(coarse, size=(input_size, input_size), mode="bicubic")
    return smooth + 0.3 * torch.randn(n, 3, input_size, input_size, generator=g)


def reference_outputs(model: LoadedModel, probes: torch.Tensor) -> ViewOutputs:
    """The plain float32 network, no rewrites: what every candidate must agree with."""
    with torch.inference_mode():
        x = probes.to(model.device)
        f = model.features(x).float()
        return ViewOutputs(f, model.head(f).float())
