"""DeepFashion item attributes: ``Anno/list_attr_cloth.txt`` + ``Anno/list_attr_items.txt``,
and the optional ``Anno/list_attr_groups.txt`` of mutually exclusive attributes.

Each value's text is mapped to an integer through an explicit table of the allowed values
{1, -1, 0}. (Comparing the text "1" to the number 1 is the classic way to end up with all-unknown
labels without any error.) A row with the wrong number of values is an error at its line, as is
any value outside the convention.

Exclusive groups. ``list_attr_cloth.txt``'s *type* column (1 texture, 2 fabric, 3 shape, 4 part,
5 style) is a theme, not an exclusion: a dress can be floral *and* lace-trimmed. Which attributes
exclude each other (one sleeve length, one neckline) is declared explicitly in
``list_attr_groups.txt``, in the same count + header + rows layout::

    6
    attribute_name group_name
    sleeveless      sleeve_length
    short_sleeve    sleeve_length
    long sleeve     sleeve_length
    ...

The last word of a row is the group (no spaces), everything before it an attribute name exactly
as ``list_attr_cloth.txt`` gives it (names may contain spaces). An attribute belongs to at most
one group. Predictions then keep the most probable value of each group (:mod:`mmfl.labels`);
annotations are taken as they are. ``mmfl synth`` writes the file; for a real dataset write it
yourself, or leave it out (no groups: every attribute is decided on its own).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mmfl.data.formats.annotations import Problems, Row, is_int, read_table
from mmfl.data.formats.checks import finish_records
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError

NAMES_FILE = "list_attr_cloth.txt"
ITEMS_FILE = "list_attr_items.txt"
GROUPS_FILE = "list_attr_groups.txt"
#: the text of each allowed value -> the value (a lookup, not a comparison of text with numbers)
_VALUES = {"1": 1, "-1": -1, "0": 0, "+1": 1, "-0": 0, "+0": 0}


def read_attributes(anno_dir: Path, problems: Problems) -> tuple[list[str], dict[str, np.ndarray]]:
    """Attribute names and item -> int8 vector; both empty when the dataset ships no attributes.

    The two files come as a pair: one without the other is a DataError naming the missing one.
    """
    names_path, items_path = anno_dir / NAMES_FILE, anno_dir / ITEMS_FILE
    if not names_path.exists() and not items_path.exists():
        return [], {}
    for path, other in ((names_path, items_path), (items_path, names_path)):
        if not path.exists():
            raise DataError(f"{path}: file not found (needed to read {other.name})")
    names = [attribute_name(row) for row in read_table(names_path, problems, errors="replace")]
    values: dict[str, np.ndarray] = {}
    for row in read_table(items_path, problems):
        parsed = _parse_values(row, len(names), problems)
        if parsed is None:
            continue
        item, vector = parsed
        previous = values.get(item)
        if previous is not None and not np.array_equal(previous, vector):
            problems.bad(row.where, f"item {item} is listed again with different attribute values")
            continue
        values[item] = vector
    return names, values


def read_attribute_groups(anno_dir: Path, names: list[str], problems: Problems) -> dict[str, list[str]]:
    """Group name -> its attribute names (in ``names`` order) from ``list_attr_groups.txt``; {} without it.

    A row naming an attribute ``names`` lacks, or one already in a group, is a problem at its line:
    a typo would otherwise quietly leave the attribute ungrouped.
    """
    path = anno_dir / GROUPS_FILE
    if not path.exists():
        return {}
    if not names:
        raise DataError(f"{path}: declares attribute groups but {anno_dir / NAMES_FILE} is missing")
    known = set(names)
    group_of: dict[str, str] = {}
    for row in read_table(path, problems, errors="replace"):
        words = row.text.split()
        if len(words) < 2:
            problems.bad(row.where, "expected an attribute name and a group name")
            continue
        name, group = " ".join(words[:-1]), words[-1]
        if name not in known:
            problems.bad(row.where, f"attribute {name!r} is not in {NAMES_FILE}")
        elif name in group_of:
            problems.bad(row.where, f"attribute {name!r} is already in group {group_of[name]!r}")
        else:
            group_of[name] = group
    groups: dict[str, list[str]] = {}
    for name in names:
        if name in group_of:
            groups.setdefault(group_of[name], []).append(name)
    return groups


def attribute_name(row: Row) -> str:
    """The English name from a ``list_attr_cloth.txt`` row.

    Consumer-to-shop rows read ``<Chinese name> <English name> <type>``, In-shop rows just
    ``<name>``, Category-style rows ``<name> <type>``: a trailing integer is the type and a
    leading non-ASCII word is the Chinese name; what remains is the name.
    """
    words = row.text.split()
    if len(words) > 1 and is_int(words[-1]):
        words = words[:-1]
    if len(words) > 1 and not words[0].isascii():
        words = words[1:]
    return " ".join(words)


def _parse_values(row: Row, expected: int, problems: Problems) -> tuple[str, np.ndarray] | None:
    fields = row.text.split()
    if len(fields) != expected + 1:
        problems.bad(row.where, f"expected an item id and {expected} attribute values, found {len(fields) - 1} values")
        return None
    bad = next((v for v in fields[1:] if v not in _VALUES), None)
    if bad is not None:
        reason = "is not one of 1, -1, 0" if is_int(bad) else "is not an integer (expected 1, -1 or 0)"
        problems.bad(row.where, f"attribute value {bad!r} {reason}")
        return None
    return fields[0], np.array([_VALUES[v] for v in fields[1:]], dtype=np.int8)


def annotated_catalog(records: list[Record], problems: Problems, check_images: str, anno_dir: Path,
                      name: str) -> Catalog:
    """Finish ``records`` and attach the optional per-item attribute files of ``anno_dir``
    (the DeepFashion benchmarks share this layout); categories are the records' own, sorted."""
    records = finish_records(records, problems, check_images)
    attribute_names, attributes = read_attributes(anno_dir, problems)
    return Catalog(
        records=records,
        attribute_names=attribute_names,
        attributes=attributes,
        attribute_groups=read_attribute_groups(anno_dir, attribute_names, problems),
        category_names=sorted({r.category for r in records if r.category}),
        skipped=problems.skipped,
        name=name,
    )
