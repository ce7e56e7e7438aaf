"""JPEG decoding and the training augmentation on the training device (``data.decode=gpu``).

Why: on an H100 the CPU loader (PIL decode and augmentation in 14 worker processes) fed the
training step at 0.44x of its rate on a GPU-resident batch (docs/BENCHMARKS.md). With this path
the workers only read each file's bytes and its JPEG header (EXIF orientation, upright size, the
box checked against it); the main process decodes the whole batch in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA) and crops, resizes and
augments it with batched tensor ops on the device.

What the model sees matches the CPU pipeline (:func:`mmfl.data.transforms.train_transform`) in
distribution and, with augmentation off, pixel for pixel within JPEG decoders' differences:

* the random resized crop is drawn inside the item's box with torchvision's RandomResizedCrop
  sampling (scale ``[crop_scale_min, 1]``, ratio :data:`~mmfl.data.transforms.CROP_RATIO`),
  in the full-resolution box (the CPU path draws it in a reduced-scale decode of the same box:
  the fractions are the same);
* flip, then the colour jitter of :class:`~mmfl.data.transforms.ColorJitterAffine` (one affine
  colour map per image, the factors drawn the same way; a test holds the two maps equal), then
  random erasing to mid-grey (torchvision's RandomErasing sampling), then rounding to uint8.

Resizing works in float (antialiased bilinear) and rounds once at the end; the CPU path rounds
after the resize and after the jitter, so the two differ by up to a grey level on top of the
decoders' differences. Random draws come from a ``random.Random`` per epoch in the main process
(microseconds per batch, repeatable); only a (B, 26) parameter table goes to the device.

Files nvJPEG would not decode as PIL does (PNG, CMYK JPEGs, anything not a JPEG) are decoded by
the worker on the CPU as before (:func:`mmfl.data.images.open_crop`) and join the batch as pixels;
a batch the device decoder refuses is decoded on the CPU, so a corrupt file still fails with one
line naming it. Without CUDA (or without torchvision's GPU decoder) ``data.decode=gpu`` falls
back to the CPU loader with one notice line.
"""
from __future__ import annotations

import io
import itertools
import math
import random
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from mmfl.data.images import MAX_PIXELS, check_box, open_crop, open_image
from mmfl.data.records import Box
from mmfl.data.transforms import _LUMA, _RGB_TO_YIQ, _YIQ_TO_RGB, CROP_RATIO
from mmfl.errors import DataError

#: JPEG modes nvJPEG decodes to the RGB PIL gives (YCbCr and greyscale); CMYK/YCCK stay on the CPU.
DEVICE_MODES = ("RGB", "L")
#: Random erasing: area fraction, aspect ratio and fill (torchvision's RandomErasing, as the CPU path).
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_VALUE = 128.0
#: The jitter operations in ColorJitterAffine's naming, indexed by the codes used below.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
#: ColorJitterAffine's colour constants as float64 numpy (the jitter maps are built with numpy on the host).
_LUMA_NP = _LUMA.numpy()
_SATURATE = np.broadcast_to(_LUMA_NP, (3, 3))  # row i: the luma weights (every channel becomes the grey)
_RGB_TO_YIQ_NP, _YIQ_TO_RGB_NP = _RGB_TO_YIQ.numpy(), _YIQ_TO_RGB.numpy()
#: Columns of the per-image parameter table: flip, A (3x3), T (3x3), c (3), erase box (top, left, h, w).
_PARAMS = 1 + 9 + 9 + 3 + 4

_noticed: set[str] = set()


def notice(message: str) -> None:
    """Print ``message`` on stderr once per process (training validates every epoch: one line, not one per call)."""
    if message not in _noticed:
        _noticed.add(message)
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker side: bytes, header, box


@dataclass(frozen=True)
class ImageMeta:
    """One image of an :class:`EncodedBatch`: what to crop once its data is decoded.

    ``box`` is in upright pixel coordinates of the decoded data (the whole of it when the record
    has no box). ``pixels`` is ``(h, w)`` when the worker decoded the image itself (then ``data``
    is ``h x w x 3`` RGB bytes, already upright and cropped) and None for JPEG file bytes.
    """

    name: str
    box: Box
    orientation: int = 1
    pixels: tuple[int, int] | None = None

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the box."""
        x1, y1, x2, y2 = self.box
        return y2 - y1, x2 - x1


def read_encoded(path: str | Path, box: Box | None, name: str, min_size: int = 0) -> tuple[bytes, ImageMeta]:
    """A record's data for the device decoder: the JPEG's bytes, or RGB pixels for anything else.

    Only the header is parsed here (a few hundred microseconds). A file the header check does not
    pass is handed to :func:`~mmfl.data.images.open_crop` (``min_size`` as there), which decodes
    it on the CPU or raises the one-line :class:`~mmfl.errors.DataError` the CPU path raises.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror or type(exc).__name__})") from None
    header = _jpeg_header(data)
    if header is not None:
        orientation, upright = header
        crop = check_box(box, *upright, name) if box is not None else (0, 0, *upright)
        return data, ImageMeta(name, crop, orientation)
    img, _ = open_crop(data, box, name, min_size)
    return img.tobytes(), ImageMeta(name, (0, 0, img.width, img.height), 1, (img.height, img.width))


def _jpeg_header(data: bytes) -> tuple[int, tuple[int, int]] | None:
    """(EXIF orientation, upright (width, height)) of a JPEG the device can decode, else None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in DEVICE_MODES or img.width * img.height > MAX_PIXELS:
                return None
            orientation = img.getexif().get(0x0112, 1)
            width, height = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # open_crop says what is wrong, in the CPU path's words
    if orientation not in range(1, 9):
        orientation = 1  # as PIL's exif_transpose: unknown values leave the image as stored
    return orientation, ((height, width) if orientation >= 5 else (width, height))


@dataclass
class EncodedBatch:
    """A batch as the workers hand it over: every image's data back to back in one uint8 tensor
    (one shared-memory block per batch instead of one per image), their metadata, labels, indices."""

    payload: torch.Tensor
    offsets: list[int]
    metas: list[ImageMeta]
    labels: torch.Tensor
    index: torch.Tensor

    def data(self, i: int) -> torch.Tensor:
        """Image ``i``'s bytes (a view of the payload)."""
        return self.payload[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.metas)


def collate_encoded(samples: Sequence[tuple[bytes, ImageMeta, int, int]]) -> EncodedBatch:
    """DataLoader ``collate_fn`` for :class:`~mmfl.data.dataset.EncodedRecordDataset` samples."""
    chunks = [s[0] for s in samples]
    return EncodedBatch(
        payload=torch.frombuffer(bytearray().join(chunks), dtype=torch.uint8),
        offsets=[0, *itertools.accumulate(len(c) for c in chunks)],
        metas=[s[1] for s in samples],
        labels=torch.tensor([s[2] for s in samples], dtype=torch.long),
        index=torch.tensor([s[3] for s in samples], dtype=torch.long),
    )


# ---------------------------------------------------------------- device side: decode, orient, crop


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image I/O (for TorchCodec): still the API here
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as stored, turned upright for its EXIF ``orientation`` (PIL's exif_transpose)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def decode_crops(batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
    """Each image's box as an upright uint8 (3, h, w) tensor on ``device``; the JPEGs in one decode call."""
    jpegs = [i for i, m in enumerate(batch.metas) if m.pixels is None]
    crops: list[torch.Tensor] = []
    decoded = dict(zip(jpegs, _decode_upright(batch, jpegs, device)))
    for i, meta in enumerate(batch.metas):
        if meta.pixels is not None:
            h, w = meta.pixels
            crops.append(batch.data(i).view(h, w, 3).permute(2, 0, 1).to(device, non_blocking=True))
        else:
            x1, y1, x2, y2 = meta.box
            crops.append(decoded[i][:, y1:y2, x1:x2])
    return crops


def _decode_upright(batch: EncodedBatch, jpegs: list[int], device: torch.device) -> list[torch.Tensor]:
    """The whole upright images of ``jpegs``; a batch the decoder refuses goes through PIL, image by image."""
    if not jpegs:
        return []
    try:
        images = _decode([batch.data(i) for i in jpegs], device)
    except RuntimeError as exc:  # nvJPEG returns nothing for a batch with one bad file: find it (or decode them all)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        notice(f"data.decode=gpu: the {device.type} JPEG decoder refused a batch ({reason[:120]}); "
               "decoding such batches on the CPU")
        return [_pil_tensor(batch, i).to(device, non_blocking=True) for i in jpegs]
    return [upright(img, batch.metas[i].orientation) for img, i in zip(images, jpegs)]


def _pil_tensor(batch: EncodedBatch, i: int) -> torch.Tensor:
    """Image ``i`` decoded by PIL, upright (raises the CPU path's one-line DataError for a bad file)."""
    img = open_image(batch.data(i).numpy().tobytes(), batch.metas[i].name)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def resize_crops(crops: Sequence[torch.Tensor], size: int,
                 windows: Sequence[tuple[int, int, int, int]] | None = None) -> torch.Tensor:
    """float32 (B, 3, size, size) in [0, 255]: each crop (or its ``(top, left, h, w)`` window) resized.

    Antialiased bilinear, as torchvision's Resize: one small kernel per image, since the crops
    differ in size.
    """
    out = []
    for i, crop in enumerate(crops):
        if windows is not None:
            top, left, h, w = windows[i]
            crop = crop[:, top:top + h, left:left + w]
        out.append(F.interpolate(crop.unsqueeze(0).float(), size=(size, size), mode="bilinear",
                                 align_corners=False, antialias=True))
    return torch.cat(out)


def eval_images(batch: EncodedBatch, size: int, device: torch.device) -> torch.Tensor:
    """What :func:`~mmfl.data.transforms.eval_transform` makes of each record: float32 in [0, 1], on ``device``."""
    return resize_crops(decode_crops(batch, device), size).div_(255.0)


# ---------------------------------------------------------------- training augmentation


def random_resized_crop(height: int, width: int, scale: tuple[float, float], rng: random.Random,
                        ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop of an ``height`` x ``width`` image, sampled as torchvision's RandomResizedCrop.

    Ten tries at an area fraction uniform in ``scale`` and a log-uniform aspect ratio; then the
    largest centred crop within ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_erase_box(size: int, rng: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of an erased box in a ``size`` x ``size`` image (torchvision's RandomErasing sampling);
    ``h = w = 0`` when none of its ten tries fits."""
    area = size * size
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if h < size and w < size:
            return rng.randint(0, size - h), rng.randint(0, size - w), h, w
    return 0, 0, 0, 0


def jitter_maps(ops: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ColorJitterAffine's colour maps for a batch: ``(A, T, c)`` with ``out = A @ rgb + T @ mean_rgb + c``.

    ``ops`` (B, 4) holds operation codes (indices into :data:`JITTER_OPS`, -1 = none) in the order
    applied, ``factors`` (B, 4) their factors. Contrast blends with the mean grey of the image as
    it is at that point, which is affine in the input's mean colour: carrying that dependence as
    ``T`` lets the host build every map before the image's mean is known (it is computed on the
    device), so nothing waits for the GPU. Float64 numpy: a few dozen array operations per batch.
    """
    b = ops.shape[0]
    eye = np.broadcast_to(np.eye(3), (b, 3, 3))
    a, t, c = eye.copy(), np.zeros((b, 3, 3)), np.zeros((b, 3))
    for step in range(ops.shape[1]):
        op, f = ops[:, step, None, None], factors[:, step]
        fb = f[:, None, None]
        cos, sin = np.cos(-2.0 * np.pi * f), np.sin(-2.0 * np.pi * f)
        rot = np.zeros((b, 3, 3))
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1.0, cos, -sin, sin, cos
        m = np.where((op == 0) | (op == 1), fb * eye, eye)
        m = np.where(op == 2, fb * eye + (1.0 - fb) * _SATURATE, m)
        m = np.where(op == 3, _YIQ_TO_RGB_NP @ rot @ _RGB_TO_YIQ_NP, m)
        blend = np.where(op[:, 0, 0] == 1, 1.0 - f, 0.0)  # contrast: the mean grey's share
        grey_of_mean = np.einsum("k,bkj->bj", _LUMA_NP, a + t)  # mean grey so far = this . mean_rgb + luma . c
        grey_const = c @ _LUMA_NP
        a = m @ a
        t = m @ t + blend[:, None, None] * grey_of_mean[:, None, :]
        c = np.einsum("bij,bj->bi", m, c) + blend[:, None] * grey_const[:, None]
    return a, t, c


@dataclass(frozen=True)
class TrainAugment:
    """The training augmentation of :func:`~mmfl.data.transforms.train_transform`, as batched device ops."""

    size: int
    flip: bool = True
    crop_scale_min: float = 0.6
    color_jitter: float = 0.2
    random_erasing: float = 0.5

    def draw(self, crop_sizes: Sequence[tuple[int, int]],
             rng: random.Random) -> tuple[list[tuple[int, int, int, int]], torch.Tensor]:
        """Per image: the random crop window ``(top, left, h, w)`` inside its box of size (h, w), and
        the (B, 26) float64 parameter table (flip, the jitter map A, T, c, the erased box)."""
        n = len(crop_sizes)
        windows = [random_resized_crop(h, w, (self.crop_scale_min, 1.0), rng) for h, w in crop_sizes]
        table = np.zeros((n, _PARAMS))
        if self.flip:
            table[:, 0] = [rng.random() < 0.5 for _ in range(n)]
        if self.color_jitter > 0:
            a, t, c = jitter_maps(*self._draw_jitter(n, rng))
            table[:, 1:10], table[:, 10:19], table[:, 19:22] = a.reshape(n, 9), t.reshape(n, 9), c
        if self.random_erasing > 0:
            table[:, 22:26] = [random_erase_box(self.size, rng) if rng.random() < self.random_erasing else (0, 0, 0, 0)
                               for _ in range(n)]
        return windows, torch.from_numpy(table)

    def _draw_jitter(self, n: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """Operation order (codes into :data:`JITTER_OPS`) and factors per image, drawn as
        ColorJitterAffine.draw draws them: factors uniform in ``[1 - x, 1 + x]``, hue in
        ``[-hue, hue]`` with ``hue = min(x, 0.5) / 4`` (as train_transform configures it), a random order."""
        spread, hue = self.color_jitter, min(self.color_jitter, 0.5) / 4
        ops, factors = np.empty((n, 4), dtype=np.int64), np.empty((n, 4))
        for i in range(n):
            drawn = [1.0 + spread * (2.0 * rng.random() - 1.0) for _ in range(3)] + [hue * (2.0 * rng.random() - 1.0)]
            order = rng.sample(range(4), 4)
            ops[i], factors[i] = order, [drawn[op] for op in order]
        return ops, factors

    def apply(self, crops: Sequence[torch.Tensor], windows: Sequence[tuple[int, int, int, int]],
              table: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, size, size) on the crops' device: what :func:`~mmfl.data.transforms.train_transform`
        gives on the CPU, for the draws of :meth:`draw`."""
        x = resize_crops(crops, self.size, windows)
        n, device = x.shape[0], x.device
        params = table.to(torch.float32).to(device, non_blocking=True)
        if self.flip:
            x = torch.where(params[:, 0].bool()[:, None, None, None], x.flip(-1), x)
        if self.color_jitter > 0:
            mean = x.mean(dim=(2, 3))
            shift = (params[:, 10:19].view(n, 3, 3) @ mean.unsqueeze(-1)).squeeze(-1) + params[:, 19:22]
            x = torch.einsum("bij,bjhw->bihw", params[:, 1:10].view(n, 3, 3), x) + shift[:, :, None, None]
            x = x.clamp_(0.0, 255.0).round_()  # PIL quantises the jittered image before erasing
        if self.random_erasing > 0:
            pos = torch.arange(self.size, device=device, dtype=torch.float32)
            top, left, h, w = (params[:, 22 + k:23 + k] for k in range(4))
            rows = (pos >= top) & (pos < top + h)
            cols = (pos >= left) & (pos < left + w)
            x = x.masked_fill((rows[:, :, None] & cols[:, None, :]).unsqueeze(1), ERASE_VALUE)
        return x.round_().clamp_(0.0, 255.0).to(torch.uint8)

    def __call__(self, crops: Sequence[torch.Tensor], rng: random.Random) -> torch.Tensor:
        windows, table = self.draw([(c.shape[1], c.shape[2]) for c in crops], rng)
        return self.apply(crops, windows, table)


class DeviceBatches:
    """Iterates ``(uint8 images on the device, labels, indices)`` as the CPU DataLoader iterates its batches.

    ``loader`` yields :class:`EncodedBatch` (workers read bytes); each batch is decoded and
    augmented on ``device`` with draws from ``random.Random(seed)``, so an epoch is repeatable.
    """

    def __init__(self, loader: DataLoader, device: torch.device, augment: TrainAugment, seed: int):
        self.loader, self.device, self.augment, self.seed = loader, device, augment, seed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        rng = random.Random(f"gpu-augment:{self.seed}")
        for batch in self.loader:
            windows, table = self.augment.draw([m.crop_size for m in batch.metas], rng)
            yield self.augment.apply(decode_crops(batch, self.device), windows, table), batch.labels, batch.index


# ---------------------------------------------------------------- choosing the path


@lru_cache(maxsize=None)
def device_decode_problem(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on ``device`` (None when they can): tried once per device and process."""
    if device.type != "cuda":
        return "no CUDA device" if not torch.cuda.is_available() else f"the model runs on the {device.type}"
    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(probe, "JPEG")
    try:
        _decode([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)], device)
    except (RuntimeError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"torchvision cannot decode JPEG on {device} ({reason[:120]})"
    return None


def pick_decode_device(choice: str, device: torch.device) -> torch.device | None:
    """Where ``data.decode=choice`` decodes JPEGs for a model on ``device``: the device, or None for the CPU workers.

    ``gpu`` on a machine that cannot decode there says so once on stderr and takes the CPU path,
    so one config runs on a laptop and on a GPU node.
    """
    if choice != "gpu":
        return None
    problem = device_decode_problem(torch.device(device))
    if problem is not None:
        notice(f"data.decode=gpu: {problem}; decoding on the CPU workers")
        return None
    return torch.device(device)
