"""Decoding no larger than needed (``open_crop(min_size=...)``): the sizes the JPEG decoder gives,
boxes and EXIF orientation mapped onto the reduced image, and pixels that match a full decode."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from mmfl.data.images import open_crop, open_image
from mmfl.data.transforms import CROP_RATIO, eval_transform, train_source_size
from mmfl.errors import DataError


def photo(width: int, height: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields with a few sharp shapes (no noise JPEG would smear)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    rgb[(x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.02] = (0.9, 0.1, 0.1)
    rgb[(np.abs(x - 0.7) < 0.1) & (np.abs(y - 0.5) < 0.2)] = (0.1, 0.1, 0.8)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def save_jpeg(img: Image.Image, path: Path, orientation: int = 1) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def model_view(img: Image.Image, size: int) -> torch.Tensor:
    return eval_transform(size)(img)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_jpeg(photo(1600, 1200), tmp_path_factory.mktemp("images") / "big.jpg")


def test_whole_photo_decodes_at_the_coarsest_scale_that_keeps_min_size(big: Path) -> None:
    small, full = open_crop(big, None, min_size=128)
    assert full == (1600, 1200) and small.size == (200, 150)  # 1/8: both sides still >= 128
    assert open_crop(big, None, min_size=160)[0].size == (400, 300)  # 1/8 would give 150 < 160: 1/4
    assert open_crop(big, None, min_size=700)[0].size == (1600, 1200)  # 1/2 would give 600 < 700: full
    reference = model_view(open_image(big), 128)
    assert (model_view(small, 128) - reference).abs().mean() < 0.01  # what the model sees barely changes


def test_box_is_mapped_onto_the_reduced_decode(big: Path) -> None:
    box = (400, 300, 1200, 1100)  # 800 x 800 of the full image
    crop, full = open_crop(big, box, min_size=128)
    assert full == (1600, 1200) and crop.size == (200, 200)  # 1/4: the box stays >= 128 each way
    reference = model_view(open_image(big).crop(box), 128)
    assert (model_view(crop, 128) - reference).abs().mean() < 0.01


def test_exif_rotated_photo_reports_its_upright_size_and_crops_upright_coordinates(tmp_path: Path) -> None:
    upright = photo(1200, 1600)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back upright
    path = save_jpeg(stored, tmp_path / "rotated.jpg", orientation=6)
    box = (100, 700, 1100, 1500)
    crop, full = open_crop(path, box, min_size=100)
    assert full == (1200, 1600) and 125 <= crop.width <= 126 and 100 <= crop.height <= 101  # 1/8, edges kept
    reference = model_view(upright.crop(box), 100)
    assert (model_view(crop, 100) - reference).abs().mean() < 0.015


def test_other_formats_and_small_photos_decode_in_full(tmp_path: Path, big: Path) -> None:
    png = tmp_path / "big.png"
    photo(800, 600).save(png)
    assert open_crop(png, None, min_size=64)[0].size == (800, 600)
    exact, _ = open_crop(big, None, min_size=1200)  # no reduction possible: the very same pixels
    assert np.array_equal(np.asarray(exact), np.asarray(open_image(big)))


def test_box_without_area_is_refused_before_decoding(big: Path) -> None:
    with pytest.raises(DataError, match=r"big\.jpg: box \(1700, 0, 1800, 50\) has no area inside the 1600x1200"):
        open_crop(big, (1700, 0, 1800, 50), min_size=64)


def test_corrupt_jpeg_is_one_line_even_when_reduced(tmp_path: Path) -> None:
    buf = io.BytesIO()
    photo(800, 600).save(buf, "JPEG")
    with pytest.raises(DataError, match="uploaded image: cannot decode image"):
        open_crop(buf.getvalue()[:2000], None, min_size=64)


@pytest.mark.parametrize("size, scale_min", [(320, 0.6), (128, 0.25), (256, 1.0)])
def test_train_source_size_is_where_the_random_crop_stops_upsampling(size: int, scale_min: float) -> None:
    side = train_source_size(size, scale_min)
    torch.manual_seed(0)
    for w, h in ((side, side), (side, 2 * side), (3 * side, side)):
        img = Image.new("RGB", (w, h))
        crops = [RandomResizedCrop.get_params(img, [scale_min, 1.0], list(CROP_RATIO)) for _ in range(2000)]
        smallest = min(min(ch, cw) for _, _, ch, cw in crops)
        assert smallest >= size - 1  # whole pixels: rounding may take one off
    assert math.sqrt(scale_min * 0.75) * side < size + 1  # and the bound is tight, not generous
