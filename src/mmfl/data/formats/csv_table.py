"""Users' own data as one CSV table: ``path,item_id,domain,split[,x1,y1,x2,y2][,category]``.

* The root is either the CSV file itself or a folder holding ``dataset.csv``.
* The first row must be the header, naming exactly one of the four column layouts above.
* ``path`` is relative to the CSV's folder, or absolute. Fields are stripped of surrounding
  spaces; quote a field (standard CSV quoting) to keep a comma in it.
* ``domain`` is ``consumer`` or ``shop``; ``split`` is ``train``, ``val`` or ``test``
  (case-insensitive).
* The four box columns are either all empty (no box for that row) or all numbers.
* An empty ``category`` means none.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from mmfl.data.formats.annotations import Problems, parse_box, read_text
from mmfl.data.formats.checks import finish_records
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError

DEFAULT_NAME = "dataset.csv"
BASE = ("path", "item_id", "domain", "split")
BOX = ("x1", "y1", "x2", "y2")
#: column count -> column names; the count alone tells the layouts apart
LAYOUTS = {4: BASE, 5: (*BASE, "category"), 8: (*BASE, *BOX), 9: (*BASE, *BOX, "category")}
DOMAINS = ("consumer", "shop")
SPLITS = ("train", "val", "test")
_HEADER_HELP = "path,item_id,domain,split[,x1,y1,x2,y2][,category]"


def read(root: Path, skip_bad: bool, check_images: str) -> Catalog:
    """Records of every row of the table."""
    path = root / DEFAULT_NAME if root.is_dir() else root
    problems = Problems(skip_bad)
    rows = csv_rows(path)
    if not rows:
        raise DataError(f"{path}: file is empty (expected a header row {_HEADER_HELP})")
    line, header = rows[0]
    names = tuple(h.strip().lower() for h in header)
    layout = LAYOUTS.get(len(names))
    if names == layout:
        rows = rows[1:]
    elif names[:1] == ("path",):
        raise DataError(f"{path}:{line}: header must be {_HEADER_HELP}, found {','.join(header)}")
    else:
        problems.bad(f"{path}:{line}", f"missing header row {_HEADER_HELP}")
        if layout is None:
            raise DataError(f"{path}:{line}: without a header row, {len(names)} columns match no layout of {_HEADER_HELP}")
    records = []
    for line, fields in rows:
        record = _record(fields, layout, path.parent, f"{path}:{line}", problems)
        if record is not None:
            records.append(record)
    records = finish_records(records, problems, check_images)
    return Catalog(
        records=records,
        category_names=sorted({r.category for r in records if r.category}),
        skipped=problems.skipped,
        name="csv",
    )


def csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty CSV rows with the line each ends on (quoted fields may span lines)."""
    if not path.exists():
        raise DataError(f"{path}: file not found (pass a CSV file or a folder holding {DEFAULT_NAME})")
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        return [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None


def _record(fields: list[str], layout: tuple[str, ...], base: Path, where: str, problems: Problems) -> Record | None:
    if len(fields) != len(layout):
        problems.bad(where, f"expected {len(layout)} columns ({','.join(layout)}), found {len(fields)}")
        return None
    values = dict(zip(layout, (f.strip() for f in fields)))
    if not values["path"] or not values["item_id"]:
        problems.bad(where, "path and item_id must not be empty")
        return None
    domain, split = values["domain"].lower(), values["split"].lower()
    if domain not in DOMAINS:
        problems.bad(where, f"unknown domain {values['domain']!r} (expected consumer or shop)")
        return None
    if split not in SPLITS:
        problems.bad(where, f"unknown split {values['split']!r} (expected {', '.join(SPLITS)})")
        return None
    box = None
    corners = [values[k] for k in BOX if k in values]
    if any(corners):
        box = parse_box(corners, where, problems)
        if box is None:
            return None
    return Record(path=os.path.abspath(base / values["path"]), item_id=values["item_id"], domain=domain,
                  split=split, box=box, category=values.get("category") or None, source=where)
