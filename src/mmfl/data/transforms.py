"""Image -> tensor pipelines. Values stay in [0, 1]: pixel normalisation lives in the model.

Evaluation is a deterministic resize (never a random crop at test time); training adds the
usual re-ID augmentations, all configured from ``input.*``. Training transforms work on the PIL
image until the last moment: crop, flip and colour jitter are C loops there, while torchvision's
tensor ColorJitter (its hue step converts every pixel to HSV and back) made a 320 px image cost
about 10 ms on one core and starved an H100 (docs/BENCHMARKS.md, "Training augmentation").
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image, ImageStat
from torchvision.transforms import v2

ImageTransform = Callable[[Image.Image], torch.Tensor]


def eval_transform(size: int) -> ImageTransform:
    """Resize to ``size`` x ``size`` and convert to a float tensor in [0, 1]."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ])


#: ITU-R 601 luma weights: the grey that contrast and saturation blend towards (as torchvision's).
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
#: RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class ColorJitterAffine:
    """Random brightness, contrast, saturation and hue as ONE affine colour map, applied by PIL.

    Each of the four is linear in RGB (brightness scales; saturation blends with the luma grey;
    contrast blends with the image's mean grey, a constant; hue rotates the chroma plane of
    YIQ), so their composition, in a random order per image like torchvision's ColorJitter, is
    a 3 x 4 matrix, and ``Image.convert("RGB", matrix)`` applies it in one pass over the pixels
    (a whole training image at 320 px costs 3x less than with the tensor version:
    ``bench/augment.py``). Factors are drawn like torchvision's (uniform in
    ``[1 - x, 1 + x]``, hue in ``[-hue, hue]`` of a full turn). Two differences, by design:
    values are clipped to [0, 255] once at the end rather than after every step, and hue is a
    rotation of YIQ's chroma plane rather than an HSV shift: it keeps luma and chroma magnitude
    and turns every colour the same way (red towards yellow for a positive factor), where HSV
    hue is piecewise; the two agree in direction, not pixel for pixel.
    Randomness comes from torch's generator, so DataLoader worker seeding makes it repeatable.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
            raise ValueError("ColorJitterAffine: factors must be >= 0 and hue in [0, 0.5]")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def draw(self) -> tuple[list[str], dict[str, float]]:
        """A random order of the enabled operations and their factors (hue: a fraction of a turn)."""
        spreads = {"brightness": self.brightness, "contrast": self.contrast, "saturation": self.saturation}
        factors = {k: 1.0 + v * (2.0 * float(torch.rand(())) - 1.0) for k, v in spreads.items() if v > 0}
        if self.hue > 0:
            factors["hue"] = self.hue * (2.0 * float(torch.rand(())) - 1.0)
        order = [("brightness", "contrast", "saturation", "hue")[i] for i in torch.randperm(4).tolist()]
        return [op for op in order if op in factors], factors

    @staticmethod
    def compose(order: list[str], factors: dict[str, float],
                mean_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, t)`` with ``out = A @ rgb + t``: the operations in ``order`` for an image of mean colour ``mean_rgb``."""
        a, t = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for op in order:
            f = factors[op]
            if op == "brightness":
                a, t = f * a, f * t
            elif op == "contrast":
                mean_grey = float(_LUMA @ (a @ mean_rgb + t))  # torchvision: mean of the current grey image
                a, t = f * a, f * t + (1.0 - f) * mean_grey
            else:
                if op == "saturation":
                    m = f * torch.eye(3, dtype=torch.float64) + (1.0 - f) * _LUMA.unsqueeze(0).expand(3, 3)
                else:  # hue: rotate the chroma plane by f of a full turn (clockwise in I-Q is HSV's red -> green)
                    cos, sin = math.cos(-2.0 * math.pi * f), math.sin(-2.0 * math.pi * f)
                    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=torch.float64)
                    m = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
                a, t = m @ a, m @ t
        return a, t

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            raise TypeError("ColorJitterAffine expects an RGB PIL image")
        order, factors = self.draw()
        a, t = self.compose(order, factors, torch.tensor(ImageStat.Stat(img).mean, dtype=torch.float64))
        return img.convert("RGB", matrix=tuple(torch.cat([a, t.unsqueeze(1)], dim=1).flatten().tolist()))


#: Aspect ratios of the training crop (torchvision's default range).
CROP_RATIO = (3 / 4, 4 / 3)


def train_source_size(size: int, crop_scale_min: float) -> int:
    """The shorter source side above which :func:`train_transform` only ever shrinks its random crop.

    The crop keeps at least ``crop_scale_min`` of the area at an aspect ratio of at least 3/4, so
    each of its sides is at least ``sqrt(crop_scale_min * 3/4)`` of the source's shorter side;
    decoding a photo larger than this (``RecordDataset(min_size=...)``) buys nothing.
    """
    return math.ceil(size / math.sqrt(crop_scale_min * min(CROP_RATIO)))


def train_transform(
    size: int,
    flip: bool = True,
    crop_scale_min: float = 0.6,
    color_jitter: float = 0.2,
    random_erasing: float = 0.5,
) -> ImageTransform:
    """Random resized crop, horizontal flip, colour jitter (on the PIL image), random erasing; a uint8 tensor.

    The result stays uint8 (C, H, W): a quarter of the bytes of float32 through the worker queue,
    the pinned-memory copy and the host-to-device transfer. :func:`to_float_images` scales the
    batch to [0, 1] on the training device. Erased boxes are mid-grey (128).
    """
    steps: list = [v2.RandomResizedCrop((size, size), scale=(crop_scale_min, 1.0), ratio=CROP_RATIO, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(ColorJitterAffine(color_jitter, color_jitter, color_jitter, min(color_jitter, 0.5) / 4))
    steps.append(v2.ToImage())
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=128))
    return v2.Compose(steps)


def to_float_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A uint8 batch from :func:`train_transform` as float32 in [0, 1], where it lies (do it on the GPU)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(dtype=torch.float32, memory_format=layout).mul_(1.0 / 255.0)
