"""The one record table every dataset reader produces.

Readers differ only in how they parse their format; training, evaluation and indexing see
:class:`Catalog` alone. ``source`` keeps ``file:line`` of the annotation a record came from so
that a bad image found later can still be traced to the line that named it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np

Domain = Literal["consumer", "shop"]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Record:
    """One image of one item: ``path`` is absolute, ``box`` is (x1, y1, x2, y2) in pixels or None.

    ``view`` > 0 marks a consumer image that exists only as the ``view``-th consumer-style view
    generated from the shop photo at ``path`` while training (:mod:`mmfl.data.generated_views`);
    its pixels and box are drawn anew each epoch, so ``box`` is None.
    """

    path: str
    item_id: str
    domain: Domain
    split: str
    box: Box | None = None
    category: str | None = None
    source: str = ""
    view: int = 0


@dataclass
class Catalog:
    """All records of a dataset plus per-item attributes and what was skipped.

    ``attributes[item_id]`` is an int8 vector over ``attribute_names`` in the DeepFashion
    convention 1 = positive, -1 = negative, 0 = unknown (masked out by the loss).
    ``attribute_groups`` maps a group name to its mutually exclusive attribute names (an item
    has at most one of them; see :mod:`mmfl.data.formats.attributes`).
    ``skipped`` lists one human-readable reason per record dropped under ``--skip-bad``.
    """

    records: list[Record]
    attribute_names: list[str] = field(default_factory=list)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    attribute_groups: dict[str, list[str]] = field(default_factory=dict)
    category_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    name: str = ""

    def split(self, splits: str | Iterable[str], domain: Domain | None = None) -> list[Record]:
        """Records of the given split(s), optionally of one domain, in table order."""
        wanted = {splits} if isinstance(splits, str) else set(splits)
        return [r for r in self.records if r.split in wanted and (domain is None or r.domain == domain)]

    def items(self, records: Iterable[Record]) -> list[str]:
        """Distinct item ids of ``records`` in first-seen order (the label order used for training)."""
        return list(dict.fromkeys(r.item_id for r in records))

    def attribute_matrix(self, item_ids: list[str]) -> np.ndarray:
        """(len(item_ids), num_attributes) int8 matrix; items without annotations are all-unknown (0)."""
        out = np.zeros((len(item_ids), len(self.attribute_names)), dtype=np.int8)
        for row, item in enumerate(item_ids):
            vec = self.attributes.get(item)
            if vec is not None:
                out[row] = vec
        return out

    def annotated_attributes(self, item_id: str) -> tuple[str, ...] | None:
        """The item's positive attributes when it is annotated (at least one known label), else None.

        None, not an empty tuple, for an item without labels: the index then falls back to the
        model's predictions, while an annotated item with no positive stays honestly empty.
        """
        vec = self.attributes.get(item_id)
        if vec is None or not np.any(vec):
            return None
        return tuple(name for name, value in zip(self.attribute_names, vec.tolist()) if value == 1)

    def summary(self) -> str:
        """One line per split: images by domain and items, for logs and the CLI."""
        lines = []
        by_split: dict[str, list[Record]] = {}
        for r in self.records:
            by_split.setdefault(r.split, []).append(r)
        for split, recs in by_split.items():
            domains = Counter(r.domain for r in recs)
            no_shop = {r.item_id for r in recs if r.domain == "consumer"} - {r.item_id for r in recs if r.domain == "shop"}
            line = (
                f"{split}: {len(self.items(recs))} items, {domains.get('consumer', 0)} consumer + "
                f"{domains.get('shop', 0)} shop images"
            )
            if no_shop:
                line += f", {len(no_shop)} items without a shop image (queries without a match)"
            lines.append(line)
        if self.skipped:
            lines.append(f"{len(self.skipped)} records skipped (each one named where it was read)")
        return "\n".join(lines)


def dedupe(records: Iterable[Record]) -> list[Record]:
    """Drop exact repeats of (path, item, domain, split, box): pair lists name each image many times.

    The box is part of the key: two boxes of one item in one image (DeepFashion2 shop photos
    showing a garment twice) are two crops, and neither may vanish without a word.
    """
    seen: set[tuple[str, str, str, str, Box | None]] = set()
    out = []
    for r in records:
        key = (r.path, r.item_id, r.domain, r.split, r.box)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
