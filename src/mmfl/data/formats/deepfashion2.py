"""DeepFashion2, read as published: one JSON annotation per image.

Layout: ``<split>/annos/<name>.json`` next to ``<split>/image/<name>.jpg`` for the split folders
``train``, ``validation`` (split ``val``) and ``test`` (only when its annotations are present).
Each JSON holds ``source`` (``shop`` | ``user``), ``pair_id`` and ``item1``, ``item2``, … with
``category_id``, ``category_name``, ``style`` and ``bounding_box`` ``[x1, y1, x2, y2]``.

One record per garment, cropped by its box: ``user`` -> domain ``consumer`` (the queries),
``shop`` -> ``shop``. Two garments match when they share ``pair_id`` and ``style``, hence item id
``f"{pair_id}_{style}"``. Style 0 marks a garment with no counterpart in the other domain; it can
never form a positive pair, so it is left out of retrieval and counted in ``Catalog.skipped``
(that is the data, not an error). Messages name ``file.json:itemN``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mmfl.data.formats.annotations import Problems, parse_box, read_json
from mmfl.data.formats.checks import finish_records
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError

#: split folder -> split name
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}
SOURCES = {"user": "consumer", "shop": "shop"}
_ITEM_KEY = re.compile(r"item([0-9]+)")


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """Garment records of every split folder that has an ``annos`` folder."""
    problems = Problems(skip_bad)
    splits = [(folder, split) for folder, split in SPLIT_FOLDERS.items() if (root / folder / "annos").is_dir()]
    if not splits:
        raise DataError(f"{root}: no train/annos, validation/annos or test/annos folder (DeepFashion2 layout)")
    records: list[Record] = []
    categories: dict[int, str] = {}
    for folder, split in splits:
        annos, images = root / folder / "annos", root / folder / "image"
        for name in sorted(n for n in os.listdir(annos) if n.endswith(".json")):
            path = annos / name
            try:
                data = read_json(path)
            except DataError as exc:
                problems.report(exc)
                continue
            image = str(images / f"{name[:-len('.json')]}.jpg")
            records.extend(_garments(data, path, image, split, categories, problems))
    return Catalog(
        records=finish_records(records, problems, check_images),
        category_names=[categories[k] for k in sorted(categories)],
        skipped=problems.skipped,
        name="deepfashion2",
    )


def _garments(data: object, path: Path, image: str, split: str, categories: dict[int, str],
              problems: Problems) -> list[Record]:
    """The records of one annotation file; ``categories`` collects id -> name on the way."""
    if not isinstance(data, dict):
        problems.bad(str(path), f"expected a JSON object, found {type(data).__name__}")
        return []
    domain = SOURCES.get(data.get("source"))
    if domain is None:
        problems.bad(str(path), f"source must be 'user' or 'shop', found {data.get('source')!r}")
        return []
    pair_id = data.get("pair_id")
    if not _is_count(pair_id):
        problems.bad(str(path), f"pair_id must be a non-negative integer, found {pair_id!r}")
        return []
    keys = sorted((k for k in data if _ITEM_KEY.fullmatch(k)), key=lambda k: int(k[4:]))
    out = []
    for key in keys:
        where, item = f"{path}:{key}", data[key]
        if not isinstance(item, dict):
            problems.bad(where, f"expected an object, found {type(item).__name__}")
            continue
        style = item.get("style")
        if not _is_count(style):
            problems.bad(where, f"style must be a non-negative integer, found {style!r}")
            continue
        if style == 0:
            problems.excluded(where, "style 0 (no counterpart in the other domain), left out of retrieval")
            continue
        category_id, category = item.get("category_id"), item.get("category_name")
        if not _is_count(category_id) or not isinstance(category, str) or not category:
            problems.bad(where, f"needs an integer category_id and a category_name, found {category_id!r}, {category!r}")
            continue
        known = categories.setdefault(category_id, category)
        if known != category:
            problems.bad(where, f"category_id {category_id} is {category!r} here but {known!r} elsewhere")
            continue
        corners = item.get("bounding_box")
        if not isinstance(corners, list) or len(corners) != 4:
            problems.bad(where, f"bounding_box must be [x1, y1, x2, y2], found {corners!r}")
            continue
        box = parse_box(corners, where, problems)
        if box is not None:
            out.append(Record(path=image, item_id=f"{pair_id}_{style}", domain=domain, split=split,
                              box=box, category=category, source=where))
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
