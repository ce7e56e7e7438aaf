"""Photos as the model sees them: the one path from a caller's image to a batch of model input.

Every photo mmfl embeds (the gallery in ``mmfl index`` and ``mmfl eval`` through
:func:`mmfl.extract.extract_features`, :class:`mmfl.Retriever`, searches and live adds in
:mod:`mmfl.index.search` and :mod:`mmfl.catalog`) is checked, decoded, turned upright by its EXIF
orientation, cropped to its box and resized here, so one photo gets one vector whichever door it
came through. The pixels come from :func:`mmfl.data.images.open_crop` (the decoder of training)
and :func:`mmfl.data.transforms.eval_transform`; :class:`InputDataset` lets a DataLoader batch them
in worker processes. Importing this module does not import torch.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from mmfl.data.records import Box
from mmfl.errors import DataError, MMFLError

if TYPE_CHECKING:
    import torch

#: What one image may be: a file path, the encoded file's bytes, or a decoded PIL image.
ImageInput = Union[str, "os.PathLike[str]", bytes, Image.Image]
#: A garment box ``(x1, y1, x2, y2)`` in the full photo's pixels, or None for the whole photo.
BoxInput = Union[Sequence[float], None]


def check_images(images: Any) -> list[ImageInput]:
    """``images`` as a list, each a path, bytes or PIL image; anything else is one MMFLError line.

    A lone ``str``/path/bytes/PIL image is refused rather than guessed at: iterating a path
    string would otherwise "embed" one image per character.
    """
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise MMFLError(f"images: expected a list of images, got one {type(images).__name__}; "
                        "pass [image] for a single one")
    if not isinstance(images, Sequence):
        raise MMFLError(f"images: expected a list of paths, bytes or PIL images, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, (str, bytes, os.PathLike, Image.Image)):
            raise MMFLError(f"images[{i}]: expected a path, bytes or a PIL image, got {type(image).__name__}")
    return list(images)


def check_boxes(boxes: Any, count: int) -> list[Box | None]:
    """One integer box or None per image; a wrong container, length or box is one MMFLError line.

    Coordinates are rounded to whole pixels (as ``--bbox`` is); whether the box lies inside the
    photo is checked when the photo is decoded, where its size is known.
    """
    if boxes is None:
        return [None] * count
    if isinstance(boxes, np.ndarray):  # a detector's (N, 4) array
        boxes = boxes.tolist()
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
        raise MMFLError(f"boxes: expected a list with one (x1, y1, x2, y2) or None per image, "
                        f"got {type(boxes).__name__}")
    if len(boxes) != count:
        raise MMFLError(f"boxes: {len(boxes)} boxes for {count} images (give one box or None per image)")
    return [None if box is None else check_box_value(box, f"boxes[{i}]") for i, box in enumerate(boxes)]


def check_box_value(box: Any, label: str) -> Box:
    """``(x1, y1, x2, y2)`` as whole pixels with x2 > x1 and y2 > y1, or one MMFLError line naming ``label``."""
    if isinstance(box, np.ndarray):
        box = box.tolist()
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise MMFLError(f"{label}: expected (x1, y1, x2, y2), got {box!r}")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise MMFLError(f"{label}: expected four numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise MMFLError(f"{label}: {box!r} has a coordinate that is not a finite number")
    x1, y1, x2, y2 = (int(round(v)) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise MMFLError(f"{label}: {box!r} is empty (x2 must exceed x1 and y2 must exceed y1)")
    return x1, y1, x2, y2


def model_input_size(model: Any) -> int:
    """The square input size the checkpoint was trained at (queries and gallery are resized to it)."""
    return int(model.meta["config"]["input"]["size"])


def open_photo(source: ImageInput, box: Box | None, name: str, min_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB crop of ``box`` (the whole photo without one) and the whole photo's upright size.

    Paths and bytes go through :func:`~mmfl.data.images.open_crop` exactly as gallery images
    and service uploads do (a JPEG decoded at a reduced scale when ``min_size`` allows). A PIL
    image is already decoded: it gets the same EXIF turn and RGB conversion, so ``Image.open(p)``
    and ``p`` give the same crop. The garment detector reads whole photos through this too.
    """
    from mmfl.data.images import check_box, open_crop, to_rgb

    if not isinstance(source, Image.Image):
        return open_crop(source, box, name, min_size=min_size)
    try:
        image = to_rgb(ImageOps.exif_transpose(source))
    except (OSError, ValueError) as exc:
        raise DataError(f"{name}: cannot use image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    full = image.size
    if box is not None:
        image = image.crop(check_box(box, image.width, image.height, name))
    return image, full


def model_input(source: ImageInput, box: Box | None, size: int, name: str) -> tuple["torch.Tensor", tuple[int, int]]:
    """One photo as the model sees it (upright RGB, cropped to ``box``, resized to ``size``; C, H, W in
    [0, 1]) and the photo's upright (width, height).

    The one way a photo becomes model input (see the module docstring for who calls it).
    """
    from mmfl.data.transforms import eval_transform

    crop, full = open_photo(source, box, name, min_size=size)
    return eval_transform(size)(crop), full


def decoded_input(image: Image.Image, full: tuple[int, int], box: Box | None, size: int, name: str) -> "torch.Tensor":
    """:func:`model_input` of a photo already decoded whole by :func:`open_photo` (``image``, upright RGB, maybe at
    a reduced JPEG scale, of a photo ``full`` pixels upright); ``box`` is in the full photo's pixels.

    For a search whose box the garment detector chooses: the detector and the crop read the same
    decode. Without a reduced scale, the tensor equals :func:`model_input`'s of the same box.
    """
    from mmfl.data.images import _scale_box, check_box  # open_crop's own box scaling, so the crops agree
    from mmfl.data.transforms import eval_transform

    if box is not None:
        box = check_box(box, *full, name)
        image = image.crop(_scale_box(box, image.width / full[0], image.height / full[1], image.size))
    return eval_transform(size)(image)


def image_name(source: ImageInput, index: int) -> str:
    """What an error calls an image: its path, or its position for bytes and PIL images."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source))
    return f"images[{index}] ({'bytes' if isinstance(source, bytes) else 'PIL image'})"


class InputDataset:
    """Map-style dataset of :func:`model_input` tensors, so a DataLoader can decode them in worker processes.

    ``names`` are what errors call the photos (default: :func:`image_name`).
    """

    def __init__(self, sources: Sequence[ImageInput], boxes: Sequence[Box | None], size: int,
                 names: Sequence[str] | None = None) -> None:
        self.sources, self.boxes, self.size = list(sources), list(boxes), size
        self.names = list(names) if names is not None else [image_name(s, i) for i, s in enumerate(self.sources)]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> "torch.Tensor":
        return model_input(self.sources[index], self.boxes[index], self.size, self.names[index])[0]
