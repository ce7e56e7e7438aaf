"""Dataset readers: each published layout in, one :class:`~mmfl.data.records.Catalog` out.

One module per format; they share the list-file parsing and problem reporting of
:mod:`~mmfl.data.formats.annotations` and end with the same image and box checks
(:mod:`~mmfl.data.formats.checks`), so every format validates, de-duplicates and reports skips
the same way.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from mmfl.data.formats.checks import CHECK_MODES
from mmfl.data.records import Catalog
from mmfl.errors import DataError

#: format name -> module under mmfl.data.formats
_MODULES = {
    "deepfashion-c2s": "deepfashion_c2s",
    "inshop": "inshop",
    "street2shop": "street2shop",
    "deepfashion2": "deepfashion2",
    "csv": "csv_table",
    "folder": "folder",
    "folder-photos": "folder_photos",
}
FORMATS: list[str] = list(_MODULES)
#: Formats without annotations (a shop's photo folder): unreadable photos are skipped by default.
FOLDER_FORMATS = ("folder", "folder-photos")


def read_dataset(root: str | Path, fmt: str, skip_bad: bool | None = None, check_images: str | None = None) -> Catalog:
    """Read the dataset at ``root`` in format ``fmt``.

    ``check_images``: ``"none"`` (files exist), ``"header"`` (sizes read from headers, boxes
    clamped to them), ``"decode"`` (every image decoded) or None: ``decode`` when skipping bad
    images (one that breaks only when decoded, a truncated JPEG, is then a counted skip rather
    than a crash mid-run), else ``header``. Bad entries raise :class:`~mmfl.errors.DataError`
    naming file and line, or with ``skip_bad`` are counted in ``Catalog.skipped``; ``skip_bad``
    None is the format's default (:func:`skips_bad`).
    """
    if fmt not in _MODULES:
        raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")
    skip_bad = skips_bad(skip_bad, fmt)
    check_images = check_images or ("decode" if skip_bad else "header")
    if check_images not in CHECK_MODES:
        raise DataError(f"check_images must be one of {', '.join(CHECK_MODES)}, got {check_images!r}")
    path = Path(os.path.abspath(os.path.expanduser(str(root))))
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if fmt in FOLDER_FORMATS and not path.is_dir():
        raise DataError(f"{path}: expected a folder of photos, found a file")
    if fmt != "csv" and not path.is_dir():
        raise DataError(f"{path}: expected the {fmt} dataset folder, found a file")
    module = importlib.import_module(f"mmfl.data.formats.{_MODULES[fmt]}")
    return module.read(path, skip_bad, check_images)


def skips_bad(setting: bool | str | None, fmt: str) -> bool:
    """Whether bad entries are skipped: ``setting`` when it is a bool, else (``auto``/None) the format's
    default: a shop's photo folder skips the odd broken download, an annotated dataset refuses it."""
    if isinstance(setting, bool):
        return setting
    return fmt in FOLDER_FORMATS
