"""A light anchor-free garment box head (centre heatmap + size + offset) and its pure-tensor decoding.

Why this shape: a shopper's photo holds one to a few garments, each large, so a CenterNet-style
head on one feature map is enough; it has no anchors to tune and decodes without NMS (3x3
max-pool peak picking), which keeps the whole decode inside an ONNX graph.

Maps, for an input of H x W pixels and a feature map of h x w cells (cell size ``sx = W / w``,
``sy = H / h``):

* ``objectness`` (N, 1, h, w): logit that a garment's centre falls in the cell. One channel for
  every category, because localising "a garment" is shared by all categories and a dataset's
  categories (DeepFashion's 20-odd ``CAT/SUB`` folders) are too many and too thin to train a
  heatmap each;
* ``size`` (N, 2, h, w): log of the box's width and height in cells;
* ``offset`` (N, 2, h, w): where in its cell the centre lies (0..1 each way);
* ``category`` (N, C, h, w) logits, read at a peak (absent when the data has no categories).

A box with centre ``(cx, cy)`` in pixels sits in cell ``(floor(cx / sx), floor(cy / sy))`` with
offset ``(cx / sx - floor(cx / sx), ...)``; :func:`decode_boxes` inverts exactly that.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

#: Objectness prior at initialisation (focal-loss practice: start every cell as unlikely).
PRIOR = 0.1
#: Log-size predictions are clamped to this range (cells) before ``exp``, so decoding never overflows.
LOG_SIZE_RANGE = (-5.0, 5.0)


class BoxMaps(NamedTuple):
    """Raw head outputs for one batch (see the module docstring)."""

    objectness: torch.Tensor
    size: torch.Tensor
    offset: torch.Tensor
    category: torch.Tensor | None


class BoxDetections(NamedTuple):
    """Top-k decoded boxes per image, best first; boxes (N, k, 4) are x1, y1, x2, y2 in input pixels."""

    boxes: torch.Tensor
    scores: torch.Tensor  # (N, k) objectness in [0, 1]
    categories: torch.Tensor  # (N, k) int64 category index (0 when the head has no categories)
    category_scores: torch.Tensor  # (N, k) softmax probability of that category (1 without categories)


class BoxHead(nn.Module):
    """Two 3x3 conv + BN + ReLU layers of ``width`` channels, then 1x1 output convs."""

    def __init__(self, in_channels: int, num_categories: int, width: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or num_categories < 0:
            raise ValueError(f"box head: bad sizes in={in_channels} width={width} categories={num_categories}")
        self.num_categories = num_categories
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.objectness = nn.Conv2d(width, 1, 1)
        self.size = nn.Conv2d(width, 2, 1)
        self.offset = nn.Conv2d(width, 2, 1)
        self.category = nn.Conv2d(width, num_categories, 1) if num_categories > 0 else None
        nn.init.constant_(self.objectness.bias, -math.log((1 - PRIOR) / PRIOR))
        nn.init.constant_(self.offset.bias, 0.5)  # the middle of the cell

    def forward(self, fmap: torch.Tensor) -> BoxMaps:
        hidden = self.body(fmap)
        category = self.category(hidden) if self.category is not None else None
        return BoxMaps(self.objectness(hidden), self.size(hidden), self.offset(hidden), category)


def decode_boxes(maps: BoxMaps, input_size: tuple[int, int], max_boxes: int) -> BoxDetections:
    """The ``max_boxes`` highest centre peaks of each image as boxes in input pixels, best first.

    ``input_size`` is (height, width) of the images the maps came from. A peak is a cell whose
    objectness is the largest in its 3x3 neighbourhood (others are zeroed), which stands in for
    NMS. A cell that is no peak scores 0 (it fills the top-k only when there are fewer peaks).
    Boxes are clamped to the input. Every step is a plain tensor op with shapes fixed by the input
    size, so the function traces into ONNX as it is. Fewer cells than ``max_boxes``: all cells.
    """
    heat = torch.sigmoid(maps.objectness.float())
    n, _, h, w = heat.shape
    is_peak = (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
    k = min(max_boxes, h * w)
    # Non-peaks rank below every peak (heat - 1 < 0) but keep distinct values, so the order of the
    # top-k never hangs on ties between zeros (which PyTorch and ONNX Runtime would break differently).
    ranked, index = (heat - 1.0 + is_peak).flatten(1).topk(k, dim=1)  # (N, k)
    scores = (ranked * is_peak.flatten(1).gather(1, index)).clamp(min=0.0)  # 0 for a non-peak
    rows = torch.div(index, w, rounding_mode="floor")
    cols = index - rows * w
    gather = index.unsqueeze(1).expand(n, 2, k)
    size = maps.size.float().flatten(2).gather(2, gather).clamp(*LOG_SIZE_RANGE).exp()  # (N, 2, k) cells
    offset = maps.offset.float().flatten(2).gather(2, gather)
    height, width = input_size
    sx, sy = width / w, height / h
    cx = (cols.to(heat.dtype) + offset[:, 0]) * sx
    cy = (rows.to(heat.dtype) + offset[:, 1]) * sy
    half_w, half_h = size[:, 0] * sx / 2, size[:, 1] * sy / 2
    boxes = torch.stack([
        (cx - half_w).clamp(0, width), (cy - half_h).clamp(0, height),
        (cx + half_w).clamp(0, width), (cy + half_h).clamp(0, height),
    ], dim=2)
    if maps.category is None:
        categories = torch.zeros_like(index)
        category_scores = torch.ones_like(scores)
    else:
        c = maps.category.shape[1]
        probs = maps.category.float().flatten(2).gather(2, index.unsqueeze(1).expand(n, c, k)).softmax(dim=1)
        category_scores, categories = probs.max(dim=1)
    return BoxDetections(boxes, scores, categories, category_scores)
