"""Opening an index: the store of the backend its manifest names.

The factory lives apart from :mod:`mmfl.index.store` (what every backend shares) because it
names the backends, which import that base: with it there, the base and its backends would
import each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfl.errors import GalleryIndexError
from mmfl.index.faiss_store import FaissStore
from mmfl.index.milvus_store import MilvusStore
from mmfl.index.store import GalleryStore, read_manifest


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
        return FaissStore(index_dir, manifest)
    return MilvusStore(index_dir, manifest)
