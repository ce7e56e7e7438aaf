"""Torchvision backbones that return a feature pyramid ``{level: map}`` for levels 2..5.

Level L has stride 2**L (4, 8, 16, 32); ``last_stride=1`` keeps level 5 at stride 16, the
re-ID habit that buys a finer last map for stripes at almost no parameter cost. The torchvision
modules are kept under their own attribute names so that torchvision's ImageNet state dicts load
key for key (see :mod:`mmfl.models.pretrained`); only the ImageNet classifier is dropped.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

LEVELS = (2, 3, 4, 5)

#: torchvision constructor and the channels of levels 2..5.
_RESNETS: dict[str, tuple[Callable[..., tvm.ResNet], tuple[int, int, int, int]]] = {
    "resnet18": (tvm.resnet18, (64, 128, 256, 512)),
    "resnet34": (tvm.resnet34, (64, 128, 256, 512)),
    "resnet50": (tvm.resnet50, (256, 512, 1024, 2048)),
    "resnet101": (tvm.resnet101, (256, 512, 1024, 2048)),
}
#: ``features[i]`` indices where MobileNetV2's levels 2..5 end (exclusive); level 5 includes the
#: final 1x1 conv to 1280 channels so that every ImageNet weight is used.
_MOBILENET_ENDS = (4, 7, 14, 19)
_MOBILENET_CHANNELS = (24, 32, 96, 1280)

BACKBONES = (*_RESNETS, "mobilenet_v2")


class Backbone(nn.Module):
    """A torchvision CNN cut into four stages; ``forward`` returns ``{2: c2, 3: c3, 4: c4, 5: c5}``.

    Attributes ``channels`` and ``strides`` map level -> channel count / stride, so that the
    neck and the branches size themselves from the backbone instead of from tables.
    ``ignored_prefixes`` are the state-dict keys of torchvision's ImageNet classifier, which a
    retrieval model does not have and which weight loading skips on purpose.
    """

    def __init__(self, arch: str, last_stride: int = 2) -> None:
        super().__init__()
        if arch not in BACKBONES:
            raise ValueError(f"unknown backbone '{arch}' (choose one of {', '.join(BACKBONES)})")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.arch = arch
        self.frozen_stages = 0
        if arch == "mobilenet_v2":
            net = tvm.mobilenet_v2(weights=None)
            self.features = net.features
            bounds = (0, *_MOBILENET_ENDS)
            self._stages = [self.features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            self._stage_attrs: list[tuple[str, ...]] = []  # stages are slices of one Sequential
            channels = _MOBILENET_CHANNELS
            self.ignored_prefixes: tuple[str, ...] = ("classifier.",)
        else:
            ctor, channels = _RESNETS[arch]
            net = ctor(weights=None)
            self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
            self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
            stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
            self._stages = [nn.Sequential(stem, self.layer1), self.layer2, self.layer3, self.layer4]
            self._stage_attrs = [("conv1", "bn1", "relu", "maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",)]
            self.ignored_prefixes = ("fc.",)
        if last_stride == 1:
            _remove_stride(self._stages[3])
        self.channels = dict(zip(LEVELS, channels))
        self.strides = {2: 4, 3: 8, 4: 16, 5: 32 if last_stride == 2 else 16}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        pyramid: dict[int, torch.Tensor] = {}
        for level, stage in zip(LEVELS, self._stages):
            x = stage(x)
            pyramid[level] = x
        return pyramid

    def truncate(self, deepest: int) -> None:
        """Drop the stages above level ``deepest`` when nothing reads them.

        A model whose branches and neck stop at level 4 would otherwise compute ``layer4`` for
        nothing and carry parameters that never get a gradient (which DDP refuses by default).
        Call after loading pretrained weights: the dropped stages leave the state dict.
        """
        if not LEVELS[0] <= deepest <= LEVELS[-1]:
            raise ValueError(f"deepest level must be in {LEVELS[0]}..{LEVELS[-1]}, got {deepest}")
        keep = deepest - LEVELS[0] + 1
        if self.arch == "mobilenet_v2":
            self.features = self.features[: _MOBILENET_ENDS[keep - 1]]
        else:
            for attrs in self._stage_attrs[keep:]:
                for attr in attrs:
                    delattr(self, attr)
            self._stage_attrs = self._stage_attrs[:keep]
        self._stages = self._stages[:keep]
        self.channels = {lv: c for lv, c in self.channels.items() if lv <= deepest}
        self.strides = {lv: s for lv, s in self.strides.items() if lv <= deepest}
        self.frozen_stages = min(self.frozen_stages, keep)

    def freeze(self, stages: int) -> None:
        """Freeze the first ``stages`` stages (the stem counts with stage 1): no gradients, BN stats fixed.

        For small CPU budgets: the early ImageNet filters are generic, and freezing them saves their
        backward pass. BatchNorm in frozen stages stays in eval mode through ``train()`` calls.
        """
        if not 0 <= stages <= len(self._stages):
            raise ValueError(f"freeze stages must be in 0..{len(self._stages)}, got {stages}")
        self.frozen_stages = stages
        for stage in self._stages[:stages]:
            for p in stage.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def freeze_batchnorm(self) -> None:
        """Replace every BatchNorm2d of the backbone by a :class:`FrozenBatchNorm` holding its current values.

        Call after loading pretrained weights (the frozen statistics are those). Modules are
        reachable twice (as attributes, for state-dict keys, and inside the stage Sequentials that
        ``forward`` runs), so both references are swapped.
        """
        frozen = {id(m): FrozenBatchNorm(m) for m in self.modules() if isinstance(m, nn.BatchNorm2d)}
        parents = {id(m): m for tree in (self, *self._stages) for m in tree.modules()}
        for parent in parents.values():
            for name, child in list(parent.named_children()):
                if id(child) in frozen:
                    setattr(parent, name, frozen[id(child)])

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for stage in self._stages[: self.frozen_stages]:
            stage.eval()
        return self


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d with its statistics and affine fixed: one multiply-add per value, no batch reductions.

    Why: in bf16 training on a GPU, batch norm (statistics, transform, and their backward
    reductions) took 31.6 % of MMFL-Net's kernel time (``docs/BENCHMARKS.md``); a frozen one is an
    element-wise affine that a compiler folds into the convolution before it. Detection and re-ID
    toolkits offer the same switch for small per-GPU batches; here it is ``model.backbone_norm``,
    and what it costs in accuracy is measured in ``docs/RESULTS.md``. The scale and shift are cast
    to the input's dtype, so bf16 activations stay bf16 (a float32 buffer would promote them).
    Keys are BatchNorm2d's (``num_batches_tracked`` is dropped on load), so ImageNet state dicts
    and checkpoints load into either.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.eps = bn.eps
        ones, zeros = torch.ones(bn.num_features), torch.zeros(bn.num_features)
        for name, default in (("weight", ones), ("bias", zeros), ("running_mean", zeros), ("running_var", ones)):
            value = getattr(bn, name)
            self.register_buffer(name, (default if value is None else value.detach()).clone())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # the same affine as BatchNormalization, which runtimes fold into the convolution before
            # it; as Mul + Add, ONNX Runtime kept them apart (6 % slower on the CPU, mmfl/ResNet-50)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _remove_stride(stage: nn.Module) -> None:
    """Make a stage keep its input resolution: every stride-2 conv of its first block gets stride 1.

    Works for ResNet basic/bottleneck blocks (main path and downsample shortcut) and for
    MobileNetV2's depthwise conv alike, without naming their internals.
    """
    first_block = next(iter(stage.children()))
    for module in first_block.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
