"""Street2Shop (Where2BuyIt), read as published.

Layout under the root:

* ``meta/json/train_pairs_<cat>.json`` and ``test_pairs_<cat>.json``: street photos, a list of
  ``{"photo": int, "product": int, "bbox": {"left", "top", "width", "height"}}``;
* ``meta/json/retrieval_<cat>.json``: shop photos, a list of ``{"photo": int, "product": int}``;
* ``images/<photo id, 9 digits zero-padded>.jpg`` (``.jpeg`` and ``.png`` are accepted too, in
  that order of preference, since downloaders save whatever the server sent).

Every category with any of the three files must have all three. Street photos become domain
``consumer`` in the split named by their file. Shop photos become domain ``shop``; a product's
shop photos go to ``train`` if the product has train pairs and to ``test`` if it has test pairs
(both when both: each split then has its own gallery). Products in no pair are distractors and go
to ``test``, whose gallery the published protocol searches in full. Item id = ``str(product)``,
category = the category name (evaluation reports per category).

Many of the published photo URLs are dead, so photos missing on disk are counted in
``Catalog.skipped`` and never an error, with or without ``skip_bad``. JSON entries are named
``file[index]`` in messages, the JSON counterpart of a line number.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mmfl.data.formats.annotations import Problems, parse_box, read_json
from mmfl.data.formats.checks import finish_records
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError

META_DIR = Path("meta") / "json"
IMAGE_DIR = "images"
PAIR_SPLITS = ("train", "test")
#: accepted image suffixes, most preferred first
SUFFIXES = (".jpg", ".jpeg", ".png")
_FILE = re.compile(r"(?:(train|test)_pairs|retrieval)_(.+)\.json")


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """Street and shop photo records of every category found under ``meta/json``."""
    problems = Problems(skip_bad)
    meta = root / META_DIR
    categories = find_categories(meta)
    on_disk = list_photos(root / IMAGE_DIR)
    records: list[Record] = []
    for category in categories:
        products: dict[str, set[int]] = {}
        for split in PAIR_SPLITS:
            path = meta / f"{split}_pairs_{category}.json"
            products[split] = set()
            for where, entry in _entries(path):
                photo, product = _ids(entry, where, problems)
                if photo is None or product is None:
                    continue
                products[split].add(product)
                box = _street_box(entry, where, problems)
                if box is None:
                    continue
                file = on_disk.get(f"{photo:09d}")
                if file is None:
                    problems.excluded(where, f"street photo {photo:09d} is missing on disk")
                    continue
                records.append(Record(path=file, item_id=str(product), domain="consumer", split=split,
                                      box=box, category=category, source=where))
        for where, entry in _entries(meta / f"retrieval_{category}.json"):
            photo, product = _ids(entry, where, problems)
            if photo is None or product is None:
                continue
            file = on_disk.get(f"{photo:09d}")
            if file is None:
                problems.excluded(where, f"shop photo {photo:09d} is missing on disk")
                continue
            for split in [s for s in PAIR_SPLITS if product in products[s]] or ["test"]:
                records.append(Record(path=file, item_id=str(product), domain="shop", split=split,
                                      box=None, category=category, source=where))
    return Catalog(
        records=finish_records(records, problems, check_images),
        category_names=categories,
        skipped=problems.skipped,
        name="street2shop",
    )


def find_categories(meta: Path) -> list[str]:
    """Categories named by the JSON files; each needs its train, test and retrieval file."""
    if not meta.is_dir():
        raise DataError(f"{meta}: folder not found (Street2Shop keeps its JSON files in meta/json)")
    names = [m.group(2) for m in map(_FILE.fullmatch, sorted(os.listdir(meta))) if m]
    categories = sorted(set(names))
    if not categories:
        raise DataError(f"{meta}: no train_pairs_<cat>.json, test_pairs_<cat>.json or retrieval_<cat>.json files")
    for category in categories:
        for name in (f"train_pairs_{category}.json", f"test_pairs_{category}.json", f"retrieval_{category}.json"):
            if not (meta / name).is_file():
                raise DataError(f"{meta / name}: file not found (category {category!r} has other files)")
    return categories


def list_photos(folder: Path) -> dict[str, str]:
    """Photo file stem -> absolute path, from one listing of the folder (no stat per photo)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (Street2Shop photos go in images/)")
    found: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            rank = SUFFIXES.index(suffix.lower()) if suffix.lower() in SUFFIXES else -1
            if rank >= 0 and (stem not in found or rank < found[stem][0]):
                found[stem] = (rank, str(folder / entry.name))
    return {stem: path for stem, (_, path) in found.items()}


def _entries(path: Path) -> list[tuple[str, object]]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, found {type(data).__name__}")
    return [(f"{path}[{i}]", entry) for i, entry in enumerate(data)]


def _ids(entry: object, where: str, problems: Problems) -> tuple[int | None, int | None]:
    """(photo, product) as non-negative integers (digit strings accepted), or reported."""
    if not isinstance(entry, dict):
        problems.bad(where, f"expected an object with photo and product, found {type(entry).__name__}")
        return None, None
    out = []
    for key in ("photo", "product"):
        value = entry.get(key)
        if isinstance(value, str) and value.isdecimal():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.bad(where, f"{key} must be a non-negative integer id, found {value!r}")
            return None, None
        out.append(value)
    return out[0], out[1]


def _street_box(entry: dict[str, object], where: str, problems: Problems) -> tuple[int, int, int, int] | None:
    """``bbox`` {left, top, width, height} -> (x1, y1, x2, y2)."""
    bbox = entry.get("bbox")
    if not isinstance(bbox, dict):
        problems.bad(where, "missing bbox {left, top, width, height}")
        return None
    values = [bbox.get(k) for k in ("left", "top", "width", "height")]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        problems.bad(where, f"bbox needs numeric left, top, width, height, found {bbox!r}")
        return None
    left, top, width, height = values
    return parse_box([left, top, left + width, top + height], where, problems)
