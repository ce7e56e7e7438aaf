"""A shop's photo folder: no annotation files, every photo a shop image.

Two formats read a folder tree of photos (.jpg .jpeg .png .bmp .webp; hidden files and folders
are ignored):

* ``folder``: a photo lying directly in the folder is an item of its own (item id = file name
  without suffix); a sub-folder holding photos is one item with all of them (item id = the
  sub-folder's path, e.g. ``dresses/sku-1042``; category = the folder above it, when there is one).
* ``folder-photos``: every photo is an item of its own (item id = its path without suffix, e.g.
  ``dress/0a1b``; category = the folder it lies in), for trees sorted by category rather than by
  product, such as clothing-small.

Splits: when the folder holds only split folders (``train``, ``val`` or ``validation``, ``test``),
each is read as above into its split. Otherwise every item is ``train`` except a held-out tenth
(``val``; none below 10 items), chosen by a hash of the item id, so the same folder always holds
out the same items, whatever else it holds. Every photo is domain ``shop`` and has no box: the
consumer side comes from generated views (``data.views``).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from mmfl.data.consumer_views import key_digest
from mmfl.data.formats.annotations import IMAGE_SUFFIXES, Problems
from mmfl.data.formats.checks import finish_records
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError

#: Folder name -> split, for a folder that holds nothing but split folders.
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
#: One item in this many is held out as ``val`` when the folder has no split folders.
HOLDOUT_EVERY = 10
HOLDOUT_SPLIT = "val"


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """``folder``: root photos are items, sub-folders with photos are items."""
    return read_tree(root, skip_bad, check_images, photo_items=False)


def read_tree(root: Path, skip_bad: bool, check_images: str, photo_items: bool) -> Catalog:
    """Records of every photo below ``root``; ``photo_items``: every photo is its own item."""
    problems = Problems(skip_bad)
    split_dirs = _split_folders(root)
    records: list[Record] = []
    owners: dict[str, str] = {}
    for folder, split in split_dirs or [(root, None)]:
        records += _records(folder, split, photo_items, owners)
    if not records:
        raise DataError(f"{root}: no photos found (looked for {', '.join(IMAGE_SUFFIXES)} files in it and "
                        "its sub-folders)")
    if not split_dirs:
        records = _hold_out(records)
    records = finish_records(records, problems, check_images)
    return Catalog(records=records, category_names=sorted({r.category for r in records if r.category}),
                   skipped=problems.skipped, name="folder-photos" if photo_items else "folder")


def _split_folders(root: Path) -> list[tuple[Path, str]]:
    """The split folders, when the root holds nothing else that could hold photos."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    folders = [p for p in entries if p.is_dir()]
    photos = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if photos or not folders or any(p.name.lower() not in SPLIT_FOLDERS for p in folders):
        return []
    return sorted((p, SPLIT_FOLDERS[p.name.lower()]) for p in folders)


def _records(folder: Path, split: str | None, photo_items: bool, owners: dict[str, str]) -> list[Record]:
    """Every photo below ``folder`` as a shop record (split ``train`` until :func:`_hold_out`), sorted by path.

    ``owners`` maps each item id seen so far to what makes it (a photo, or a folder of photos):
    two different owners of one id (``a.jpg`` beside ``a.png``, or beside a folder ``a/``, or in
    two split folders) would silently merge two products, so that is an error.
    """
    records = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath).relative_to(folder)
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(dirpath, name)
            if photo_items or here == Path("."):
                item, owner = (here / Path(name).stem).as_posix(), str(path)
                category = None if here == Path(".") else here.as_posix()
            else:
                item, owner = here.as_posix(), dirpath
                category = None if here.parent == Path(".") else here.parent.as_posix()
            if owners.setdefault(item, owner) != owner:
                raise DataError(f"{path}: item id '{item}' is also made by {owners[item]}; rename one of them")
            records.append(Record(path=str(path.resolve()), item_id=item, domain="shop", split=split or "train",
                                  category=category))
    return records


def _hold_out(records: list[Record]) -> list[Record]:
    """Move every tenth item (in a hash order of the ids) to ``val``; none below 10 items."""
    items = list(dict.fromkeys(r.item_id for r in records))
    held = set(sorted(items, key=lambda item: key_digest("holdout", item))[: len(items) // HOLDOUT_EVERY])
    return [replace(r, split=HOLDOUT_SPLIT) if r.item_id in held else r for r in records]
