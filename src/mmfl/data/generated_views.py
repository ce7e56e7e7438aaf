"""Training and scoring on a catalogue alone: consumer-style views generated from the shop photos.

Most shops have product photos and no customer photos. This module gives such data a consumer
side, with the renderer of :mod:`mmfl.data.consumer_views`:

* **Training** (:func:`training_records`, :class:`ViewMaker`): each item without consumer photos
  gets ``data.views_per_item`` *virtual* consumer records (``Record.view`` = 1, 2, ...). The P x K
  sampler treats them like photos; the data workers render them when loaded, from a stream keyed
  by (training seed, epoch, item, photo, view number), so an epoch is reproducible and the next
  epoch sees new views. With ``data.view_mix`` between 0 and 1 on data that has consumer photos,
  each real consumer image is replaced by a generated view of its item with that probability.
* **Held-out views** (:func:`with_held_out_views`): validation and ``mmfl eval`` need the same
  queries in every run and epoch, so the views of a catalogue-only split are rendered once from
  ``data.view_seed`` (never the training seed), written to a cache and read back as consumer
  records carrying their garment box. The cache key holds the photo's path, size and mtime and
  the renderer's version, so a changed photo or renderer never reuses a stale view.

Which data gets views is decided in one place, :func:`plan_views`.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mmfl.config import Config, view_mix
from mmfl.data.consumer_views import (
    MIN_PHOTO_SIDE, RENDER_VERSIONS, key_digest, open_view_source, render_view, view_rng, view_size,
)
from mmfl.data.consumer_views.canvas import warm_up
from mmfl.data.formats.checks import probe_images
from mmfl.data.images import open_crop
from mmfl.data.records import Box, Catalog, Record
from mmfl.errors import DataError

#: Environment variable naming the cache root (``views/`` below it), else ``~/.cache/mmfl``.
CACHE_ENV = "MMFL_CACHE"
#: Decoded shop photos a data worker keeps: a P x K batch draws an item's views together, so its
#: photo is decoded once instead of once per view (decoding was a fifth of a view's cost).
PHOTO_CACHE_SIZE = 32


@dataclass(frozen=True)
class ViewPlan:
    """How generated views enter a run: renderer, count, share, canvas, seeds and cache folder."""

    protocol: str
    per_item: int
    mix: float  # share of the real consumer-side training images replaced by generated views
    size: int
    seed: int  # the training stream's seed
    held_out_seed: int  # data.view_seed: the held-out views' seed, fixed across runs
    cache: Path


def plan_views(cfg: Config, catalog: Catalog, for_training: bool = True) -> ViewPlan | None:
    """The run's :class:`ViewPlan`, or None when no view is generated (``data.views=none``, or a mix of 0).

    ``data.view_mix=auto`` is 1 when the whole dataset has no consumer photo (a catalogue) and 0
    otherwise, so an annotated consumer-to-shop dataset trains exactly as before by default.
    Catalogue-only training without views is refused: nothing would teach a shop photo to match
    a shopper's. ``for_training`` False plans for held-out views only (``mmfl eval``), where the
    share does not matter.
    """
    data = cfg.data
    has_consumer = any(r.domain == "consumer" for r in catalog.records)
    share = view_mix(data)
    mix = share if share is not None else (0.0 if has_consumer else 1.0)
    off = data.views == "none" or (for_training and mix == 0.0)
    if off and for_training and not has_consumer:
        why = "data.views=none" if data.views == "none" else f"data.view_mix={data.view_mix}"
        raise DataError(f"{data.root}: no consumer photos, and {why} generates no views in their place: nothing "
                        "would teach the model to match a shopper's photo (set data.views=hard)")
    if off:
        return None
    return ViewPlan(protocol=data.views, per_item=data.views_per_item, mix=mix,
                    size=data.view_size or view_size(cfg.input.size), seed=cfg.seed, held_out_seed=data.view_seed,
                    cache=Path(data.view_cache).expanduser() if data.view_cache else default_cache())


def default_cache() -> Path:
    """``$MMFL_CACHE/views``, else ``~/.cache/mmfl/views`` (``$XDG_CACHE_HOME`` honoured)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "views"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmfl" / "views"


def training_records(records: Sequence[Record], plan: ViewPlan) -> list[Record]:
    """``records`` plus ``plan.per_item`` virtual consumer records for every item that has shop photos and
    no consumer photo; view k of an item is rendered from its ((k - 1) mod n)-th shop photo."""
    shops: dict[str, list[Record]] = {}
    with_consumer = set()
    for r in records:
        if r.domain == "shop":
            shops.setdefault(r.item_id, []).append(r)
        else:
            with_consumer.add(r.item_id)
    virtual = [
        Record(path=source, item_id=item, domain="consumer", split=photos[0].split, category=photos[0].category,
               source=f"generated view {k} of {source}", view=k)
        for item, photos in shops.items() if item not in with_consumer
        for k in range(1, plan.per_item + 1)
        for source in [photos[(k - 1) % len(photos)].path]
    ]
    return [*records, *virtual]


def check_view_sources(records: Sequence[Record], skip_bad: bool) -> tuple[list[Record], list[str]]:
    """Refuse (or, with ``skip_bad``, drop and list) shop photos too small to render a view from.

    Reads headers only. A dropped photo takes its virtual views with it; an item left with no
    shop photo leaves the catalogue-only training entirely (it would have nothing to show).
    """
    sources = sorted({r.path for r in records if r.domain == "shop" or r.view})  # every photo a view may come from
    sizes = probe_images(sources, "header")
    small = {p for p, size in sizes.items() if isinstance(size, tuple) and min(size) < MIN_PHOTO_SIDE}
    reasons = [f"{p}: photo is {sizes[p][0]}x{sizes[p][1]}, too small to render a consumer view from "
               f"(needs {MIN_PHOTO_SIDE} px or more each way)" for p in sorted(small)]
    if reasons and not skip_bad:
        raise DataError(reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    return [r for r in records if r.path not in small], reasons


@dataclass
class ViewMaker:
    """Renders the generated view a training record stands for, in the data workers.

    Picklable and small (a DataLoader copies it into each worker). :meth:`set_epoch` before each
    epoch's loader is built: views are drawn from (seed, epoch, item, photo, view number), so an
    epoch repeats exactly and the next one differs.
    """

    plan: ViewPlan
    shop_photos: dict[str, list[str]] = field(default_factory=dict)  # item -> its shop photos (for view_mix)
    epoch: int = 0
    _photos: OrderedDict = field(default_factory=OrderedDict, repr=False)  # path -> decoded photo (LRU)

    @classmethod
    def for_records(cls, plan: ViewPlan, records: Sequence[Record]) -> ViewMaker:
        """The maker for a training set; draws the renderer's shared backgrounds before the workers fork."""
        warm_up(plan.size)
        shops: dict[str, list[str]] = {}
        for r in records:
            if r.domain == "shop":
                shops.setdefault(r.item_id, []).append(r.path)
        return cls(plan, shops)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_for(self, rec: Record) -> tuple[str, np.random.Generator] | None:
        """(shop photo, stream) of the view to load in place of ``rec``'s own pixels, or None to load them."""
        p = self.plan
        if rec.view:
            return rec.path, view_rng("train-view", p.seed, self.epoch, rec.item_id, rec.path, rec.view)
        if rec.domain != "consumer" or rec.item_id not in self.shop_photos:
            return None
        rng = view_rng("train-mix", p.seed, self.epoch, rec.item_id, rec.path, rec.box)
        if rng.random() >= p.mix:
            return None
        photos = self.shop_photos[rec.item_id]
        return photos[int(rng.integers(len(photos)))], rng

    def render(self, rec: Record) -> tuple[bytes, Box] | None:
        """The JPEG bytes and garment box of ``rec``'s view this epoch, or None when ``rec`` is its own photo."""
        chosen = self.view_for(rec)
        if chosen is None:
            return None
        photo_path, rng = chosen
        view = render_view(self._photo(photo_path, rec), rng, self.plan.size, self.plan.protocol)
        return view.jpeg, view.box

    def _photo(self, path: str, rec: Record) -> Image.Image:
        """The decoded shop photo, from the small per-worker cache when a view of it was just rendered."""
        photo = self._photos.pop(path, None)
        if photo is None:
            photo = open_view_source(path, self.plan.size, f"{path} ({rec.source})")
            if len(self._photos) >= PHOTO_CACHE_SIZE:
                self._photos.popitem(last=False)
        self._photos[path] = photo
        return photo

    def image(self, rec: Record) -> Image.Image | None:
        """The view's crop to its garment box, decoded as a phone photo would be, or None (see :meth:`render`)."""
        rendered = self.render(rec)
        if rendered is None:
            return None
        jpeg, box = rendered
        return open_crop(jpeg, box, f"generated view of {rec.path}")[0]


@dataclass(frozen=True)
class _HeldOutJob:
    """One held-out view to render into the cache (plain values: it crosses to a spawned worker)."""

    source: str
    rng_key: tuple
    size: int
    protocol: str
    target: str


def with_held_out_views(catalog: Catalog, splits: Sequence[str], plan: ViewPlan, workers: int = 1) -> Catalog:
    """``catalog`` plus ``plan.per_item`` cached consumer views of every item of each catalogue-only split.

    A split that already has consumer photos is left as it is. Views are rendered once (in
    ``workers`` processes), written atomically to the cache and reused by every later run; the
    stream of view k of an item is (``data.view_seed``, item, photo name, k), so the same folder
    gives byte-identical queries in every run, epoch and machine.
    """
    added: list[tuple[Record, str]] = []  # (the view's record without a file yet, its cache key)
    jobs: list[_HeldOutJob] = []
    folder = plan.cache / f"{plan.protocol}-v{RENDER_VERSIONS[plan.protocol]}-{plan.size}px-seed{plan.held_out_seed}"
    cached = _cached_boxes(folder)
    for split in dict.fromkeys(splits):
        records = catalog.split(split)
        if not records or any(r.domain == "consumer" for r in records):
            continue
        for view in training_records(records, plan):
            if not view.view:
                continue
            stat = os.stat(view.path)
            name = f"{key_digest(view.path, stat.st_size, stat.st_mtime_ns, view.item_id, view.view):016x}"
            if name not in cached:
                jobs.append(_HeldOutJob(view.path, ("held-out-view", plan.held_out_seed, view.item_id,
                                                    Path(view.path).name, view.view),
                                        plan.size, plan.protocol, str(folder / name)))
            added.append((view, name))
    if jobs:
        folder.mkdir(parents=True, exist_ok=True)
        if workers > 1 and len(jobs) > 8:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                boxes = pool.map(_render_held_out, jobs, chunksize=4)
        else:
            boxes = [_render_held_out(job) for job in jobs]
        cached.update({Path(job.target).name: box for job, box in zip(jobs, boxes)})
    views = [replace(r, path=str(folder / f"{name}-{'-'.join(map(str, cached[name]))}.jpg"), box=cached[name], view=0,
                     source=f"held-out {r.source}") for r, name in added]
    return replace(catalog, records=[*catalog.records, *views])


def _cached_boxes(folder: Path) -> dict[str, Box]:
    """Cache entry -> box, read from the file names (``<key>-x1-y1-x2-y2.jpg``): one listing, no file opened."""
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.glob("*.jpg"):
        key, *corners = path.stem.split("-")
        if len(corners) == 4 and all(c.isdigit() for c in corners):
            out[key] = tuple(int(c) for c in corners)
    return out


def _render_held_out(job: _HeldOutJob) -> Box:
    """Render one held-out view and write it as ``<target>-x1-y1-x2-y2.jpg`` (temp file, then rename)."""
    view = render_view(open_view_source(job.source, job.size), view_rng(*job.rng_key), job.size, job.protocol)
    final = Path(f"{job.target}-{'-'.join(map(str, view.box))}.jpg")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.write_bytes(view.jpeg)
    os.replace(tmp, final)
    return view.box
