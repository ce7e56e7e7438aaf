"""DeepFashion In-shop Clothes Retrieval, read as published.

* ``Eval/list_eval_partition.txt``: count, header, ``image_name item_id evaluation_status`` with
  status train/query/gallery.
* ``Anno/list_bbox_inshop.txt``: count, header,
  ``image_name clothes_type pose_type x_1 y_1 x_2 y_2``; every listed image must appear here.
* optional ``Anno/list_attr_cloth.txt`` + ``Anno/list_attr_items.txt``.

In-shop has no consumer photos: the benchmark retrieves shop photos of an item from other shop
photos of it. To fit the consumer -> shop record table, ``query`` images become domain
``consumer`` and ``gallery`` images domain ``shop``, both in split ``test``; ``train`` images
are all domain ``shop`` in split ``train`` (there is no query/gallery distinction to keep).
Categories are the clothes types ``upper``/``lower``/``full``.
"""
from __future__ import annotations

import os
from pathlib import Path

from mmfl.data.formats.annotations import (
    Problems, Row, leading_name, parse_box, parse_int, read_table, split_row,
)
from mmfl.data.formats.attributes import annotated_catalog
from mmfl.data.records import Box, Catalog, Record

PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
BBOX_FILE = Path("Anno") / "list_bbox_inshop.txt"
PARTITION_COLUMNS = ("image_name", "item_id", "evaluation_status")
BBOX_COLUMNS = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")
CLOTHES_TYPES = {1: "upper", 2: "lower", 3: "full"}
#: evaluation_status -> (domain, split)
STATUSES = {"train": ("shop", "train"), "query": ("consumer", "test"), "gallery": ("shop", "test")}


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """Records of every image in the partition file, boxed and categorised from the bbox file."""
    problems = Problems(skip_bad)
    boxes = read_bboxes(root / BBOX_FILE, problems)
    records: list[Record] = []
    for row in read_table(root / PARTITION_FILE, problems):
        fields = split_row(row, PARTITION_COLUMNS, problems, name_first=True)
        if fields is None:
            continue
        name, item, status = fields
        if status not in STATUSES:
            problems.bad(row.where, f"unknown evaluation_status {status!r} (expected {', '.join(STATUSES)})")
            continue
        if name not in boxes:
            problems.bad(row.where, f"{name} is not listed in {root / BBOX_FILE}")
            continue
        entry = boxes[name]
        if entry is None:
            continue  # its bbox line was bad, and was reported (once) already
        box, category = entry
        domain, split = STATUSES[status]
        records.append(Record(path=os.path.join(root, name), item_id=item, domain=domain, split=split,
                              box=box, category=category, source=row.where))
    return annotated_catalog(records, problems, check_images, root / "Anno", "inshop")


def read_bboxes(path: Path, problems: Problems) -> dict[str, tuple[Box, str] | None]:
    """image name -> (box, clothes type name), or None when its line was bad (and reported).

    A repeated name must repeat the same values.
    """
    out: dict[str, tuple[Box, str] | None] = {}
    for row in read_table(path, problems):
        parsed = _bbox_entry(row, problems)
        if parsed is None:
            out.setdefault(leading_name(row.text), None)
            continue
        name, entry = parsed
        previous = out.setdefault(name, entry)
        if previous is not None and previous != entry:
            problems.bad(row.where, f"{name} is listed again with a different box or clothes type")
    return out


def _bbox_entry(row: Row, problems: Problems) -> tuple[str, tuple[Box, str]] | None:
    fields = split_row(row, BBOX_COLUMNS, problems, name_first=True)
    if fields is None:
        return None
    clothes = parse_int(fields[1], "clothes_type", row.where, problems)
    if clothes is None or parse_int(fields[2], "pose_type", row.where, problems) is None:
        return None
    if clothes not in CLOTHES_TYPES:
        problems.bad(row.where, f"unknown clothes_type {clothes} (1 upper, 2 lower, 3 full body)")
        return None
    box = parse_box(fields[3:], row.where, problems)
    if box is None:
        return None
    return fields[0], (box, CLOTHES_TYPES[clothes])
