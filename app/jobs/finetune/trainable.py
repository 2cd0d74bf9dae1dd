"""Which parts of the network train, and the batch-norm that sees the whole global batch."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.nn.functional as dist_fn
from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from app.errors import InvalidRequestError, MidserveError
from app.jobs.distributed import DistContext
from app.jobs.finetune.options import DEFAULT_TRAIN, TRAIN_PARTS


@dataclass(frozen=True)
class TrainableParts:
    modules: tuple[str, ...]  # module names whose parameters train (and run in train mode)
    last_bn: str
    classifier: str
    head_conv: str


def module_name(network: nn.Module, target: nn.Module) -> str:
    for name, module in network.named_modules():
        if module is target:
            return name
    raise MidserveError("module not found in network")


def execution_order(network: nn.Module, input_size: int) -> list[str]:
    """Names of batch-norm and conv modules in the order one forward pass runs them."""
    names = {id(m): n for n, m in network.named_modules()}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[id(mod)]))
        for m in network.modules()
        if isinstance(m, _BatchNorm | nn.Conv2d)
    ]
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    return order


def parse_train_spec(spec: str) -> tuple[list[str], int]:
    """``classifier,last-bn[,head-conv][,blocks:N]`` -> (named parts, N blocks)."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InvalidRequestError(f"--train is empty; e.g. {DEFAULT_TRAIN}")
    blocks = 0
    for item in items:
        kind, _, count = item.partition(":")
        if kind == "blocks" and count.isdigit() and int(count) >= 1:
            blocks = int(count)
        elif item not in TRAIN_PARTS:
            raise InvalidRequestError(
                f"--train part {item!r} is unknown; parts: {', '.join(TRAIN_PARTS)}, blocks:N"
            )
    return items, blocks


def last_blocks(network: nn.Module, blocks: int, named: set[str]) -> list[str]:
    """Module names of the last ``blocks`` blocks (timm's parameter groups), ``named``
    modules left out."""
    groups = group_parameters(network, network.group_matcher(coarse=False))  # type: ignore[operator]
    block_groups = []
    for ordinal, params in sorted(groups.items()):
        owners = {p.rsplit(".", 1)[0] for p in params}
        owners = {o for o in owners if not any(o == n or o.startswith(n + ".") for n in named if n)}
        if ordinal > 0 and owners:  # group 0 is the stem
            block_groups.append(sorted(owners))
    if blocks > len(block_groups):
        raise InvalidRequestError(
            f"blocks:{blocks} asked, the network has {len(block_groups)} blocks"
        )
    return [name for block in block_groups[-blocks:] for name in block]


def select_trainable(network: nn.Module, spec: str, input_size: int) -> TrainableParts:
    """Parse ``classifier,last-bn[,head-conv][,blocks:N]`` into module names of this network."""
    items, blocks = parse_train_spec(spec)
    get_classifier = getattr(network, "get_classifier", None)
    classifier = get_classifier() if get_classifier else None
    if classifier is None or not any(True for _ in classifier.parameters()):
        raise InvalidRequestError("the network has no trainable classifier")
    classifier_name = module_name(network, classifier)
    order = execution_order(network, input_size)
    bn_names = [n for n in order if isinstance(network.get_submodule(n), _BatchNorm)]
    if not bn_names:
        raise InvalidRequestError("the network has no batch-norm layer; FixRes needs one")
    last_bn = bn_names[-1]
    before = order[: order.index(last_bn)]
    convs = [n for n in before if isinstance(network.get_submodule(n), nn.Conv2d)]
    head_conv = convs[-1] if convs else ""
    chosen: list[str] = []
    if "classifier" in items:
        chosen.append(classifier_name)
    if "last-bn" in items:
        chosen.append(last_bn)
    if "head-conv" in items:
        if not head_conv:
            raise InvalidRequestError("the network has no conv before its last batch-norm")
        chosen.append(head_conv)
    if blocks:
        chosen.extend(last_blocks(network, blocks, {classifier_name, last_bn, head_conv}))
    return TrainableParts(tuple(dict.fromkeys(chosen)), last_bn, classifier_name, head_conv)


def set_fixres_modes(network: nn.Module, parts: TrainableParts) -> list[nn.Parameter]:
    """Eval mode and frozen everywhere, except the trainable parts; returns their parameters."""
    network.eval()
    network.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in parts.modules:
        module = network.get_submodule(name)
        module.train()
        module.requires_grad_(True)
        params.extend(module.parameters())
    return params


def cross_process_bn_forward(self: _BatchNorm, x: torch.Tensor, group: Any) -> torch.Tensor:
    """Batch-norm in train mode with statistics of the global batch (summed over processes)."""
    if not self.training:
        return type(self).forward(self, x)
    dims = [d for d in range(x.dim()) if d != 1]
    xd = x.double()
    channels = x.shape[1]
    local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / channels])])
    total = dist_fn.all_reduce(local, group=group)  # differentiable: gradients flow back
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            nbt = float(self.num_batches_tracked)  # type: ignore[arg-type]
            m = self.momentum if self.momentum is not None else 1.0 / nbt
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)  # type: ignore[union-attr]
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    y = y.to(x.dtype)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if hasattr(self, "act"):  # timm's BatchNormAct2d: drop + activation after the norm
        drop = getattr(self, "drop", None)
        act: Any = self.act
        y = act(drop(y) if drop is not None else y)
    return y


@contextlib.contextmanager
def global_batch_stats(bn: _BatchNorm, ctx: DistContext) -> Iterator[None]:
    """Under DDP, make ``bn`` normalise with the whole global batch's statistics."""
    if not ctx.distributed:
        yield
        return
    bn.forward = types.MethodType(  # type: ignore[method-assign]
        lambda self, x: cross_process_bn_forward(self, x, ctx.stats_group), bn
    )
    try:
        yield
    finally:
        del bn.forward
