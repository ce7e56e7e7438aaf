"""Decoding images safely: EXIF orientation, any mode to RGB, bombs refused, boxes checked.

Every path into the model (training, eval, index, search, the HTTP service) decodes through
:func:`open_image` so that a truncated JPEG, a CMYK scan or a 16-bit PNG behaves the same
everywhere and fails with one line naming the file.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mmfl.data.records import Box
from mmfl.errors import DataError

#: Larger images are refused (a decompression bomb or a mistake, not a garment photo).
MAX_PIXELS = 64_000_000


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) to an upright RGB image, or raise DataError.

    ``name`` is what error messages call the image (defaults to the path).
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
                img.load()
    except FileNotFoundError:
        raise DataError(f"{label}: file not found") from None
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{label}: image too large (decompression bomb refused)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise DataError(f"{label}: cannot decode image ({reason})") from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


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


def load_crop(path: str | Path, box: Box | None, name: str | None = None) -> Image.Image:
    """Open an image and crop it to ``box`` (clamped) when given."""
    label = name or str(path)
    img = open_image(path, label)
    if box is not None:
        img = img.crop(check_box(box, img.width, img.height, label))
    return img
