"""A retrieval benchmark built from real clothing photos that have no consumer/shop pairs.

``clothing-small`` (see its README in the shared folder) holds one photo per garment in 10
class folders. Real consumer photos of the same garments do not exist, so each photo becomes
one *item*: the clean photo, resized, is its shop image, and ``views`` consumer-style views are
rendered from it by :func:`mmfl.data.consumer_views.render_view` (the ``standard`` or ``hard``
protocol; every step and range is listed in :mod:`mmfl.data.consumer_views.standard` and
:mod:`mmfl.data.consumer_views.hard`), the same renderer ``mmfl train`` uses on catalogue-only
data. Each view records the garment's box, as a detector would give for a street photo. The
random stream of an item is derived from ``(seed, split, item id, protocol)`` alone
(:func:`item_rng`), so worker count, ``max_items`` and build order never change an item's views,
and the two protocols never share a stream. This measures instance-level retrieval on real
photographs under synthetic consumer-style changes, **not** the true consumer-to-shop gap (real
street photos differ in pose, wear, lighting and the garment's shape on a body).

**Catalogue only.** ``catalogue.csv`` beside ``dataset.csv`` is the same benchmark with the
training split as a shop has it: one row per training item naming the original photo, no
consumer image, no box. ``mmfl train`` on it generates the consumer views on the fly
(:mod:`mmfl.data.generated_views`) instead of reading the pre-rendered ones; validation, queries
and distractors are the very rows of ``dataset.csv``, so the two trainings are scored alike.

**Distractors.** ``distractors=N`` adds the shop images of N training photos that the
``max_items["train"]`` subset leaves out (the next N in the same seeded order), as split
``test``, shop domain only. They widen the gallery towards catalogue size
(``gallery_splits=["val", "test"]``) and are never training items: the build checks that the
two id sets are disjoint and raises otherwise.

Only rendered views and resized copies are written, and only under ``out`` (never the repository).
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmfl.atomic import atomic_write_text
from mmfl.data.consumer_views import (
    RENDER_VERSIONS, check_protocol, key_digest, open_view_source, render_view, view_rng,
)
from mmfl.errors import DataError

#: Source folder name -> split name in the written dataset (the trainer's defaults are train/val).
SPLIT_NAMES = {"train": "train", "validation": "val"}
CSV_HEADER = ["path", "item_id", "domain", "split", "x1", "y1", "x2", "y2", "category"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DATASET_DIR = Path("data") / "clothing-small"
#: The split the distractor shop images are written under (never read by the trainer).
DISTRACTOR_SPLIT = "test"
#: The benchmark with its training split as a bare catalogue (written beside ``dataset.csv``).
CATALOGUE_NAME = "catalogue.csv"


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
    """Render the benchmark into ``out`` and return ``out/dataset.csv`` (the ``csv`` format; ``catalogue.csv``
    beside it holds the same data with the training split as a bare catalogue, see the module docstring).

    ``max_items`` caps the items of each split (an int), or of the split folders a mapping names
    (``{"train": 300}`` keeps the whole validation split); the subset is a seeded hash order, so
    it is spread over the classes and stable when the cap grows. ``protocol`` picks the query
    renderer (``standard`` or ``hard``); ``distractors`` adds that many shop-only photos of
    unused training items (see the module docstring). A folder already built with the same
    parameters is reused as it is (``build.json`` records them).
    """
    src, out = Path(src), Path(out)
    check_protocol(protocol)
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
    if csv_path.is_file() and (out / CATALOGUE_NAME).is_file() and manifest.is_file():
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

    catalogue = [
        row
        for job, rows in zip(jobs, per_item)
        for row in ([[str(Path(job.source).resolve()), job.stem, "shop", job.split, "", "", "", "", job.category]]
                    if job.split == SPLIT_NAMES["train"] else rows)
    ]
    atomic_write_text(csv_path, _csv_text([row for rows in per_item for row in rows]))
    atomic_write_text(out / CATALOGUE_NAME, _csv_text(catalogue))
    counts = {name: sum(1 for j in jobs if j.split == name)
              for name in [SPLIT_NAMES[f] for f in splits] + ([DISTRACTOR_SPLIT] if distractors else [])}
    manifest.write_text(json.dumps({"params": params, "items": counts}, indent=2) + "\n", encoding="utf-8")
    return csv_path


def _csv_text(rows: list[list]) -> str:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    return table.getvalue()


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
    return sorted(range(len(photos)), key=lambda i: key_digest("subset", seed, photos[i][0].stem))


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


def item_rng(seed: int, split: str, item_id: str, protocol: str = "standard") -> np.random.Generator:
    """The random stream of one item's views, drawn one after the other: a function of (seed, split, item,
    protocol) only. The standard stream keeps its original key, so adding protocols never changed its views."""
    return view_rng("realphoto" if protocol == "standard" else f"realphoto-{protocol}", seed, split, item_id)


def _render_item(job: _ItemJob) -> list[list[str]]:
    """Write one item's shop image and views; return its CSV rows."""
    photo = open_view_source(job.source, job.size)
    rel_dir = Path("images") / job.split / job.category
    (Path(job.out) / rel_dir).mkdir(parents=True, exist_ok=True)
    rng = item_rng(job.seed, job.split, job.stem, job.protocol)

    shop = shop_image(photo, job.size)
    shop_rel = rel_dir / f"{job.stem}_shop.jpg"
    shop.save(Path(job.out) / shop_rel, quality=95)
    rows = [[shop_rel.as_posix(), job.stem, "shop", job.split, 0, 0, shop.width, shop.height, job.category]]
    for k in range(1, job.views + 1):
        view = render_view(photo, rng, job.size, job.protocol)
        view_rel = rel_dir / f"{job.stem}_v{k}.jpg"
        (Path(job.out) / view_rel).write_bytes(view.jpeg)
        rows.append([view_rel.as_posix(), job.stem, "consumer", job.split, *view.box, job.category])
    return rows


def shop_image(photo: Image.Image, size: int) -> Image.Image:
    """The clean photo with its long side resized to ``size`` (aspect kept)."""
    scale = size / max(photo.size)
    return photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BICUBIC)
