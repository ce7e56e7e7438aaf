"""Whole photos with every garment box they hold, and the box head's training targets.

Every dataset reader already gives each record a box in its photo's pixels (DeepFashion C2S,
DeepFashion2 items, Street2Shop, CSV ``x1..y2``, generated data, the real-photo views); a photo
named by several records (several items of a DeepFashion2 photo, or one image listed under
several splits' pairs) is one sample here with all its distinct boxes. Photos without any box
are left out: nothing says where their garment is.

Targets follow :mod:`mmfl.models.box_head`: a Gaussian peak of 1.0 at each box's centre cell
(spread a sixth of the box's extent each way, at least half a cell), and for each box its cell
index, log size in cells, centre offset within the cell and category.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmfl.data.images import open_crop
from mmfl.data.records import Box, Record

#: Boxes per photo the targets hold (DeepFashion2's busiest photos have 6-8 items); extra ones are dropped.
MAX_OBJECTS = 8


@dataclass(frozen=True)
class BoxImage:
    """One photo: its path, its distinct boxes (original pixels) and their category indices (-1 unknown)."""

    path: str
    boxes: tuple[Box, ...]
    categories: tuple[int, ...]
    source: str = ""


def box_images(records: Sequence[Record], category_names: Sequence[str]) -> list[BoxImage]:
    """Group ``records`` by photo (first-seen order); records without a box are not used."""
    index = {name: i for i, name in enumerate(category_names)}
    grouped: dict[str, dict[Box, int]] = {}
    sources: dict[str, str] = {}
    for r in records:
        if r.box is None:
            continue
        boxes = grouped.setdefault(r.path, {})
        boxes.setdefault(r.box, index.get(r.category or "", -1))
        sources.setdefault(r.path, r.source)
    return [BoxImage(path, tuple(boxes), tuple(boxes.values()), sources[path]) for path, boxes in grouped.items()]


def make_targets(boxes: np.ndarray, categories: Sequence[int], size: int, grid: tuple[int, int],
                 max_objects: int = MAX_OBJECTS) -> dict[str, torch.Tensor]:
    """Targets for boxes (K, 4) given in the ``size`` x ``size`` network input's pixels.

    Keys: ``heatmap`` (1, h, w); per object slot (``max_objects``): ``index`` (cell ``row * w + col``),
    ``mask`` (1 where a box is), ``size`` (2, log width/height in cells), ``offset`` (2, in 0..1),
    ``category`` (-1 unknown or empty slot).
    """
    h, w = grid
    sx, sy = size / w, size / h
    heat = np.zeros((h, w), np.float32)
    index = np.zeros(max_objects, np.int64)
    mask = np.zeros(max_objects, np.float32)
    log_size = np.zeros((max_objects, 2), np.float32)
    offset = np.zeros((max_objects, 2), np.float32)
    cats = np.full(max_objects, -1, np.int64)
    cols_grid, rows_grid = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    for slot, (box, cat) in enumerate(zip(boxes[:max_objects], categories)):
        x1, y1, x2, y2 = (float(v) for v in box)
        bw, bh = max(x2 - x1, 1.0) / sx, max(y2 - y1, 1.0) / sy  # in cells
        cx, cy = (x1 + x2) / 2 / sx, (y1 + y2) / 2 / sy
        col, row = min(max(int(math.floor(cx)), 0), w - 1), min(max(int(math.floor(cy)), 0), h - 1)
        sig_x, sig_y = max(bw / 6, 0.5), max(bh / 6, 0.5)
        peak = np.exp(-((cols_grid[None, :] - col) ** 2) / (2 * sig_x**2)
                      - ((rows_grid[:, None] - row) ** 2) / (2 * sig_y**2))
        heat = np.maximum(heat, peak.astype(np.float32))
        index[slot], mask[slot], cats[slot] = row * w + col, 1.0, cat
        log_size[slot] = (math.log(bw), math.log(bh))
        offset[slot] = (cx - col, cy - row)
    return {
        "heatmap": torch.from_numpy(heat[None]), "index": torch.from_numpy(index), "mask": torch.from_numpy(mask),
        "size": torch.from_numpy(log_size), "offset": torch.from_numpy(offset), "category": torch.from_numpy(cats),
    }


def load_photo(path: str, size: int, name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The whole photo resized to ``size`` x ``size`` as a float (3, size, size) tensor in [0, 1], and
    its upright (width, height). A large JPEG decodes at a reduced DCT scale (:func:`open_crop`)."""
    img, full = open_crop(path, None, name, min_size=size)
    return photo_tensor(img, size), full


def photo_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A PIL image stretched to ``size`` x ``size`` (the detector's input frame) as a float tensor in [0, 1]."""
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class BoxDataset(Dataset):
    """Yields ``(image, targets, full_size, index)``: the photo at ``size``, :func:`make_targets` of its
    boxes (mirrored with the image when ``flip`` draws it), its upright (width, height) and its index."""

    def __init__(self, images: Sequence[BoxImage], size: int, grid: tuple[int, int], flip: bool = False,
                 seed: int = 0) -> None:
        self.images = list(images)
        self.size, self.grid, self.flip = size, grid, flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Flips are drawn from ``(seed, epoch, index)``: the same run repeats its augmentation."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int]:
        item = self.images[i]
        name = f"{item.path} ({item.source})" if item.source else item.path
        image, (width, height) = load_photo(item.path, self.size, name)
        boxes = np.array(item.boxes, np.float32).reshape(-1, 4) * np.array(
            [self.size / width, self.size / height] * 2, np.float32)
        if self.flip and np.random.default_rng((self.seed, self.epoch, i)).random() < 0.5:
            image = image.flip(-1)
            boxes = np.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], axis=1)
        targets = make_targets(boxes, item.categories, self.size, self.grid)
        return image, targets, torch.tensor([width, height]), i
