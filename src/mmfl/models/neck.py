"""The semantic-spatial fusion neck of MMFL-Net: FPN top-down, optionally PANet bottom-up, aggregation.

It is MMFL-Net's ``fusion`` switch (``topdown`` / ``bidirectional``); :class:`~mmfl.models.mmfl_net.MMFLNet`
builds one only when a branch reads a fused map.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _fit(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` pooled to ``ref``'s spatial size when they differ (non-adjacent fused levels)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.adaptive_avg_pool2d(x, ref.shape[-2:])


class FusionNeck(nn.Module):
    """Top-down (FPN) and optionally bottom-up (PANet) aggregation over the pyramid ``levels``.

    Top-down: lateral 1x1 conv per level, coarser map upsampled (nearest, to the finer map's exact
    size) and added, 3x3 smoothing. Bottom-up: the finer fused map goes through a stride-2 3x3 conv
    (stride 1 where two levels share a stride, as with ``last_stride=1``) and is added to the next
    level. Modules that cannot reach any of ``out_levels`` are not built, so every parameter
    receives gradients (DDP without ``find_unused_parameters``).
    """

    def __init__(
        self,
        channels: dict[int, int],
        strides: dict[int, int],
        levels: Sequence[int],
        out_levels: Sequence[int],
        width: int,
        bottom_up: bool,
    ) -> None:
        super().__init__()
        levels = sorted(set(levels))
        outs = sorted(set(out_levels))
        if not outs or any(lv not in levels for lv in outs):
            raise ValueError(f"output levels {outs} must be among the fused levels {levels}")
        self.bottom_up = bottom_up
        # bottom-up: every fused level feeds the top output through the chain; top-down only: the
        # levels finer than the finest output feed nothing.
        self.levels = levels if bottom_up else [lv for lv in levels if lv >= outs[0]]
        self.smoothed = [lv for lv in self.levels if lv <= outs[-1]] if bottom_up else outs
        self.out_levels = outs
        self.lateral = nn.ModuleDict({str(lv): _conv_bn(channels[lv], width, 1, relu=False) for lv in self.levels})
        self.smooth = nn.ModuleDict({str(lv): _conv_bn(width, width, 3) for lv in self.smoothed})
        self.down = nn.ModuleDict()
        if bottom_up:
            for finer, coarser in zip(self.smoothed[:-1], self.smoothed[1:]):
                stride = 2 if strides[coarser] > strides[finer] else 1
                self.down[str(coarser)] = _conv_bn(width, width, 3, stride=stride)

    def forward(self, pyramid: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        inner: dict[int, torch.Tensor] = {}
        coarser: torch.Tensor | None = None
        for lv in reversed(self.levels):
            x = self.lateral[str(lv)](pyramid[lv])
            if coarser is not None:
                x = x + F.interpolate(coarser, size=x.shape[-2:], mode="nearest")
            inner[lv] = coarser = x
        fused = {lv: self.smooth[str(lv)](inner[lv]) for lv in self.smoothed}
        if self.bottom_up:
            finer: torch.Tensor | None = None
            for lv in self.smoothed:
                if finer is not None:
                    fused[lv] = fused[lv] + _fit(self.down[str(lv)](finer), fused[lv])
                finer = fused[lv]
        return {lv: fused[lv] for lv in self.out_levels}
