"""Writing the DeepFashion Consumer-to-shop annotation files for generated items.

The files follow the published layout exactly (count line, header line, whitespace-separated
columns padded like the originals), so the generated set is read by the same
``deepfashion-c2s`` reader as the real dataset and nothing downstream knows the difference.
``README.txt`` in the root marks a folder as ours: only such a folder is ever overwritten.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from mmfl.errors import MMFLError
from mmfl.synth.attributes import ATTRIBUTES, EXCLUSIVE_GROUPS
from mmfl.synth.recipe import STREAM_SPLIT, rng_for

MARKER = "mmfl synth: generated DeepFashion Consumer-to-shop layout"
OWNED = ("img", "Anno", "Eval", "README.txt")
SHOP, CONSUMER = 1, 2  # source_type values


@dataclass(frozen=True)
class ItemImage:
    """One written image: path relative to the root (``img/...``), source type and box."""

    name: str
    source_type: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class SynthItem:
    """What the annotation files need to know about one generated item."""

    item_id: str
    clothes_type: int
    images: tuple[ItemImage, ...]
    attributes: tuple[int, ...]

    def of_source(self, source_type: int) -> list[str]:
        return [im.name for im in self.images if im.source_type == source_type]


def prepare_out_dir(out: Path) -> None:
    """Make ``out`` ready to write into: new, empty, or a previous synth output (whose files are removed).

    Anything else is refused, so that a typo can never delete someone's real dataset.
    """
    if out.exists() and not out.is_dir():
        raise MMFLError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.txt"
        try:
            first = readme.read_text(encoding="utf-8").splitlines()[:1]
        except (OSError, UnicodeDecodeError):
            first = []
        if first != [MARKER]:
            raise MMFLError(
                f"{out}: folder is not empty and is not a previous 'mmfl synth' output (no {readme.name} marker)"
            )
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_readme(out: Path, items: int, seed: int, size: int) -> None:
    """Written first: a crashed run is still recognised as ours and can be regenerated."""
    text = (
        f"{MARKER}\n"
        f"items {items}  seed {seed}  size {size}\n\n"
        "Procedurally drawn garments written in the layout of DeepFashion Consumer-to-shop:\n"
        "img/<CATEGORY>/<SUBCATEGORY>/id_XXXXXXXX/{shop,comsumer}_NN.jpg (the misspelling is the original's),\n"
        "Anno/list_bbox_consumer2shop.txt, Anno/list_item_consumer2shop.txt, Anno/list_attr_cloth.txt,\n"
        "Anno/list_attr_items.txt, Anno/list_attr_groups.txt (mutually exclusive attributes) and\n"
        "Eval/list_eval_partition.txt. Regenerate with\n"
        f"  mmfl synth OUT --items {items} --seed {seed} --size {size}\n"
    )
    (out / "README.txt").write_text(text, encoding="utf-8")


def assign_splits(items: int, seed: int) -> list[str]:
    """train/val/test per item (70/15/15, at least one item each); items never straddle splits."""
    if items < 3:
        raise MMFLError(f"--items must be at least 3 (one item per split), got {items}")
    n_val = n_test = max(1, round(0.15 * items))
    labels = ["train"] * (items - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    order = rng_for(seed, STREAM_SPLIT).permutation(items)
    splits = [""] * items
    for label, index in zip(labels, order):
        splits[int(index)] = label
    return splits


def _write_table(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{len(rows)}\n{header}\n" + "".join(row + "\n" for row in rows), encoding="utf-8")


def write_annotations(out: Path, items: list[SynthItem], splits: list[str]) -> int:
    """All six annotation files; returns the number of consumer/shop pairs written."""
    names = [im.name for item in items for im in item.images]
    width = max(len(n) for n in names) + 8
    bbox_rows = [
        f"{im.name:<{width}}{item.clothes_type:<3}{im.source_type:<3}" + " ".join(f"{v:<4}" for v in im.box).rstrip()
        for item in items
        for im in item.images
    ]
    _write_table(out / "Anno" / "list_bbox_consumer2shop.txt",
                 "image_name clothes_type source_type x_1 y_1 x_2 y_2", bbox_rows)
    _write_table(out / "Anno" / "list_item_consumer2shop.txt", "item_id", [item.item_id for item in items])
    attr_width = max(len(name) for name, _ in ATTRIBUTES) + 8
    _write_table(out / "Anno" / "list_attr_cloth.txt", "attribute_name attribute_type",
                 [f"{name:<{attr_width}}{kind}" for name, kind in ATTRIBUTES])
    _write_table(out / "Anno" / "list_attr_items.txt", "item_id attribute_labels",
                 [item.item_id + " " + " ".join(f"{v:>2}" for v in item.attributes) for item in items])
    _write_table(out / "Anno" / "list_attr_groups.txt", "attribute_name group_name",
                 [f"{name:<{attr_width}}{group}" for group, names in EXCLUSIVE_GROUPS.items() for name in names])
    pairs = [
        f"{consumer:<{width}}{shop:<{width}}{item.item_id:<14}{split}"
        for item, split in zip(items, splits)
        for consumer in item.of_source(CONSUMER)
        for shop in item.of_source(SHOP)
    ]
    _write_table(out / "Eval" / "list_eval_partition.txt",
                 "image_pair_name_1 image_pair_name_2 item_id evaluation_status", pairs)
    return len(pairs)
