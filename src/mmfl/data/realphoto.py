"""A retrieval benchmark built from real clothing photos that have no consumer/shop pairs.

``clothing-small`` (see its README in the shared folder) holds one photo per garment in 10
class folders. Real consumer photos of the same garments do not exist, so each photo becomes
one *item*: the clean photo, resized, is its shop image, and ``views`` consumer-style views are
rendered from it by :func:`consumer_view`, a seeded transform that imitates what separates a
street photo from a catalogue photo:

1. **crop / zoom**: keep 75-100 % of the photo's width and height at a random offset;
2. **perspective**: each corner moves by up to 12 % of the side (a camera not facing the garment);
3. **rotation**: -20..20 degrees (a tilted phone);
4. **background composite**: the warped photo is scaled to 50-85 % of the canvas and pasted at a
   random place on procedural clutter (a two-colour gradient, 6-15 random ellipses, rectangles,
   polygons and lines, sensor noise, defocus blur), edges feathered;
5. **partial occlusion** (60 % of views): an ellipse or rectangle (a hand, a bag, a chair) covering
   8-25 % of the garment's box, placed so that it overlaps the garment;
6. **colour cast**: per-channel gains 0.8-1.2, brightness 0.7-1.25, contrast 0.7-1.2, gamma 0.8-1.25;
7. **blur and noise** (blur in 50 % of views, radius up to 1.5 px at 256 px), then JPEG quality 60-92.

Each view records the garment's box (the warped photo's visible extent, clipped to the canvas),
as a detector would give for a street photo. The random stream of an item is derived from
``(seed, split, item id)`` alone, so worker count, ``max_items`` and build order never change an
item's views. This measures instance-level retrieval on real photographs under synthetic
consumer-style changes, **not** the true consumer-to-shop gap (real street photos differ in pose,
wear, lighting and the garment's shape on a body).

``protocol="hard"`` renders the queries with :func:`mmfl.data.realphoto_hard.hard_view`
instead (non-rigid warp, partial views, strong lighting, low resolution, motion blur, heavier
occlusion; listed in that module), from its own random stream, so ``standard`` views are
unchanged by it.

**Distractors.** ``distractors=N`` adds the shop images of N training photos that the
``max_items["train"]`` subset leaves out (the next N in the same seeded order), as split
``test``, shop domain only. They widen the gallery towards catalogue size
(``gallery_splits=["val", "test"]``) and are never training items: the build checks that the
two id sets are disjoint and raises otherwise.

Only rendered views and resized copies are written, and only under ``out`` (never the repository).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mmfl.atomic import atomic_write_text
from mmfl.data.images import open_image
from mmfl.data.records import Box
from mmfl.errors import DataError

#: Source folder name -> split name in the written dataset (the trainer's defaults are train/val).
SPLIT_NAMES = {"train": "train", "validation": "val"}
CSV_HEADER = ["path", "item_id", "domain", "split", "x1", "y1", "x2", "y2", "category"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DATASET_DIR = Path("data") / "clothing-small"
#: Per protocol, bumped whenever its rendering changes, so a cached build is never reused across versions.
RENDER_VERSIONS = {"standard": 1, "hard": 1}
PROTOCOLS = tuple(RENDER_VERSIONS)
#: The split the distractor shop images are written under (never read by the trainer).
DISTRACTOR_SPLIT = "test"


def find_clothing_small(src: str | Path | None = None) -> Path | None:
    """Locate the photo folder: ``src``, else ``$MMFL_SHARED/data/clothing-small``, else ``../shared``.

    ``src`` may name the photo folder itself or a shared folder holding ``data/clothing-small``.
    The default is the ``shared`` folder beside the repository checkout (where CI's clone has
    it too). Returns None when nothing is there, so callers can skip cleanly.
    """
    if src is not None:
        candidates = [Path(src), Path(src) / DATASET_DIR]
    else:
        candidates = []
        if os.environ.get("MMFL_SHARED"):
            candidates.append(Path(os.environ["MMFL_SHARED"]) / DATASET_DIR)
        repo = Path(__file__).resolve().parents[3]
        candidates += [repo.parent / "shared" / DATASET_DIR, Path.cwd().parent / "shared" / DATASET_DIR]
    for path in candidates:
        if (path / "train").is_dir() and (path / "validation").is_dir():
            return path
    return None


@dataclass(frozen=True)
class _ItemJob:
    """Everything a (spawned) worker needs to render one item: plain, picklable values."""

    source: str
    stem: str
    category: str
    split: str
    views: int
    seed: int
    size: int
    out: str
    protocol: str = "standard"


def build_realphoto(
    src: Path,
    out: Path,
    views: int = 3,
    seed: int = 0,
    size: int = 256,
    max_items: int | Mapping[str, int | None] | None = None,
    splits: tuple[str, ...] = ("train", "validation"),
    workers: int = 1,
    protocol: str = "standard",
    distractors: int = 0,
) -> Path:
    """Render the benchmark into ``out`` and return ``out/dataset.csv`` (the ``csv`` format).

    ``max_items`` caps the items of each split (an int), or of the split folders a mapping names
    (``{"train": 300}`` keeps the whole validation split); the subset is a seeded hash order, so
    it is spread over the classes and stable when the cap grows. ``protocol`` picks the query
    renderer (``standard`` or ``hard``); ``distractors`` adds that many shop-only photos of
    unused training items (see the module docstring). A folder already built with the same
    parameters is reused as it is (``build.json`` records them).
    """
    src, out = Path(src), Path(out)
    if protocol not in RENDER_VERSIONS:
        raise DataError(f"protocol: unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")
    if distractors < 0:
        raise DataError(f"distractors: {distractors} must be 0 or more")
    if views < 1:
        raise DataError(f"views: {views} must be at least 1")
    if size < 32:
        raise DataError(f"size: {size} is too small (use 32 or more)")
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown:
        raise DataError(f"splits: unknown split folder '{unknown[0]}' (allowed: {', '.join(SPLIT_NAMES)})")
    caps = dict(max_items) if isinstance(max_items, Mapping) else {folder: max_items for folder in splits}
    params = {"render_version": RENDER_VERSIONS[protocol], "protocol": protocol, "source": str(src.resolve()),
              "views": views, "seed": seed, "size": size, "max_items": {f: caps.get(f) for f in splits},
              "splits": list(splits), "distractors": distractors}
    csv_path, manifest = out / "dataset.csv", out / "build.json"
    if csv_path.is_file() and manifest.is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("params") == params:
                return csv_path
        except (OSError, ValueError):
            pass

    jobs = [
        _ItemJob(str(path), path.stem, category, SPLIT_NAMES[folder], views, seed, size, str(out), protocol)
        for folder in splits
        for path, category in _select(_list_photos(src, folder), caps.get(folder), seed)
    ]
    if distractors:
        jobs += [_ItemJob(str(path), path.stem, category, DISTRACTOR_SPLIT, 0, seed, size, str(out), protocol)
                 for path, category in _distractor_photos(src, caps.get("train"), distractors, seed)]
        check_no_leak(jobs)
    _check_unique(jobs)
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # an interrupted rebuild must never pass for the old build
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            per_item = pool.map(_render_item, jobs, chunksize=8)
    else:
        per_item = [_render_item(job) for job in jobs]

    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(CSV_HEADER)
    for rows in per_item:
        writer.writerows(rows)
    atomic_write_text(csv_path, table.getvalue())
    counts = {name: sum(1 for j in jobs if j.split == name)
              for name in [SPLIT_NAMES[f] for f in splits] + ([DISTRACTOR_SPLIT] if distractors else [])}
    manifest.write_text(json.dumps({"params": params, "items": counts}, indent=2) + "\n", encoding="utf-8")
    return csv_path


def _list_photos(src: Path, folder: str) -> list[tuple[Path, str]]:
    """(photo, class) pairs of one split folder, in a stable (class, name) order."""
    root = src / folder
    if not root.is_dir():
        raise DataError(f"{root}: split folder not found (expected {src}/{{train,validation}}/<class>/*.jpg)")
    photos = [
        (path, class_dir.name)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not photos:
        raise DataError(f"{root}: no photos in its class folders")
    return photos


def _ranked(photos: list[tuple[Path, str]], seed: int) -> list[int]:
    """Indices of ``photos`` in the seeded hash order that both the subset and the distractors follow."""
    return sorted(range(len(photos)), key=lambda i: _digest(f"subset:{seed}:{photos[i][0].stem}"))


def _select(photos: list[tuple[Path, str]], max_items: int | None, seed: int) -> list[tuple[Path, str]]:
    """The first ``max_items`` photos in seeded hash order, kept in listing order."""
    if max_items is None or max_items >= len(photos):
        return photos
    if max_items < 1:
        raise DataError(f"max_items: {max_items} must be at least 1")
    keep = set(_ranked(photos, seed)[:max_items])
    return [p for i, p in enumerate(photos) if i in keep]


def _distractor_photos(src: Path, train_cap: int | None, count: int, seed: int) -> list[tuple[Path, str]]:
    """The ``count`` training photos right after the training subset in the seeded order (listing order).

    Taking them from the same ranking is what keeps them out of the training set: the subset is
    the ranking's first ``train_cap`` entries, the distractors the next ``count``.
    """
    photos = _list_photos(src, "train")
    spare = len(photos) - (train_cap if train_cap is not None else len(photos))
    if count > max(0, spare):
        raise DataError(f"distractors: {count} asked for, but only {max(0, spare)} training photos are left out "
                        f"of the {train_cap if train_cap is not None else 'full'} training subset "
                        f"(lower --items or the distractor count)")
    keep = set(_ranked(photos, seed)[train_cap:train_cap + count])
    return [p for i, p in enumerate(photos) if i in keep]


def check_no_leak(jobs: list[_ItemJob]) -> None:
    """Raise if any distractor is also a training item (the gallery would hold a photo the model learned)."""
    train = {job.stem for job in jobs if job.split == SPLIT_NAMES["train"]}
    leaked = sorted(job.stem for job in jobs if job.split == DISTRACTOR_SPLIT and job.stem in train)
    if leaked:
        raise DataError(f"distractors: {len(leaked)} are training items (first: '{leaked[0]}')")


def _check_unique(jobs: list[_ItemJob]) -> None:
    seen: dict[str, str] = {}
    for job in jobs:
        if job.stem in seen:
            raise DataError(f"{job.source}: item id '{job.stem}' repeats {seen[job.stem]} (file stems must be unique)")
        seen[job.stem] = job.source


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def item_rng(seed: int, split: str, item_id: str, protocol: str = "standard") -> np.random.Generator:
    """The random stream of one item: a function of (seed, split, item, protocol) only.

    The standard stream keeps its original key, so adding protocols never changed its views.
    """
    prefix = "realphoto" if protocol == "standard" else f"realphoto-{protocol}"
    return np.random.default_rng(_digest(f"{prefix}:{seed}:{split}:{item_id}"))


def view_renderer(protocol: str) -> Callable[[Image.Image, np.random.Generator, int], tuple[Image.Image, Box, int]]:
    """The query renderer of a protocol: ``(photo, rng, size) -> (view, garment box, JPEG quality)``."""
    if protocol == "standard":
        return consumer_view
    if protocol == "hard":
        from mmfl.data.realphoto_hard import hard_view  # imports this module's helpers, so imported late

        return hard_view
    raise DataError(f"protocol: unknown protocol '{protocol}' (choose from {', '.join(PROTOCOLS)})")


def _render_item(job: _ItemJob) -> list[list[str]]:
    """Write one item's shop image and views; return its CSV rows."""
    photo = open_image(job.source)
    rel_dir = Path("images") / job.split / job.category
    (Path(job.out) / rel_dir).mkdir(parents=True, exist_ok=True)
    rng = item_rng(job.seed, job.split, job.stem, job.protocol)
    render = view_renderer(job.protocol)

    shop = shop_image(photo, job.size)
    shop_rel = rel_dir / f"{job.stem}_shop.jpg"
    shop.save(Path(job.out) / shop_rel, quality=95)
    rows = [[shop_rel.as_posix(), job.stem, "shop", job.split, 0, 0, shop.width, shop.height, job.category]]
    for k in range(1, job.views + 1):
        view, box, quality = render(photo, rng, job.size)
        view_rel = rel_dir / f"{job.stem}_v{k}.jpg"
        view.save(Path(job.out) / view_rel, quality=quality)
        rows.append([view_rel.as_posix(), job.stem, "consumer", job.split, *box, job.category])
    return rows


def shop_image(photo: Image.Image, size: int) -> Image.Image:
    """The clean photo with its long side resized to ``size`` (aspect kept)."""
    scale = size / max(photo.size)
    return photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BICUBIC)


def consumer_view(photo: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, Box, int]:
    """One consumer-style ``size`` x ``size`` view of ``photo``: (image, garment box, JPEG quality).

    The steps and their ranges are listed in the module docstring; the box is the warped
    photo's extent on the canvas, always inside the image and never empty.
    """
    canvas = clutter_background(rng, size)

    # Crop / zoom.
    fw, fh = rng.uniform(0.75, 1.0, size=2)
    cw, ch = max(8, round(photo.width * fw)), max(8, round(photo.height * fh))
    x0, y0 = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    garment = photo.crop((int(x0), int(y0), int(x0) + cw, int(y0) + ch))
    scale = size * rng.uniform(0.5, 0.85) / max(garment.size)
    garment = garment.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BICUBIC).convert("RGBA")

    # Perspective then rotation, carried by the alpha channel (transparent outside the photo).
    garment = _perspective(garment, rng, 0.12)
    garment = garment.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, expand=True)
    # Background composite at a random place.
    box = paste_garment(canvas, garment, rng)

    if rng.random() < 0.6:
        _occlude(canvas, box, rng)
    canvas = _colour_cast(canvas, rng)
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)) * size / 256))
    canvas = _add_noise(canvas, rng, float(rng.uniform(0.0, 6.0)))
    return canvas, box, int(rng.integers(60, 93))


def paste_garment(canvas: Image.Image, garment: Image.Image, rng: np.random.Generator) -> Box:
    """Paste the RGBA ``garment`` (shrunk to fit the square ``canvas``, edges feathered) at a random place;
    returns the box of its opaque part, clipped to the canvas: the garment's box a detector would give."""
    size = canvas.width
    if max(garment.size) > size:
        fit = size / max(garment.size)
        garment = garment.resize((max(8, int(garment.width * fit)), max(8, int(garment.height * fit))), Image.BICUBIC)
    alpha = garment.getchannel("A")
    solid = alpha.point(lambda a: 255 if a > 127 else 0)
    garment.putalpha(alpha.filter(ImageFilter.GaussianBlur(0.8)))
    ox = int(rng.integers(0, size - garment.width + 1))
    oy = int(rng.integers(0, size - garment.height + 1))
    canvas.paste(garment, (ox, oy), garment)
    bx1, by1, bx2, by2 = solid.getbbox() or (0, 0, garment.width, garment.height)
    return (ox + bx1, oy + by1, min(size, ox + bx2), min(size, oy + by2))


def clutter_background(rng: np.random.Generator, size: int) -> Image.Image:
    """Procedural clutter: a gradient between two colours, random shapes, noise and defocus."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    base = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")

    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (int(rng.integers(120, 256)),)
        x1, y1 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.05, 0.5, size=2) * size
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse((x1, y1, x1 + w, y1 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x1, y1, x1 + w, y1 + h), fill=colour)
        elif kind == 2:
            points = [tuple(p) for p in (rng.uniform(0, 1, size=(int(rng.integers(3, 7)), 2)) * size)]
            draw.polygon(points, fill=colour)
        else:
            draw.line((x1, y1, x1 + w, y1 + h), fill=colour, width=max(1, int(rng.integers(1, 6)) * size // 128))
    base.paste(overlay, (0, 0), overlay)
    base = _add_noise(base, rng, float(rng.uniform(2.0, 10.0)))
    return base.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0)) * size / 256))


def _perspective(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Move each corner by up to ``strength`` of the side, onto a canvas that holds the result."""
    w, h = img.size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    dst = src + rng.uniform(-strength, strength, size=(4, 2)) * [w, h]
    dst -= dst.min(axis=0)
    out_w, out_h = (int(np.ceil(v)) for v in dst.max(axis=0))
    # PIL maps output -> input pixels: solve for the homography taking dst corners to src corners.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    coeffs = np.linalg.solve(np.array(rows), np.array(rhs))
    return img.transform((max(8, out_w), max(8, out_h)), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC)


def _occlude(canvas: Image.Image, box: Box, rng: np.random.Generator,
             area_share: tuple[float, float] = (0.08, 0.25), aspect_range: tuple[float, float] = (0.5, 2.0)) -> None:
    """Draw an opaque ellipse or rectangle covering ``area_share`` of the box (8-25 % by default), centred inside it."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    area = rng.uniform(*area_share) * bw * bh
    aspect = rng.uniform(*aspect_range)
    ow, oh = np.sqrt(area * aspect), np.sqrt(area / aspect)
    cx, cy = rng.uniform(x1, x2), rng.uniform(y1, y2)
    shape = (cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2)
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        draw.ellipse(shape, fill=colour)
    else:
        draw.rectangle(shape, fill=colour)


def _colour_cast(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting: per-channel gains, brightness, contrast around the mean, and gamma."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr * rng.uniform(0.8, 1.2, size=3) * rng.uniform(0.7, 1.25)
    arr = (arr - arr.mean()) * rng.uniform(0.7, 1.2) + arr.mean()
    arr = np.clip(arr, 0, 1) ** rng.uniform(0.8, 1.25)
    return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "RGB")


def _add_noise(img: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, sigma, size=(img.height, img.width, 3))
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
