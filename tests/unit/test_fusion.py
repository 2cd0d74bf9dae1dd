"""Inference rewrites: the same outputs as the original network, or no rewrite at all."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from app.runtime.engine import Engine
from app.runtime.fusion import (
    ConvPointwise,
    StaticSamePadConv2d,
    fuse_for_inference,
    pointwise_available,
)
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, classify, image_bytes


def _calibrated(net: nn.Module, size: int) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters, so a wrong fold shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        net.train()
        net(torch.randn(8, 3, size, size))
    return net.eval()


@pytest.mark.parametrize(("kernel", "groups"), [(3, 1), (5, 8), (3, 8)])
def test_static_same_padding_matches_dynamic_at_every_size(kernel: int, groups: int) -> None:
    """One rewrite serves every input size: square, oblong, odd and even in each axis."""
    torch.manual_seed(kernel + groups)
    conv = Conv2dSame(8, 8, kernel, stride=2, groups=groups, bias=True)
    static = StaticSamePadConv2d(conv)
    for h, w in [(15, 15), (16, 16), (31, 32), (32, 31), (16, 45), (7, 9)]:
        x = torch.randn(2, 8, h, w)
        torch.testing.assert_close(static(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_tf_network_is_folded_and_padded_with_the_same_outputs(compute_dtype) -> None:
    size = 64
    net = _calibrated(timm.create_model("tf_efficientnet_lite0", num_classes=10), size)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused, report = fuse_for_inference(net, size, compute_dtype)
    assert report.applied and fused is not net
    assert report.static_pads == 5  # the stem and the four stride-2 depthwise convolutions
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert report.folded_norms == len(norms)
    with_relu6 = sum(isinstance(getattr(m, "act", None), nn.ReLU6) for m in norms)
    fuses_acts = compute_dtype is not None and pointwise_available(torch.device("cpu"))
    assert report.fused_activations == (with_relu6 if fuses_acts else 0)
    # a static-padding convolution fuses once per stride remainder (its variants)
    variants = [m.variants for m in fused.modules() if isinstance(m, StaticSamePadConv2d)]
    extra = sum(len(v) - 1 for v in variants if isinstance(v["0_0"], ConvPointwise))
    pointwise = sum(isinstance(m, ConvPointwise) for m in fused.modules())
    assert pointwise - extra == report.fused_activations
    assert not any(isinstance(m, nn.BatchNorm2d | Conv2dSame) for m in fused.modules())
    for h, w in [(size, size), (size + 32, size), (size + 7, size + 13)]:  # any view shape
        x = torch.randn(3, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-4)
    # the caller's network is untouched: fine-tuning still trains its batch norms
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _ConvFeedsTwoPlaces(nn.Module):
    """The convolution's output is read by the norm and by the residual sum: folding the
    norm into the convolution would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (self.bn(y) + y).mean((2, 3))


def test_a_rewrite_that_changes_outputs_is_not_applied() -> None:
    net = _calibrated(_ConvFeedsTwoPlaces(), 8)
    fused, report = fuse_for_inference(net, 8)
    assert report.folded_norms == 1
    assert not report.applied and fused is net
    assert "not applied" in report.describe()


def test_engine_serves_the_fused_network_with_the_same_predictions(tiny_repo) -> None:
    from app.repository import ModelRepository

    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    fused, plain = Engine(model, FLOAT32), Engine(model, FLOAT32.with_changes(fuse=False))
    assert fused.fusion is not None and fused.fusion.applied and fused.fusion.folded_norms > 0
    assert plain.fusion is None
    spec = parse_view_spec("fixed:5,mfixed:5,random:4")
    for seed in range(3):
        data = image_bytes(seed=seed)
        a = classify(fused, data, spec, level="feature", seed=seed)
        b = classify(plain, data, spec, level="feature", seed=seed)
        torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-5)


# oneDNN's bf16 convolution needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only CPU has
# neither; the tuner offers no bf16 there: runtime/machine.py cpu_has_native_bf16)
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 on this CPU"
    ),
)


@pytest.mark.skipif(not pointwise_available(torch.device("cpu")), reason="no oneDNN on this CPU")
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Hardswish()])
@pytest.mark.parametrize(("kernel", "stride", "groups"), [(1, 1, 1), (3, 2, 8), (3, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_conv_and_activation_as_one_primitive(act: nn.Module, kernel: int, stride: int,
                                              groups: int, dtype: torch.dtype) -> None:  # fmt: skip
    from app.runtime.fusion import _pointwise_attr

    torch.manual_seed(kernel * 10 + stride)
    conv = nn.Conv2d(8, 16, kernel, stride, kernel // 2, groups=groups, bias=False)
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    spec = _pointwise_attr(act)
    assert spec is not None
    fused = ConvPointwise(conv, *spec)
    with torch.no_grad():
        want = act(conv(x))
        if dtype == torch.float32:
            torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
            return
        fused.cast(torch.bfloat16)
        got = fused(x)  # float32 in, bfloat16 weights: the input is cast, bf16 out
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_resnet_norms_fold_including_the_downsample_branches() -> None:
    """Plain BatchNorm2d with the activation as a separate module (timm / torchvision
    ResNets, what FixRes fine-tunes): every norm folds, nothing else changes."""
    size = 64
    net = _calibrated(timm.create_model("resnet18", num_classes=10), size)
    fused, report = fuse_for_inference(net, size, torch.float32)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert report.applied and report.folded_norms == norms == 20
    assert (report.static_pads, report.fused_activations) == (0, 0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-4)
