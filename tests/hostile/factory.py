"""Hostile inputs made in code: broken and unusual images, and tiny datasets in every published format.

One *logical* dataset (three items, each with one consumer and one shop photo in split ``test``)
is written in each of the five layouts by :func:`write_dataset`. A hostile case is a change to
that logical dataset (an image's bytes, a box, a status, a dropped column, a missing count line,
...), so every case runs against every reader the same way, and the test knows exactly which
annotation line each error must name. Roots and image names hold spaces and non-ASCII letters.
"""
from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

W, H = 24, 20  # every fixture photo, upright
BOX = (1, 1, 22, 19)
ITEMS = 3
#: top half / bottom half colour per item: the halves make a wrong orientation visible
COLOURS = [((220, 40, 40), (40, 40, 220)), ((40, 200, 60), (230, 200, 40)), ((150, 40, 170), (20, 180, 190))]
FORMATS = ["deepfashion-c2s", "inshop", "street2shop", "deepfashion2", "csv"]


# ----------------------------------------------------------------------------- photos and bytes

def photo(item: int, size: tuple[int, int] = (W, H)) -> Image.Image:
    """Item ``item``'s photo: two colour halves and a white left stripe (orientation is visible)."""
    top, bottom = COLOURS[item % len(COLOURS)]
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[: size[1] // 2] = top
    arr[size[1] // 2:] = bottom
    arr[:, :3] = 255
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@functools.cache
def noisy_jpeg(size: int = 48) -> bytes:
    pixels = (np.random.RandomState(7).rand(size, size, 3) * 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def exif_rotated(item: int, orientation: int) -> bytes:
    """A JPEG whose pixels are stored turned, with the EXIF tag that turns them upright again."""
    stored = photo(item).transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg(item: int) -> bytes:
    return encode(photo(item).convert("CMYK"), "JPEG", quality=95)


def rgba_png(item: int) -> bytes:
    """Transparent corners (composited on white), opaque garment."""
    img = photo(item).convert("RGBA")
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:4, -4:] = 0
    img.putalpha(Image.fromarray(alpha))
    return encode(img, "PNG")


def gray16_png(item: int) -> bytes:
    gray = np.asarray(photo(item).convert("L"), dtype=np.uint16) * 257
    return encode(Image.frombytes("I;16", (W, H), gray.astype("<u2").tobytes()), "PNG")


def gray_png(item: int) -> bytes:
    return encode(photo(item).convert("L"), "PNG")


@functools.cache
def huge_png() -> bytes:
    """72 Mpx of 1-bit PNG in a few KB: over the 64 Mpx limit, under PIL's own bomb threshold."""
    return encode(Image.new("1", (9000, 8000)), "PNG")


@dataclass(frozen=True)
class ImageCase:
    """A photo file as a user might have it: its bytes (None = missing) and what must happen.

    ``header`` / ``decode``: None when the photo must be accepted, else words of the reason the
    reader gives at that check depth (and every later surface gives).
    """

    name: str
    suffix: str
    make: Callable[[int], bytes | None]
    header: str | None
    decode: str | None
    upright: bool = False  # EXIF-rotated: must come out W x H

    @property
    def accepted(self) -> bool:
        return self.decode is None


IMAGE_CASES = [
    ImageCase("zero-byte", ".jpg", lambda i: b"", "cannot read image header", "cannot decode image"),
    ImageCase("truncated-header", ".jpg", lambda i: noisy_jpeg()[:100], "cannot read image header",
              "cannot decode image"),
    ImageCase("truncated-pixels", ".jpg", lambda i: noisy_jpeg()[: len(noisy_jpeg()) // 2], None, "truncated"),
    ImageCase("not-an-image", ".jpg", lambda i: b"<html>404 not found</html>\n" * 20, "cannot read image header",
              "cannot decode image"),
    ImageCase("bomb-header", ".png", lambda i: png_claiming(30000, 30000), "decompression bomb", "decompression bomb"),
    ImageCase("huge-72mpx", ".png", lambda i: huge_png(), "pixel limit", "pixel limit"),
    ImageCase("missing", ".jpg", lambda i: None, "file not found", "file not found"),
    ImageCase("rgba-png", ".png", rgba_png, None, None),
    ImageCase("cmyk-jpeg", ".jpg", cmyk_jpeg, None, None),
    ImageCase("gray16-png", ".png", gray16_png, None, None),
    ImageCase("gray-png", ".png", gray_png, None, None),
    ImageCase("exif-6", ".jpg", lambda i: exif_rotated(i, 6), None, None, upright=True),
    ImageCase("exif-8", ".jpg", lambda i: exif_rotated(i, 8), None, None, upright=True),
]
BAD_IMAGES = [c for c in IMAGE_CASES if not c.accepted]
GOOD_IMAGES = [c for c in IMAGE_CASES if c.accepted]


# ----------------------------------------------------------------------------- the logical dataset

@dataclass(frozen=True)
class Entry:
    """One photo of the logical dataset and how its annotation is written.

    ``box`` values are written as given (a string makes a non-numeric box). ``status`` and
    ``source`` override the split / domain text the format uses (``None``: the right one).
    ``drop_column`` writes the annotation row without its last field (JSON: without a required key).
    """

    item: int
    domain: str  # consumer | shop
    data: bytes | None
    suffix: str = ".jpg"
    box: tuple[object, ...] = BOX
    status: str | None = None
    source: str | None = None
    drop_column: bool = False


def entries() -> list[Entry]:
    """c0, s0, c1, s1, c2, s2: consumer then shop photo of each item."""
    return [Entry(i, d, encode(photo(i), "JPEG", quality=95)) for i in range(ITEMS) for d in ("consumer", "shop")]


#: the entry hostile cases change: the shop photo of item 1
TARGET = 3


@dataclass
class Dataset:
    """A written dataset: its root, the path to pass as ``--data`` and where errors must point.

    ``where[kind][k]`` is the ``file:line`` (``file[index]`` for Street2Shop, ``file.json:itemN``
    for DeepFashion2) that an error of ``kind`` about entry ``k`` names: ``image`` (its photo is
    unusable or its box misses the photo), ``box`` (its box cannot be parsed), ``row`` (its row
    has too few columns), ``status`` (its split is unknown), ``source`` (its domain is unknown).
    ``count``/``header`` name a missing count/header line; ``conflict`` the second, conflicting
    copy of a repeated row (empty where the format keeps both as two crops).
    """

    fmt: str
    root: Path
    data: Path
    images: list[Path] = field(default_factory=list)
    where: dict[str, list[str]] = field(default_factory=dict)
    count: str = ""
    header: str = ""
    conflict: str = ""

    def add(self, image: Path, **where: str) -> None:
        self.images.append(image)
        for kind in ("image", "box", "row", "status", "source"):
            self.where.setdefault(kind, []).append(where.get(kind, where.get("default", "")))


@dataclass(frozen=True)
class Layout:
    """File-level hostility: no count line, no header line, a row repeated (as is / with another box)."""

    no_count: bool = False
    no_header: bool = False
    repeat: int | None = None  # entry written twice, identically
    conflict: int | None = None  # entry written twice, the second time with another box
    omit: int | None = None  # entry not written at all (an item with no shop image)


def write_dataset(fmt: str, root: Path, items: list[Entry] | None = None, layout: Layout = Layout()) -> Dataset:
    """Write the logical dataset (or ``items``) in layout ``fmt`` under ``root``."""
    items = entries() if items is None else items
    root.mkdir(parents=True, exist_ok=True)
    writer = {"deepfashion-c2s": _c2s, "inshop": _inshop, "street2shop": _street2shop,
              "deepfashion2": _df2, "csv": _csv}[fmt]
    return writer(root, items, layout)


def _save(path: Path, data: bytes | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)


def _other_box(box: tuple[object, ...]) -> tuple[object, ...]:
    return (2, 2, 20, 18) if box != (2, 2, 20, 18) else (3, 3, 21, 17)


def _write_list(path: Path, header: str, rows: list[str], layout: Layout = Layout()) -> list[int]:
    """A DeepFashion list file (count, header, rows; CRLF); returns each row's line number."""
    lines = ([] if layout.no_count else [str(len(rows))]) + ([] if layout.no_header else [header])
    first = len(lines) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n".join(lines + rows) + "\r\n").encode("utf-8"))
    return [first + i for i in range(len(rows))]


def _numbers(box: tuple[object, ...], drop: bool) -> list[str]:
    values = [str(v) for v in box]
    return values[:-1] if drop else values


def _expand(items: list[Entry], layout: Layout) -> list[tuple[int, Entry]]:
    """(entry index, entry) rows to write: omitted entries left out, repeated ones twice."""
    rows = []
    for k, e in enumerate(items):
        if k == layout.omit:
            continue
        rows.append((k, e))
        if k == layout.repeat:
            rows.append((k, e))
        if k == layout.conflict:
            rows.append((k, replace(e, box=_other_box(e.box))))
    return rows


def _first_and_second(rows: list[tuple[int, Entry]], lines: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """entry -> line of its first row, and -> line of its second row (if written twice)."""
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    for (k, _), line in zip(rows, lines):
        (second if k in first else first).setdefault(k, line)
    return first, second


def _c2s(root: Path, items: list[Entry], layout: Layout) -> Dataset:
    """Bbox file: one row per photo (boxes, source types); partition file: one pair row per item."""
    ds = Dataset("deepfashion-c2s", root, root)
    names = [f"img/TOPS/Tées/id_{e.item:08d}/{'comsumer' if e.domain == 'consumer' else 'shop'}_01{e.suffix}"
             for e in items]
    rows = _expand(items, layout)
    bbox = root / "Anno" / "list_bbox_consumer2shop.txt"
    bbox_lines = _write_list(bbox, "image_name clothes_type source_type x_1 y_1 x_2 y_2", [
        " ".join([names[k], "1", e.source or ("2" if e.domain == "consumer" else "1"), *_numbers(e.box, e.drop_column)])
        for k, e in rows
    ])
    first, second = _first_and_second(rows, bbox_lines)
    pair_rows = []
    for i in range(ITEMS):
        c, s = 2 * i, 2 * i + 1
        pair_rows.append(f"{names[c]} {names[s]} id_{i:08d} {items[c].status or items[s].status or 'test'}")
    partition = root / "Eval" / "list_eval_partition.txt"
    pair_lines = _write_list(partition, "image_pair_name_1 image_pair_name_2 item_id evaluation_status",
                             pair_rows, layout)
    for k, e in enumerate(items):
        _save(root / names[k], e.data)
        ds.add(root / names[k], default=f"{bbox}:{first[k]}" if k in first else "",
               status=f"{partition}:{pair_lines[e.item]}")
    ds.count, ds.header = f"{partition}:1", f"{partition}:2"
    ds.conflict = f"{bbox}:{second[layout.conflict]}" if layout.conflict is not None else ""
    return ds


def _inshop(root: Path, items: list[Entry], layout: Layout) -> Dataset:
    """Bbox file: boxes; partition file: item and status per photo (the records' source lines)."""
    ds = Dataset("inshop", root, root)
    names = [f"img/WOMEN/Dresses/id_{e.item:08d}/0{e.item}_{1 if e.domain == 'consumer' else 2}_front é{e.suffix}"
             for e in items]
    rows = _expand(items, layout)
    bbox = root / "Anno" / "list_bbox_inshop.txt"
    partition = root / "Eval" / "list_eval_partition.txt"
    bbox_lines = _write_list(bbox, "image_name clothes_type pose_type x_1 y_1 x_2 y_2",
                             [" ".join([names[k], "1", "1", *_numbers(e.box, False)]) for k, e in rows])
    part_lines = _write_list(partition, "image_name item_id evaluation_status", [
        " ".join([names[k], f"id_{e.item:08d}", e.status or ("query" if e.domain == "consumer" else "gallery")]
                 [: 2 if e.drop_column else 3])
        for k, e in rows
    ], layout)
    bbox_first, bbox_second = _first_and_second(rows, bbox_lines)
    part_first, _ = _first_and_second(rows, part_lines)
    for k, e in enumerate(items):
        _save(root / names[k], e.data)
        where = f"{partition}:{part_first[k]}" if k in part_first else ""
        ds.add(root / names[k], default=where, box=f"{bbox}:{bbox_first.get(k, '')}")
    ds.count, ds.header = f"{partition}:1", f"{partition}:2"
    ds.conflict = f"{bbox}:{bbox_second[layout.conflict]}" if layout.conflict is not None else ""
    return ds


def _csv(root: Path, items: list[Entry], layout: Layout) -> Dataset:
    table = root / "dataset.csv"
    ds = Dataset("csv", root, table)
    names = [f"photos ü/{k} {e.domain} {e.item} ß{e.suffix}" for k, e in enumerate(items)]
    lines = [] if layout.no_header else ["path,item_id,domain,split,x1,y1,x2,y2"]
    line_of: dict[int, int] = {}
    for k, e in _expand(items, layout):
        fields = [names[k], f"it{e.item}", e.source or e.domain, e.status or "test", *[str(v) for v in e.box]]
        line_of.setdefault(k, len(lines) + 1)
        lines.append(",".join(fields[:-1] if e.drop_column else fields))
    table.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    for k, e in enumerate(items):
        _save(root / names[k], e.data)
        ds.add(root / names[k], default=f"{table}:{line_of[k]}" if k in line_of else "")
    ds.header = f"{table}:1"
    return ds


def _s2s_box(box: tuple[object, ...]) -> dict[str, object]:
    x1, y1, x2, y2 = box
    numeric = all(isinstance(v, (int, float)) for v in box)
    return {"left": x1, "top": y1, "width": x2 - x1 if numeric else x2, "height": y2 - y1 if numeric else y2}


def _street2shop(root: Path, items: list[Entry], layout: Layout) -> Dataset:
    """Consumer photos (with boxes) in test_pairs, shop photos in retrieval; photo ids 1xx / 2xx."""
    ds = Dataset("street2shop", root, root)
    meta = root / "meta" / "json"
    meta.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[dict[str, object]]] = {"test_pairs_dresses.json": [], "retrieval_dresses.json": []}
    where: dict[int, str] = {}
    for k, e in _expand(items, layout):
        entry: dict[str, object] = {"photo": (100 if e.domain == "consumer" else 200) + e.item, "product": 10 + e.item}
        name = "test_pairs_dresses.json" if e.domain == "consumer" else "retrieval_dresses.json"
        if e.domain == "consumer":
            entry["bbox"] = _s2s_box(e.box)
        if e.drop_column:
            del entry["product"]
        where.setdefault(k, f"{meta / name}[{len(lists[name])}]")
        lists[name].append(entry)
    (meta / "train_pairs_dresses.json").write_text("[]")
    for name, data in lists.items():
        (meta / name).write_text(json.dumps(data))
    for k, e in enumerate(items):
        path = root / "images" / f"{(100 if e.domain == 'consumer' else 200) + e.item:09d}{e.suffix}"
        _save(path, e.data)
        ds.add(path, default=where.get(k, ""))
    return ds


def _df2(root: Path, items: list[Entry], layout: Layout) -> Dataset:
    """One image per entry under ``test/``; a repeated/conflicting entry becomes item2 of its file."""
    ds = Dataset("deepfashion2", root, root)
    for k, e in enumerate(items):
        stem = f"{k + 1:06d}"
        anno, image = root / "test" / "annos" / f"{stem}.json", root / "test" / "image" / f"{stem}.jpg"
        _save(image, e.data)
        if k == layout.omit:
            ds.add(image)
            continue
        garment: dict[str, object] = {"style": 1, "category_id": 1, "category_name": "short sleeve top",
                                      "bounding_box": list(e.box)}
        if e.drop_column:
            del garment["bounding_box"]
        data: dict[str, object] = {"source": e.source or ("user" if e.domain == "consumer" else "shop"),
                                   "pair_id": e.item + 1, "item1": garment}
        if k == layout.repeat:
            data["item2"] = dict(garment)
        if k == layout.conflict:
            data["item2"] = {**garment, "bounding_box": list(_other_box(e.box))}
        anno.parent.mkdir(parents=True, exist_ok=True)
        anno.write_text(json.dumps(data))
        ds.add(image, default=f"{anno}:item1", source=str(anno))
    return ds


def with_image(case: ImageCase, k: int = TARGET) -> list[Entry]:
    """The logical dataset with entry ``k``'s photo replaced by ``case``."""
    items = entries()
    items[k] = replace(items[k], data=case.make(items[k].item), suffix=case.suffix)
    return items


def with_entry(k: int = TARGET, **changes: object) -> list[Entry]:
    items = entries()
    items[k] = replace(items[k], **changes)
    return items


# ----------------------------------------------------------------------------- checkpoints

def tiny_checkpoint(path: Path, num_items: int = ITEMS, seed: int = 0) -> Path:
    """An untrained resnet18 ``global`` checkpoint at 32 px (interfaces.md: made without training)."""
    import torch

    from mmfl.checkpoint import atomic_save, model_payload
    from mmfl.config import config_to_dict, load_config
    from mmfl.models import build_model

    torch.manual_seed(seed)
    cfg = load_config("global", ["model.backbone=resnet18", "model.pretrained=none", "input.size=32", "data.format=csv"])
    model = build_model(cfg, num_items, 0, 0)
    atomic_save(model_payload(model, {
        "config": config_to_dict(cfg), "num_items": num_items, "num_attributes": 0, "num_categories": 0,
        "attribute_names": [], "category_names": [],
    }), path)
    return path
