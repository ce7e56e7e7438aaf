"""Image -> tensor pipelines. Values stay in [0, 1]: pixel normalisation lives in the model.

Evaluation is a deterministic resize (never a random crop at test time); training adds the
usual re-ID augmentations, all configured from ``input.*``.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

ImageTransform = Callable[[Image.Image], torch.Tensor]


def eval_transform(size: int) -> ImageTransform:
    """Resize to ``size`` x ``size`` and convert to a float tensor in [0, 1]."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ])


def train_transform(
    size: int,
    flip: bool = True,
    crop_scale_min: float = 0.6,
    color_jitter: float = 0.2,
    random_erasing: float = 0.5,
) -> ImageTransform:
    """Random resized crop, horizontal flip, colour jitter and random erasing (each optional)."""
    steps: list = [v2.ToImage(), v2.RandomResizedCrop((size, size), scale=(crop_scale_min, 1.0), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(color_jitter, 0.5) / 4))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0.5))
    return v2.Compose(steps)
