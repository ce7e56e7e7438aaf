"""What every gallery backend shares: the manifest, gallery entries, filters and the store protocol.

An index is a folder whose ``manifest.json`` is the single commit point. Backends write their
data under names that carry a *generation* (``vectors-<gen>.faiss``, Milvus collection
``mmfl_<index_id>_<gen>``), and a build becomes visible only when the manifest naming the new
generation replaces the old one with an atomic rename. A build that fails or is killed before
that rename leaves the previous manifest, and so the previous index, untouched; its leftovers
are removed by the next successful build. Live updates (:class:`mmfl.catalog.Catalog`) commit
the same way: an added or removed item is written first (a FAISS journal line, Milvus rows)
and is part of the index once the manifest recording it is renamed into place.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

from mmfl.atomic import atomic_write_text
from mmfl.errors import GalleryIndexError, MMFLError
from mmfl.index.ann import KINDS

FORMAT = "mmfl-index"
VERSION = 1
MANIFEST = "manifest.json"
BACKENDS = ("faiss", "milvus")
#: Keys ``--filter key=value`` understands; values of one key are OR'ed for categories, AND'ed for attributes.
FILTER_KEYS = ("category", "attribute")
_REQUIRED = ("backend", "kind", "embed_dim", "count", "checkpoint", "checkpoint_sha256", "generation", "index_id")


@dataclass(frozen=True)
class Entry:
    """One gallery image: its item, absolute image path, category and attribute names.

    ``attribute_source`` says where ``attributes`` come from: ``"annotated"`` (the dataset's
    labels of the item), ``"predicted"`` (the model's decisions, for items without labels) or
    None (neither: no labels and no attribute head; also rows of indexes built before it existed).
    """

    item_id: str
    image: str
    category: str | None = None
    attributes: tuple[str, ...] = ()
    attribute_source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "image": self.image, "category": self.category,
                "attributes": list(self.attributes), "attribute_source": self.attribute_source}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Entry":
        return cls(str(d["item_id"]), str(d["image"]), d.get("category") or None, tuple(d.get("attributes") or ()),
                   d.get("attribute_source") or None)


@dataclass(frozen=True)
class Hit:
    """One nearest image: its row in the index, inner-product score and entry."""

    row: int
    score: float
    entry: Entry


@dataclass(frozen=True)
class Filter:
    """Result constraints: the item's category is one of ``categories`` (if any) and it has every attribute."""

    categories: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A bare string is iterable, so Filter(attributes="denim") used to filter on "d", "e", "n", ...
        # and silently match nothing: every field must be a list of names.
        for name in ("categories", "attributes"):
            object.__setattr__(self, name, name_list(getattr(self, name), f"Filter.{name}"))

    @classmethod
    def coerce(cls, value: "Filter | Mapping[str, Any] | None") -> "Filter":
        """A Filter from a Filter, None (no filter) or a mapping with the keys ``categories`` / ``attributes``."""
        if value is None:
            return cls()
        if isinstance(value, Filter):
            return value
        if not isinstance(value, Mapping):
            raise MMFLError(f"filter: expected a Filter or a dict with categories/attributes, got {type(value).__name__}")
        unknown = sorted(set(value) - {"categories", "attributes"})
        if unknown:
            raise MMFLError(f"filter: unknown key '{unknown[0]}' (use categories and attributes, each a list of names)")
        return cls(value.get("categories", ()), value.get("attributes", ()))

    def __bool__(self) -> bool:
        return bool(self.categories or self.attributes)

    def matches(self, entry: Entry) -> bool:
        if self.categories and entry.category not in self.categories:
            return False
        return all(a in entry.attributes for a in self.attributes)

    def describe(self) -> list[str]:
        return [f"category={c}" for c in self.categories] + [f"attribute={a}" for a in self.attributes]


def name_list(value: Any, what: str) -> tuple[str, ...]:
    """``value`` (a list or tuple of non-empty strings) as a tuple; a bare string or anything else is a
    one-line MMFLError naming ``what``, since iterating a string would yield its letters."""
    if isinstance(value, (str, bytes)):
        raise MMFLError(f"{what}: expected a list of names, got the string {value!r} (write [{value!r}])")
    if not isinstance(value, (list, tuple)):
        raise MMFLError(f"{what}: expected a list of names, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise MMFLError(f"{what}: every name must be a non-empty string, got {bad[0]!r}")
    return tuple(value)


def parse_filters(items: Iterable[str]) -> Filter:
    """``["category=dress", "attribute=floral"]`` -> :class:`Filter`; a malformed one is a one-line error."""
    cats: list[str] = []
    attrs: list[str] = []
    for raw in items:
        key, sep, value = raw.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise MMFLError(f"filter '{raw}': expected key=value, e.g. category=dress")
        if key not in FILTER_KEYS:
            raise MMFLError(f"filter '{raw}': unknown key '{key}' (use {' or '.join(k + '=...' for k in FILTER_KEYS)})")
        (cats if key == "category" else attrs).append(value)
    return Filter(tuple(dict.fromkeys(cats)), tuple(dict.fromkeys(attrs)))


class GalleryStore(Protocol):
    """One committed state of an index: nearest images with optional filters, lookups by item or path,
    and live updates.

    A store object never changes once made: an update commits a new state durably and returns
    it as a new object, so a search that holds the old object finishes on the old catalogue
    while later ones see the new (:class:`mmfl.catalog.Catalog` swaps them). ``len`` counts live
    images.
    """

    index_dir: Path
    manifest: dict[str, Any]
    #: Most rows one :meth:`search` call may return (Milvus caps top-k).
    max_fetch: int

    def __len__(self) -> int: ...

    def search(self, vector: Any, n: int, flt: Filter) -> list[Hit]:
        """Up to ``n`` rows nearest to ``vector`` (float32, (D,)) that pass ``flt``, best first."""
        ...

    def images_of(self, item_id: str) -> list[str]:
        """Absolute image paths recorded for ``item_id``, in index order (empty when unknown)."""
        ...

    def indexed_images(self, paths: Sequence[str]) -> set[str]:
        """The subset of ``paths`` already in the index."""
        ...

    def with_added(self, vectors: Any, entries: Sequence[Entry]) -> "GalleryStore":
        """Commit ``entries`` (vectors (N, D) float32, unit-norm) durably; the new state."""
        ...

    def with_removed(self, item_ids: Sequence[str]) -> "tuple[GalleryStore, list[Entry]]":
        """Commit the removal of every image of ``item_ids`` durably; the new state and the entries removed."""
        ...

    def caught_up(self, manifest: dict[str, Any]) -> "GalleryStore | None":
        """This store advanced to ``manifest`` (committed by another process) cheaply, or None when
        only a full :func:`mmfl.index.backends.open_store` can (another generation)."""
        ...

    def pending_rows(self) -> int:
        """Rows added or removed since the generation was written (what a compaction would fold in)."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- manifest

def new_generation() -> str:
    """A sortable, collision-safe name for one build's data (letters, digits and '_' only, for Milvus)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "_" + secrets.token_hex(3)


@contextmanager
def writer_lock(index_dir: str | Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the INDEX folder itself while one process changes the index.

    Builds and live updates of several processes (``mmfl index``, a server's ``POST /items``) take
    turns instead of committing over each other. The lock dies with its process, so a killed
    writer never leaves the index locked, and locking the folder adds no file to it. Waiting
    longer than ``timeout`` seconds is an :class:`IndexBusyError`.
    """
    import fcntl

    fd = os.open(index_dir, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexBusyError(f"{index_dir}: another process has been changing the index for "
                                         f"{timeout:.0f} s (mmfl index?); try again later") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


class IndexBusyError(MMFLError):
    """Another process holds the index's writer lock (a build or a live update is running)."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def manifest_path(index_dir: str | Path) -> Path:
    return Path(index_dir) / MANIFEST


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """Load and check ``INDEX/manifest.json``; anything missing or foreign is a one-line GalleryIndexError."""
    path = manifest_path(index_dir)
    if not Path(index_dir).is_dir():
        raise GalleryIndexError(f"{index_dir}: index folder not found (build one with 'mmfl index')")
    if not path.is_file():
        raise GalleryIndexError(f"{path}: not found; {index_dir} is not an mmfl index (or its first build never finished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GalleryIndexError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GalleryIndexError(f"{path}: not an mmfl index manifest (no '{FORMAT}' format)")
    if manifest.get("version") != VERSION:
        raise GalleryIndexError(f"{path}: index version {manifest.get('version')} is not supported (expected {VERSION})")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise GalleryIndexError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["backend"] not in BACKENDS or manifest["kind"] not in KINDS:
        raise GalleryIndexError(f"{path}: unknown backend/kind {manifest['backend']}/{manifest['kind']}")
    return manifest


def write_manifest(index_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Commit a build: the manifest is written atomically, so readers see the old build or the new one."""
    atomic_write_text(manifest_path(index_dir), json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@dataclass
class Facets:
    """How many gallery images carry each category and attribute (for the page's filter menus),
    and how many images' attributes are annotated vs predicted (``attribute_sources``)."""

    categories: dict[str, int] = field(default_factory=dict)
    attributes: dict[str, int] = field(default_factory=dict)
    attribute_sources: dict[str, int] = field(default_factory=dict)

    def add(self, entries: Iterable[Entry]) -> "Facets":
        for e in entries:
            if e.category:
                self.categories[e.category] = self.categories.get(e.category, 0) + 1
            for a in e.attributes:
                self.attributes[a] = self.attributes.get(a, 0) + 1
            if e.attribute_source:
                self.attribute_sources[e.attribute_source] = self.attribute_sources.get(e.attribute_source, 0) + 1
        return self

    def remove(self, entries: Iterable[Entry]) -> "Facets":
        """Take ``entries`` back out (live removal); a count that reaches zero drops its key."""
        for e in entries:
            for table, keys in ((self.categories, [e.category] if e.category else []), (self.attributes, e.attributes),
                                (self.attribute_sources, [e.attribute_source] if e.attribute_source else [])):
                for key in keys:
                    table[key] = table.get(key, 0) - 1
                    if table[key] <= 0:
                        del table[key]
        return self

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"categories": dict(sorted(self.categories.items())),
                "attributes": dict(sorted(self.attributes.items())),
                "attribute_sources": dict(sorted(self.attribute_sources.items()))}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "Facets":
        d = d or {}
        return cls(dict(d.get("categories", {})), dict(d.get("attributes", {})), dict(d.get("attribute_sources", {})))


def updated_manifest(manifest: dict[str, Any], count: int, added: Sequence[Entry] = (),
                     removed: Sequence[Entry] = (), **fields: Any) -> dict[str, Any]:
    """``manifest`` after a live update: new live ``count``, facets moved by the entries, ``fields`` set."""
    facets = Facets.from_json(manifest.get("facets")).add(added).remove(removed)
    return {**manifest, "count": count, "facets": facets.to_json(), "updated": utc_now(), **fields}
