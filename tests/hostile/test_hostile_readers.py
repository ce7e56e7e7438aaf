"""Every reader against every hostile photo and every hostile annotation.

Each case has one documented outcome per format (docs/RELIABILITY.md): a DataError whose one
line names the annotation file and line (and the photo), or under ``skip_bad`` exactly one
counted skip with the same text and every other record kept; or the input is accepted (and
then its values are checked: boxes clamped, EXIF turned upright, duplicates merged).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mmfl.data.formats import read_dataset
from mmfl.data.images import open_image
from mmfl.errors import DataError

from .factory import (
    BOX, FORMATS, IMAGE_CASES, COLOURS, TARGET, H, W, ImageCase, Layout, entries, with_entry, with_image,
    write_dataset,
)

BASELINE = 6  # records of the untouched logical dataset
BOX_TARGET = 2  # box cases change the consumer photo of item 1 (Street2Shop shop photos have no box)


def one_line_error(ds, fmt: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        read_dataset(ds.data, fmt, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_untouched_dataset_reads_in_every_format(tmp_path: Path) -> None:
    for fmt in FORMATS:
        ds = write_dataset(fmt, tmp_path / f"{fmt} données")
        cat = read_dataset(ds.data, fmt, check_images="decode")
        assert len(cat.records) == BASELINE and cat.skipped == []
        assert {r.box for r in cat.records} <= {BOX, None}


# ----------------------------------------------------------------------------- hostile photos

@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_photo(fmt: str, case: ImageCase, tmp_path: Path) -> None:
    ds = write_dataset(fmt, tmp_path / "root ü x", with_image(case))
    photo, where = ds.images[TARGET], ds.where["image"][TARGET]
    for depth in ("header", "decode"):
        reason = case.header if depth == "header" else case.decode
        if reason is None:
            cat = read_dataset(ds.data, fmt, check_images=depth)
            assert len(cat.records) == BASELINE and cat.skipped == [], (depth, cat.skipped)
            continue
        if fmt == "street2shop" and case.name == "missing":
            # Dead download links are the data, not an error: always a counted skip.
            cat = read_dataset(ds.data, fmt, check_images=depth)
            assert len(cat.records) == BASELINE - 1
            assert cat.skipped == [f"{where}: shop photo 000000201 is missing on disk"]
            continue
        message = one_line_error(ds, fmt, check_images=depth)
        assert message.startswith(f"{where}: {photo}: ") and reason in message, message
        cat = read_dataset(ds.data, fmt, check_images=depth, skip_bad=True)
        assert len(cat.records) == BASELINE - 1 and str(photo) not in {r.path for r in cat.records}
        assert cat.skipped == [message]
    if case.upright:
        img = open_image(photo)
        assert img.size == (W, H)
        top, bottom = COLOURS[1]
        assert all(abs(a - b) < 30 for a, b in zip(img.getpixel((12, 3)), top))
        assert all(abs(a - b) < 30 for a, b in zip(img.getpixel((12, H - 3)), bottom))
        assert min(img.getpixel((0, H // 2))) > 200  # the white stripe is on the left


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "street2shop"])
def test_box_is_checked_against_the_upright_size(fmt: str, tmp_path: Path) -> None:
    """The stored photo is 20x24, upright 24x20: the box x2=22 fits only if EXIF is applied."""
    exif6 = next(c for c in IMAGE_CASES if c.name == "exif-6")
    ds = write_dataset(fmt, tmp_path / "exif", with_image(exif6, BOX_TARGET))
    for depth in ("header", "decode"):
        cat = read_dataset(ds.data, fmt, check_images=depth)
        rec = next(r for r in cat.records if r.path == str(ds.images[BOX_TARGET]))
        assert rec.box == BOX


# ----------------------------------------------------------------------------- hostile annotations

@dataclass(frozen=True)
class Outcome:
    """What one format does with one annotation case.

    ``where`` names the location kind in ``Dataset.where`` (or ``count``/``header``/``conflict``);
    ``words`` must be in the message; ``lost`` records are gone under skip_bad (one skip). With
    ``where`` None the input is accepted: ``records`` are read and nothing is skipped.
    """

    where: str | None = None
    words: str = ""
    lost: int = 1
    records: int = BASELINE


ACCEPT = Outcome()
NA = None  # the format has no such thing (e.g. no count line in JSON)


@dataclass(frozen=True)
class AnnotationCase:
    name: str
    items: object  # callable -> entries
    layout: Layout
    outcomes: dict[str, Outcome | None]
    target: int = BOX_TARGET  # the entry whose location errors name


def _box(values: tuple[object, ...]):
    return lambda: with_entry(BOX_TARGET, box=values)


def _all(outcome: Outcome, **overrides: Outcome | None) -> dict[str, Outcome | None]:
    return {fmt: overrides.get(fmt.replace("-", "_"), outcome) for fmt in FORMATS}


ANNOTATION_CASES = [
    AnnotationCase("too-few-columns", lambda: with_entry(BOX_TARGET, drop_column=True), Layout(), {
        "deepfashion-c2s": Outcome("row", "expected 7 columns"),
        # The name holds a space, so the row still splits in three: the item id lands in the status column.
        "inshop": Outcome("row", "unknown evaluation_status 'id_00000001'"),
        "street2shop": Outcome("row", "product must be a non-negative integer id"),
        "deepfashion2": Outcome("row", "bounding_box must be [x1, y1, x2, y2]"),
        "csv": Outcome("row", "expected 8 columns"),
    }),
    AnnotationCase("non-numeric-box", _box(("1", "a", "20", "18")), Layout(),
                   _all(Outcome("box", "box coordinate 'a' is not a number"),
                        street2shop=Outcome("box", "bbox needs numeric left, top, width, height"))),
    AnnotationCase("negative-box", _box((-3, 1, 20, 18)), Layout(),
                   _all(Outcome("box", "box (-3, 1, 20, 18) has a negative coordinate"))),
    AnnotationCase("zero-area-box", _box((5, 1, 5, 18)), Layout(),
                   _all(Outcome("box", "box (5, 1, 5, 18) has no area"))),
    AnnotationCase("box-outside-photo", _box((30, 25, 40, 30)), Layout(),
                   _all(Outcome("image", "box (30, 25, 40, 30) lies outside the 24x20 image"))),
    AnnotationCase("box-partly-outside", _box((10, 5, 60, 60)), Layout(), _all(ACCEPT)),
    AnnotationCase("missing-count-line", entries, Layout(no_count=True), _all(
        NA, deepfashion_c2s=Outcome("count", "missing count line", lost=0),
        inshop=Outcome("count", "missing count line", lost=0))),
    AnnotationCase("missing-header-line", entries, Layout(no_header=True), _all(
        NA, deepfashion_c2s=Outcome("header", "missing header line", lost=0),
        inshop=Outcome("header", "missing header line", lost=0),
        csv=Outcome("header", "missing header row", lost=0))),
    AnnotationCase("unknown-status", lambda: with_entry(BOX_TARGET, status="testing"), Layout(), _all(
        NA, deepfashion_c2s=Outcome("status", "unknown evaluation_status 'testing'", lost=2),
        inshop=Outcome("status", "unknown evaluation_status 'testing'"),
        csv=Outcome("status", "unknown split 'testing'"))),
    AnnotationCase("duplicate-row", entries, Layout(repeat=BOX_TARGET), _all(ACCEPT)),
    AnnotationCase("conflicting-duplicate", entries, Layout(conflict=BOX_TARGET), _all(
        Outcome(records=BASELINE + 1),  # the same item boxed twice in one photo: two crops
        deepfashion_c2s=Outcome("conflict", "is listed again", lost=0),
        inshop=Outcome("conflict", "is listed again with a different box", lost=0))),
    AnnotationCase("item-without-shop-photo", entries, Layout(omit=5), _all(
        Outcome(records=BASELINE - 1),
        deepfashion_c2s=Outcome("status", "is not listed in", lost=0, records=BASELINE - 1)), target=5),
]
#: unknown domain values per format that has one (each spells the domain differently)
SOURCES = {"deepfashion-c2s": ("3", Outcome("box", "unknown source_type 3")),
           "csv": ("store", Outcome("row", "unknown domain 'store'")),
           "deepfashion2": ("street", Outcome("source", "source must be 'user' or 'shop'"))}


def _cases() -> list[tuple[str, AnnotationCase]]:
    out = [(fmt, case) for case in ANNOTATION_CASES for fmt in FORMATS if case.outcomes[fmt] is not None]
    for fmt, (value, outcome) in SOURCES.items():
        out.append((fmt, AnnotationCase("unknown-source-type", lambda v=value: with_entry(BOX_TARGET, source=v),
                                        Layout(), {fmt: outcome})))
    return out


@pytest.mark.parametrize("fmt, case", _cases(), ids=[f"{f}-{c.name}" for f, c in _cases()])
def test_hostile_annotation(fmt: str, case: AnnotationCase, tmp_path: Path) -> None:
    ds = write_dataset(fmt, tmp_path / "annotations ü x", case.items(), case.layout)
    outcome = case.outcomes[fmt]
    if outcome.where is None:
        cat = read_dataset(ds.data, fmt, check_images="decode")
        assert len(cat.records) == outcome.records and cat.skipped == []
        if case.name == "box-partly-outside":
            rec = next(r for r in cat.records if r.path == str(ds.images[BOX_TARGET]))
            assert rec.box == (10, 5, W, H)  # clamped to the photo
        if case.name == "item-without-shop-photo":
            assert "1 items without a shop image" in cat.summary()
        return
    where = getattr(ds, outcome.where) if outcome.where in ("count", "header", "conflict") \
        else ds.where[outcome.where][case.target]
    message = one_line_error(ds, fmt)
    assert message.startswith(f"{where}: ") and outcome.words in message, (where, message)
    cat = read_dataset(ds.data, fmt, skip_bad=True)
    assert cat.skipped == [message]
    assert len(cat.records) == outcome.records - outcome.lost


MISSING_FILES = {
    "deepfashion-c2s": ("Anno/list_bbox_consumer2shop.txt", "file not found"),
    "inshop": ("Eval/list_eval_partition.txt", "file not found"),
    "street2shop": ("meta/json/retrieval_dresses.json", "file not found (category 'dresses' has other files)"),
    "deepfashion2": ("test/annos", "no train/annos, validation/annos or test/annos folder"),
    "csv": ("dataset.csv", "dataset not found"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_annotation_file_is_an_error_even_with_skip_bad(fmt: str, tmp_path: Path) -> None:
    ds = write_dataset(fmt, tmp_path / "missing ü")
    rel, words = MISSING_FILES[fmt]
    target = ds.root / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    for skip in (False, True):
        message = one_line_error(ds, fmt, skip_bad=skip)
        named = ds.root if fmt == "deepfashion2" else target
        assert message.startswith(f"{named}") and words in message, message


EMPTY_FILES = {
    "deepfashion-c2s": ("Eval/list_eval_partition.txt", "", "file is empty"),
    "inshop": ("Anno/list_bbox_inshop.txt", "", "file is empty"),
    "street2shop": ("meta/json/test_pairs_dresses.json", ":1", "invalid JSON"),
    "deepfashion2": ("test/annos/000003.json", ":1", "invalid JSON"),
    "csv": ("dataset.csv", "", "file is empty"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_byte_annotation_file(fmt: str, tmp_path: Path) -> None:
    ds = write_dataset(fmt, tmp_path / "empty ü")
    rel, line, words = EMPTY_FILES[fmt]
    (ds.root / rel).write_bytes(b"")
    message = one_line_error(ds, fmt)
    assert message.startswith(f"{ds.root / rel}{line}: ") and words in message, message
    if fmt == "deepfashion2":  # one annotation file per photo: under skip_bad, one counted skip
        cat = read_dataset(ds.data, fmt, skip_bad=True)
        assert cat.skipped == [message] and len(cat.records) == BASELINE - 1
