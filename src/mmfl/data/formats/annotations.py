"""Reading DeepFashion-style list files, and the one place where readers report problems.

Every DeepFashion list file has the same shape: a count line, a header line naming the columns,
then one whitespace-separated row per entry. The count is checked against the rows so that a
truncated download is caught instead of silently training on part of the data. Files are read
with universal newlines, so CRLF files (common after a pass through Windows tools) read the same.

Problems either raise :class:`~mmfl.errors.DataError` at once with ``file:line: reason`` or, under
``--skip-bad``, become one counted string each in ``Catalog.skipped``. Readers never leave a row
out without going through :class:`Problems`, which is what makes "nothing dropped silently" hold.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mmfl.data.records import Box
from mmfl.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_INT = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_LEADING_NAME = re.compile(r"\s*(.*?\.(?:jpg|jpeg|png|bmp|webp))(?=\s|$)", re.IGNORECASE)


class Problems:
    """Collects what a reader could not use: raise at once, or count it with ``skip_bad``."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def bad(self, where: str, reason: str) -> None:
        """A malformed or impossible entry: an error, or a counted skip under ``skip_bad``. ``where`` is
        the ``file:line`` that named it, empty for a photo no annotation names (a photo folder)."""
        self.report(DataError(f"{where}: {reason}" if where else reason))

    def report(self, error: DataError) -> None:
        """Raise ``error``, or under ``skip_bad`` count its message."""
        if not self.skip_bad:
            raise error
        self.skipped.append(str(error))

    def excluded(self, where: str, reason: str) -> None:
        """An entry the data itself rules out (a dead Street2Shop URL, a DeepFashion2 style-0
        item): never an error, always counted."""
        self.skipped.append(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Row:
    """One data row: ``text`` without its line ending, ``where`` = ``file:line`` (1-based)."""

    text: str
    where: str


def read_lines(path: Path, errors: str = "strict") -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file with their 1-based numbers; a missing file is an error.

    ``errors="replace"`` is for files whose only non-ASCII content is decorative (the Chinese
    attribute names of Consumer-to-shop, which some copies carry in a legacy encoding).
    """
    lines = read_text(path, errors).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [(number, line.rstrip()) for number, line in enumerate(lines, 1) if line.strip()]


def read_text(path: Path, errors: str = "strict") -> str:
    """A whole UTF-8 file (a BOM is dropped); missing or undecodable is a DataError with the line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an annotation file") from None
    try:
        return data.decode("utf-8-sig", errors)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None


def read_table(path: Path, problems: Problems, errors: str = "strict") -> list[Row]:
    """The data rows of a count + header + rows file, after checking the first two lines.

    A missing count line or header line is a problem at that line; under ``skip_bad`` the file is
    still read, taking the line for what it looks like (a header or a data row).
    """
    lines = read_lines(path, errors)
    if not lines:
        raise DataError(f"{path}: file is empty (expected a count line, a header line and rows)")
    start = 0
    count: int | None = None
    first_number, first = lines[0]
    if is_int(first.strip()):
        count = int(first.strip())
        start = 1
    else:
        problems.bad(f"{path}:{first_number}", f"missing count line (expected the number of rows, found {first.strip()!r})")
    if start < len(lines):
        number, candidate = lines[start]
        if looks_like_data(candidate.split()):
            problems.bad(f"{path}:{number}", f"missing header line (expected column names, found a data row {candidate.strip()!r})")
        else:
            start += 1
    rows = [Row(text, f"{path}:{number}") for number, text in lines[start:]]
    if count is not None and count != len(rows):
        problems.bad(f"{path}:{first_number}", f"count line says {count} rows but the file has {len(rows)}")
    return rows


def read_json(path: Path) -> object:
    """A parsed JSON file; missing or invalid is a DataError naming the file (and line)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 JSON") from None


def looks_like_data(fields: Sequence[str]) -> bool:
    """Header lines hold column names; a number or an image file name marks a data row."""
    return any(is_number(f) or f.lower().endswith(IMAGE_SUFFIXES) for f in fields)


def split_row(row: Row, columns: Sequence[str], problems: Problems, name_first: bool = False) -> list[str] | None:
    """Split a row into exactly ``len(columns)`` whitespace-separated fields, or report it.

    With ``name_first`` the first field is everything before the last ``len(columns) - 1``
    fields, so an image name that contains spaces survives. Without it (two names in a row leave
    nothing to tell where one ends) a row with too many fields whose columns hold images most
    likely has a space in a path, and the message says so.
    """
    parts = row.text.rsplit(None, len(columns) - 1) if name_first else row.text.split()
    if len(parts) != len(columns):
        hint = ""
        if len(parts) > len(columns) and any(c.endswith(("image", "image_name")) for c in columns):
            hint = "; paths with spaces are not supported in this whitespace-separated file"
        problems.bad(row.where, f"expected {len(columns)} columns ({' '.join(columns)}), found {len(parts)}{hint}")
        return None
    if name_first:
        parts[0] = parts[0].strip()
    return parts


def parse_int(text: str, what: str, where: str, problems: Problems) -> int | None:
    """An integer field, or a reported problem naming the column."""
    if not is_int(text):
        problems.bad(where, f"{what} must be an integer, found {text!r}")
        return None
    return int(text)


def parse_box(values: Sequence[object], where: str, problems: Problems) -> Box | None:
    """``(x1, y1, x2, y2)`` from four numbers (strings or JSON numbers), rounded to pixels.

    Negative coordinates and boxes without area are impossible whatever the image; clamping to
    the image size happens later, once the size is known.
    """
    numbers = []
    for value in values:
        if type(value) is str and _NUMBER.fullmatch(value):
            value = float(value)
        if type(value) not in (int, float) or not math.isfinite(value):
            problems.bad(where, f"box coordinate {value!r} is not a number")
            return None
        numbers.append(value)
    x1, y1, x2, y2 = (int(round(v)) for v in numbers)
    if min(x1, y1, x2, y2) < 0:
        problems.bad(where, f"box ({x1}, {y1}, {x2}, {y2}) has a negative coordinate")
        return None
    if x2 <= x1 or y2 <= y1:
        problems.bad(where, f"box ({x1}, {y1}, {x2}, {y2}) has no area (needs x2 > x1 and y2 > y1)")
        return None
    return x1, y1, x2, y2


def leading_name(text: str) -> str:
    """The image name a row starts with, inner spaces kept: everything up to the first word that
    ends in an image suffix (else the first word). Used to remember the name of a rejected row,
    whose columns cannot be trusted, so that rows naming that image are not reported again."""
    match = _LEADING_NAME.match(text)
    if match:
        return match.group(1)
    words = text.split()
    return words[0] if words else ""


def is_int(text: str) -> bool:
    return _INT.fullmatch(text) is not None


def is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None
