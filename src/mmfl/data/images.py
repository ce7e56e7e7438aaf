"""Decoding images safely: EXIF orientation, any mode to RGB, bombs refused, boxes checked.

Every path into the model (training, eval, index, search, the HTTP service) decodes through
:func:`open_image` so that a truncated JPEG, a CMYK scan or a 16-bit PNG behaves the same
everywhere and fails with one line naming the file.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmfl.data.records import Box
from mmfl.errors import DataError

#: Larger images are refused (a decompression bomb or a mistake, not a garment photo).
MAX_PIXELS = 64_000_000


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an upright RGB image, or raise DataError.

    ``name`` is what error messages call the image (defaults to the path).
    """
    return open_crop(source, None, name)[0]


def open_crop(source: str | Path | bytes, box: Box | None, name: str | None = None,
              min_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB crop of ``box`` (whole image without one) and the whole image's upright size.

    ``box`` is in the full image's upright pixel coordinates and is clamped to it. With
    ``min_size`` > 0 the caller promises to shrink the crop to ``min_size`` or less each way,
    and a JPEG is decoded at the coarsest of its DCT scales (1/2, 1/4, 1/8) at which the crop
    still measures at least ``min_size`` pixels each way: a 12-megapixel phone photo becomes
    a 256 px model input 11x faster, holding 1/64 of the pixels, and that input differs from a
    full decode's by 0.2 of a grey level on average (``bench/decode.py``). Other formats decode
    at full size.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with fp:
                img = Image.open(fp)
                if img.width * img.height > MAX_PIXELS:
                    raise DataError(f"{label}: image is {img.width}x{img.height}, over the {MAX_PIXELS} pixel limit")
                full = _upright_size(img)
                if box is not None:
                    box = check_box(box, *full, label)
                if min_size > 0 and img.format == "JPEG":
                    _decode_no_larger_than_needed(img, full, box, min_size)
                img.load()
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{label}: image too large (decompression bomb refused)") from None
    except UnidentifiedImageError:  # its own text names the file object (<_io.BytesIO object at 0x...>) for an upload
        raise DataError(
            f"{label}: cannot decode image (not a JPEG, PNG, WebP or other supported image format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise DataError(f"{label}: cannot decode image ({reason})") from None
    img = to_rgb(ImageOps.exif_transpose(img))
    if box is not None:
        img = img.crop(_scale_box(box, img.width / full[0], img.height / full[1], img.size))
    return img, full


#: EXIF orientations that turn the stored image by 90 degrees (width and height swap).
_QUARTER_TURNS = (5, 6, 7, 8)


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation, read from the header before any pixel is decoded."""
    orientation = img.getexif().get(0x0112, 1)
    return (img.height, img.width) if orientation in _QUARTER_TURNS else (img.width, img.height)


def _decode_no_larger_than_needed(img: Image.Image, full: tuple[int, int], box: Box | None, min_size: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale keeping ``box`` (or the image) >= ``min_size`` each way."""
    x1, y1, x2, y2 = box if box is not None else (0, 0, *full)
    keep = max(min_size / (x2 - x1), min_size / (y2 - y1))
    if keep < 0.5:  # the decoder's first step is 1/2: nothing to gain above it
        # one factor for both axes, so the stored (not yet upright) orientation does not matter
        img.draft(img.mode, (math.ceil(img.width * keep), math.ceil(img.height * keep)))


def _scale_box(box: Box, sx: float, sy: float, size: tuple[int, int]) -> Box:
    """``box`` from full-resolution coordinates to a reduced decode's, covering at least the same pixels."""
    x1, y1, x2, y2 = box
    return (math.floor(x1 * sx), math.floor(y1 * sy), min(size[0], max(math.ceil(x2 * sx), math.floor(x1 * sx) + 1)),
            min(size[1], max(math.ceil(y2 * sy), math.floor(y1 * sy) + 1)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited on white (shop photos' usual background)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 0 else 1.0
        scale = 65535.0 if top > 255 else 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def check_box(box: Box, width: int, height: int, label: str) -> Box:
    """Clamp a box to the image; a box with no area left inside the image is a DataError."""
    x1, y1, x2, y2 = box
    cx1, cy1 = max(0, min(x1, width)), max(0, min(y1, height))
    cx2, cy2 = max(0, min(x2, width)), max(0, min(y2, height))
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        raise DataError(f"{label}: box {box} has no area inside the {width}x{height} image")
    return cx1, cy1, cx2, cy2


def load_crop(path: str | Path, box: Box | None, name: str | None = None, min_size: int = 0) -> Image.Image:
    """Open an image and crop it to ``box`` (clamped) when given; ``min_size`` as in :func:`open_crop`."""
    return open_crop(path, box, name, min_size)[0]
