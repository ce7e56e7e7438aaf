"""``folder-photos``: a photo folder where every photo is an item of its own (see :mod:`.folder`)."""
from __future__ import annotations

from pathlib import Path

from mmfl.data.formats.folder import read_tree
from mmfl.data.records import Catalog


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """Every photo below ``root`` is one item; the folder it lies in is its category."""
    return read_tree(root, skip_bad, check_images, photo_items=True)
