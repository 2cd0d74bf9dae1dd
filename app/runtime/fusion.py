"""Inference-only rewrites of a network: the same function, fewer passes over memory.

Profiled on the 2-core dev VM (lite0, 8 views, bf16): batch norm took a quarter of the
forward and TensorFlow "SAME" padding (``F.pad`` before every stride-2 convolution)
another fifth, both pure memory traffic. In eval mode a batch norm is an affine map per
channel, so it folds into the convolution that feeds it; and for a fixed input size the
asymmetric SAME padding becomes a symmetric padding plus a zero row and column at the
start of the kernel, so no padded copy of the activations is ever made. That padding
depends only on the input size modulo the stride, so one variant per remainder makes the
rewrite exact at every input size (full-image views come in many shapes).

Once the norms are folded, a timm norm's activation (ReLU6 in the lite models) is the
next pass over memory: a quarter of the remaining forward. On a CPU with oneDNN the
convolution and its activation become one primitive (the op torch's own compiler emits
for this pattern), which applies the activation as it writes its output.

The rewrites work on a copy, find conv -> batch-norm pairs by data flow (the norm's input
is the very tensor the convolution returned), and are checked against the original
network in float32 at several input shapes; a network whose rewrite does not match is
served without it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.norm_act import BatchNormAct2d
from timm.layers.padding import get_same_padding
from torch import nn

log = logging.getLogger(__name__)

# float32 outputs of the rewritten network may differ from the original by rounding only
VERIFY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class FusionReport:
    """What was rewritten, and how far the rewrite's outputs are from the original's."""

    folded_norms: int
    static_pads: int
    fused_activations: int
    max_abs_diff: float
    applied: bool

    def describe(self) -> str:
        if not self.applied:
            return f"not applied (outputs differed by {self.max_abs_diff:.3g})"
        return (
            f"{self.folded_norms} batch norms folded, {self.static_pads} SAME paddings "
            f"made static, {self.fused_activations} activations fused into their "
            f"convolutions, max float32 output difference {self.max_abs_diff:.2g}"
        )


# activation module -> (oneDNN post-op name, its scalars)
def _pointwise_attr(act: nn.Module) -> tuple[str, list[float]] | None:
    if type(act) is nn.ReLU:
        return "relu", []
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        assert isinstance(act, nn.Hardtanh)
        return "hardtanh", [float(act.min_val), float(act.max_val)]
    if type(act) is nn.SiLU:
        return "swish", []
    if type(act) is nn.Hardswish:
        return "hardswish", []
    return None


def pointwise_available(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    )


class ConvPointwise(nn.Module):
    """A convolution and the activation after it as one oneDNN primitive.

    Outside autocast's reach (an explicit op): the input is cast to the weights' dtype, which
    ``cast`` sets once at load rather than on every call.
    """

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.geometry = (
            [int(p) for p in conv.padding],
            [int(s) for s in conv.stride],
            [int(d) for d in conv.dilation],
            conv.groups,
        )
        self.attr, self.scalars = attr, scalars

    def cast(self, dtype: torch.dtype) -> None:
        with torch.no_grad():
            self.weight = nn.Parameter(
                self.weight.to(dtype).contiguous(memory_format=torch.channels_last),
                requires_grad=False,
            )
            self.bias = nn.Parameter(self.bias.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding, stride, dilation, groups = self.geometry
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(self.weight.dtype), self.weight, self.bias, padding, stride, dilation, groups,
            self.attr, self.scalars, "",
        )  # fmt: skip


def _symmetric_same_conv(conv: Conv2dSame, remainder: tuple[int, int]) -> nn.Conv2d:
    """The SAME convolution for inputs whose size leaves ``remainder`` modulo the stride.

    SAME pads ``p`` before and ``p + d`` after. A symmetric padding of ``p + d`` with ``d``
    zero rows/columns prepended to the kernel reads exactly the same pixels with the same
    weights."""
    kh, kw = conv.weight.shape[-2:]
    # any size with this remainder pads the same; one large enough for the kernel stands in
    size_h = remainder[0] + conv.stride[0] * kh
    size_w = remainder[1] + conv.stride[1] * kw
    pad_h = get_same_padding(size_h, kh, conv.stride[0], conv.dilation[0])
    pad_w = get_same_padding(size_w, kw, conv.stride[1], conv.dilation[1])
    dh, dw = pad_h - 2 * (pad_h // 2), pad_w - 2 * (pad_w // 2)  # the extra after-pad
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (kh + dh, kw + dw),
        conv.stride,  # type: ignore[arg-type]
        (pad_h - pad_h // 2, pad_w - pad_w // 2),
        1,
        conv.groups,
        conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        out.weight.zero_()
        out.weight[:, :, dh:, dw:] = conv.weight
        if conv.bias is not None and out.bias is not None:
            out.bias.copy_(conv.bias)
    out.weight = nn.Parameter(out.weight.contiguous(memory_format=torch.channels_last))
    return out


class StaticSamePadConv2d(nn.Module):
    """A stride-s TF "SAME" convolution with no padded copy, exact at every input size:
    one symmetric-padding variant per remainder of the input size modulo the stride (4 for
    stride 2), picked per call."""

    def __init__(self, conv: Conv2dSame) -> None:
        super().__init__()
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.variants = nn.ModuleDict(
            {
                f"{rh}_{rw}": _symmetric_same_conv(conv, (rh, rw))
                for rh in range(self.stride[0])
                for rw in range(self.stride[1])
            }
        )

    @staticmethod
    def applies(conv: Conv2dSame) -> bool:
        return tuple(conv.dilation) == (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.variants[f"{h % self.stride[0]}_{w % self.stride[1]}"](x)


def _probe(net: nn.Module, input_size: int) -> list[tuple[str, str]]:
    """One forward with hooks: (conv, norm) name pairs where the norm reads exactly what the
    convolution wrote."""
    conv_outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def conv_done(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            conv_outputs[id(out)] = (name, out)  # keeping ``out`` alive keeps its id unique

        return hook

    def norm_input(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: tuple) -> None:
            found = conv_outputs.get(id(inp[0]))
            if found is not None and found[1] is inp[0]:
                pairs.append((found[0], name))

        return hook

    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_done(name)))
        if type(module) in (nn.BatchNorm2d, BatchNormAct2d):
            hooks.append(module.register_forward_pre_hook(norm_input(name)))
    device = next(net.parameters()).device
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return pairs


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Module:
    """Fold ``norm`` into ``conv`` in place; return what must stay where the norm was: for a
    timm norm, its dropout (identity in eval) and activation."""
    assert norm.running_mean is not None and norm.running_var is not None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.detach().clone())
    if isinstance(norm, BatchNormAct2d):
        return nn.Sequential(norm.drop, norm.act)  # what timm applies after the norm
    return nn.Identity()


def _rewrite(
    net: nn.Module, input_size: int, pointwise: bool
) -> tuple[nn.Module, tuple[int, int, int]]:
    """The rewritten copy, all in float32, and its counts (norms, paddings, activations)."""
    fused = copy.deepcopy(net).eval()
    pairs = _probe(fused, input_size)
    activations: list[tuple[str, str, nn.Module]] = []
    folded = 0
    for conv_name, norm_name in pairs:
        norm = fused.get_submodule(norm_name)
        if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None:
            continue
        conv = fused.get_submodule(conv_name)
        assert isinstance(conv, nn.Conv2d)
        _replace(fused, norm_name, _fold(conv, norm))
        folded += 1
        if isinstance(norm, BatchNormAct2d) and isinstance(norm.drop, nn.Identity):
            activations.append((conv_name, norm_name, norm.act))
    static = 0
    for name, conv in list(fused.named_modules()):
        if isinstance(conv, Conv2dSame) and StaticSamePadConv2d.applies(conv):
            _replace(fused, name, StaticSamePadConv2d(conv))
            static += 1
    fused_acts = 0
    for conv_name, norm_name, act in activations if pointwise else []:
        conv, spec = fused.get_submodule(conv_name), _pointwise_attr(act)
        if spec is None:
            continue
        if isinstance(conv, StaticSamePadConv2d):  # each remainder's variant fuses alike
            for key, variant in conv.variants.items():
                assert isinstance(variant, nn.Conv2d)
                conv.variants[key] = ConvPointwise(variant, *spec)
        elif isinstance(conv, Conv2dSame) or not isinstance(conv, nn.Conv2d):
            continue  # pads per call
        elif isinstance(conv.padding, str):
            continue
        else:
            _replace(fused, conv_name, ConvPointwise(conv, *spec))
        _replace(fused, norm_name, nn.Identity())
        fused_acts += 1
    return fused, (folded, static, fused_acts)


def check_shapes(input_size: int) -> list[tuple[int, int]]:
    """Input shapes a rewrite is checked at: the square view, a landscape full image, and odd
    sizes (every remainder of the stride-2 paddings)."""
    s = input_size
    return [(s, s), (s + s // 4, s + s // 2), (s + 1, s + 3)]


def _max_diff(net: nn.Module, fused: nn.Module, input_size: int) -> tuple[float, bool]:
    """The largest output difference over ``check_shapes``; ok when within rounding."""
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(2, 3, h, w, generator=generator).to(device) for h, w in check_shapes(input_size)
    ]
    was_training = net.training
    # full float32 on a GPU too: TF32 rounding would hide a wrong rewrite or fail a right one
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            pairs = [(net.eval()(x).float(), fused(x).float()) for x in inputs]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        net.train(was_training)
    diff = max(float((ref - out).abs().max()) for ref, out in pairs)
    scale = max(float(ref.abs().max()) for ref, _ in pairs)
    return diff, diff <= VERIFY_TOLERANCE * max(1.0, scale)


def fuse_for_inference(
    net: nn.Module, input_size: int, compute_dtype: torch.dtype | None = None
) -> tuple[nn.Module, FusionReport]:
    """An eval-mode copy of ``net`` rewritten for inference at any input size (checked at
    ``check_shapes(input_size)``), or ``net`` itself when the copy's outputs differ. With
    ``compute_dtype`` (float32 or bfloat16) on a CPU with oneDNN, convolution + activation
    pairs become one primitive in that dtype."""
    device = next(net.parameters()).device
    pointwise = compute_dtype in (torch.float32, torch.bfloat16) and pointwise_available(device)
    diff, ok, counts = float("inf"), False, (0, 0, 0)
    for attempt in [True, False] if pointwise else [False]:
        try:
            fused, counts = _rewrite(net, input_size, attempt)
            diff, ok = _max_diff(net, fused, input_size)
        except RuntimeError as exc:  # an op this torch build lacks: try the plainer rewrite
            log.warning("inference rewrite (fused activations: %s) failed: %s", attempt, exc)
            continue
        if ok:
            break
    if not ok:
        report = FusionReport(counts[0], counts[1], counts[2], diff, False)
        log.warning("inference rewrite of %s %s", type(net).__name__, report.describe())
        return net, report
    if compute_dtype is not None:
        for module in fused.modules():
            if isinstance(module, ConvPointwise):
                module.cast(compute_dtype)
    return fused, FusionReport(counts[0], counts[1], counts[2], diff, True)
