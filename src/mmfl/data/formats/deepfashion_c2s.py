"""DeepFashion Consumer-to-shop Clothes Retrieval, read as published.

Files (paths inside them are relative to the dataset root and start with ``img/``):

* ``Anno/list_bbox_consumer2shop.txt``: ``image_name clothes_type source_type x_1 y_1 x_2 y_2``,
  one row per image. It is the authority on an image's domain (source 1 = shop, 2 = consumer) and
  its box.
* ``Eval/list_eval_partition.txt``: ``consumer_image shop_image item_id evaluation_status``, one
  row per consumer/shop pair, status train/val/test. Pairs repeat images; each image becomes one
  record per (item, split). An image standing in the consumer column must have source type 2 and
  one in the shop column source type 1: a disagreement is an error at the partition line.
* optional ``Anno/list_attr_cloth.txt`` + ``Anno/list_attr_items.txt``: per-item attributes.

Category: the ``<CAT>/<SUB>`` folders of ``img/<CAT>/<SUB>/id_XXXXXXXX/…`` (e.g. ``TOPS/Summer_Wear``),
which name the garment far more finely than the three clothes types do; an image outside that
folder shape falls back to its clothes type (``upper``/``lower``/``full``).

Image names in the partition file cannot contain whitespace (there are two per row and nothing
to tell where one ends); in the bbox file they can, since every other column is numeric.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mmfl.data.formats.annotations import (
    Problems, Row, leading_name, parse_box, parse_int, read_table, split_row,
)
from mmfl.data.formats.attributes import annotated_catalog
from mmfl.data.records import Box, Catalog, Record

BBOX_FILE = Path("Anno") / "list_bbox_consumer2shop.txt"
PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
BBOX_COLUMNS = ("image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2")
PAIR_COLUMNS = ("consumer_image", "shop_image", "item_id", "evaluation_status")
CLOTHES_TYPES = {1: "upper", 2: "lower", 3: "full"}
SOURCE_TYPES = {1: "shop", 2: "consumer"}
STATUSES = ("train", "val", "test")
MISSING = object()  # marks a name absent from the bbox file


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """What the bbox file says about one image."""

    domain: str
    category: str
    box: Box
    where: str


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """Records of every image named by the partition file, with boxes, categories, attributes."""
    problems = Problems(skip_bad)
    images = read_bboxes(root / BBOX_FILE, problems)
    records: list[Record] = []
    for row in read_table(root / PARTITION_FILE, problems):
        fields = split_row(row, PAIR_COLUMNS, problems)
        if fields is None:
            continue
        consumer, shop, item, status = fields
        if status not in STATUSES:
            problems.bad(row.where, f"unknown evaluation_status {status!r} (expected {', '.join(STATUSES)})")
            continue
        for name, column in ((consumer, "consumer"), (shop, "shop")):
            entry = images.get(name, MISSING)
            if entry is MISSING:
                problems.bad(row.where, f"{name} is not listed in {root / BBOX_FILE}")
            elif entry is None:
                continue  # its bbox line was bad, and was reported (once) already
            elif entry.domain != column:
                problems.bad(row.where, f"{name} stands in the {column} column but {entry.where} marks it a {entry.domain} image")
            else:
                records.append(Record(path=os.path.join(root, name), item_id=item, domain=column, split=status,
                                      box=entry.box, category=entry.category, source=entry.where))
    return annotated_catalog(records, problems, check_images, root / "Anno", "deepfashion-c2s")


def read_bboxes(path: Path, problems: Problems) -> dict[str, ImageEntry | None]:
    """image name -> :class:`ImageEntry`, or None when its line was bad (and reported).

    Keeping the rejected names lets the partition file pass over them without reporting the
    same image a second time; a repeated name must repeat the same values.
    """
    images: dict[str, ImageEntry | None] = {}
    for row in read_table(path, problems):
        entry = _bbox_entry(row, problems)
        if entry is None:
            images.setdefault(leading_name(row.text), None)
            continue
        name, image = entry
        previous = images.setdefault(name, image)
        if previous is not None and (previous.domain, previous.category, previous.box) != (image.domain, image.category, image.box):
            problems.bad(row.where, f"{name} is listed again (first at {previous.where}) with different values")
    return images


def _bbox_entry(row: Row, problems: Problems) -> tuple[str, ImageEntry] | None:
    fields = split_row(row, BBOX_COLUMNS, problems, name_first=True)
    if fields is None:
        return None
    name = fields[0]
    clothes = parse_int(fields[1], "clothes_type", row.where, problems)
    source = None if clothes is None else parse_int(fields[2], "source_type", row.where, problems)
    if clothes is None or source is None:
        return None
    if clothes not in CLOTHES_TYPES:
        problems.bad(row.where, f"unknown clothes_type {clothes} (1 upper, 2 lower, 3 full body)")
        return None
    if source not in SOURCE_TYPES:
        problems.bad(row.where, f"unknown source_type {source} (1 shop, 2 consumer)")
        return None
    box = parse_box(fields[3:], row.where, problems)
    if box is None:
        return None
    return name, ImageEntry(SOURCE_TYPES[source], category_of(name, CLOTHES_TYPES[clothes]), box, row.where)


def category_of(name: str, clothes_type: str) -> str:
    """``CAT/SUB`` from ``img/CAT/SUB/id_…/file.jpg``, else the clothes type name."""
    parts = name.split("/")
    if len(parts) >= 5 and parts[0] == "img":
        return f"{parts[1]}/{parts[2]}"
    return clothes_type
