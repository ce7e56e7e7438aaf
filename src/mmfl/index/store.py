"""What every gallery backend shares: the manifest, gallery entries, filters and the store protocol.

An index is a folder whose ``manifest.json`` is the single commit point. Backends write their
data under names that carry a *generation* (``vectors-<gen>.faiss``, Milvus collection
``mmfl_<index_id>_<gen>``), and a build becomes visible only when the manifest naming the new
generation replaces the old one with an atomic rename. A build that fails or is killed before
that rename leaves the previous manifest, and so the previous index, untouched; its leftovers
are removed by the next successful build.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from mmfl.atomic import atomic_write_text
from mmfl.errors import GalleryIndexError, MMFLError

FORMAT = "mmfl-index"
VERSION = 1
MANIFEST = "manifest.json"
BACKENDS = ("faiss", "milvus")
KINDS = ("flat", "ivf", "hnsw")
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

    def __bool__(self) -> bool:
        return bool(self.categories or self.attributes)

    def matches(self, entry: Entry) -> bool:
        if self.categories and entry.category not in self.categories:
            return False
        return all(a in entry.attributes for a in self.attributes)

    def describe(self) -> list[str]:
        return [f"category={c}" for c in self.categories] + [f"attribute={a}" for a in self.attributes]


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
    """A read-only open index: nearest images with optional filters, and lookups by item or path."""

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

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- manifest

def new_generation() -> str:
    """A sortable, collision-safe name for one build's data (letters, digits and '_' only, for Milvus)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "_" + secrets.token_hex(3)


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

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"categories": dict(sorted(self.categories.items())),
                "attributes": dict(sorted(self.attributes.items())),
                "attribute_sources": dict(sorted(self.attribute_sources.items()))}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "Facets":
        d = d or {}
        return cls(dict(d.get("categories", {})), dict(d.get("attributes", {})), dict(d.get("attribute_sources", {})))


def open_store(index_dir: str | Path) -> GalleryStore:
    """Open the index in ``index_dir`` with the backend its manifest names.

    A build committing between reading the manifest and opening its files can delete the
    generation just read; the manifest is then re-read once and the new generation opened.
    """
    manifest = read_manifest(index_dir)
    try:
        return _open(index_dir, manifest)
    except GalleryIndexError:
        latest = read_manifest(index_dir)
        if latest["generation"] == manifest["generation"]:
            raise
        return _open(index_dir, latest)


def _open(index_dir: str | Path, manifest: dict[str, Any]) -> GalleryStore:
    if manifest["backend"] == "faiss":
        from mmfl.index.faiss_store import FaissStore

        return FaissStore(index_dir, manifest)
    from mmfl.index.milvus_store import MilvusStore

    return MilvusStore(index_dir, manifest)
