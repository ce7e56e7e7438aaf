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
}
FORMATS: list[str] = list(_MODULES)


def read_dataset(root: str | Path, fmt: str, skip_bad: bool = False, check_images: str = "header") -> Catalog:
    """Read the dataset at ``root`` in format ``fmt``.

    ``check_images``: ``"none"`` (files exist), ``"header"`` (sizes read from headers, boxes
    clamped to them) or ``"decode"`` (every image decoded). Bad entries raise
    :class:`~mmfl.errors.DataError` naming file and line, or with ``skip_bad`` are counted in
    ``Catalog.skipped``.
    """
    if fmt not in _MODULES:
        raise DataError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMATS)})")
    if check_images not in CHECK_MODES:
        raise DataError(f"check_images must be one of {', '.join(CHECK_MODES)}, got {check_images!r}")
    path = Path(os.path.abspath(os.path.expanduser(str(root))))
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if fmt != "csv" and not path.is_dir():
        raise DataError(f"{path}: expected the {fmt} dataset folder, found a file")
    module = importlib.import_module(f"mmfl.data.formats.{_MODULES[fmt]}")
    return module.read(path, skip_bad, check_images)
