"""The embedded backend: a FAISS index file plus one JSON line of metadata per vector.

Vectors are L2-normalised, so inner product is cosine similarity. Index kinds and their knobs
(recorded in the manifest's ``params`` and used at search time):

* ``flat``: ``IndexFlatIP``, exact; the right choice up to a few hundred thousand images.
* ``ivf``: ``IndexIVFFlat`` with ``nlist = 4 * sqrt(N)`` inverted lists (capped so that every
  list has at least 39 training vectors, as k-means needs) and ``nprobe = min(nlist, 32)``
  lists scanned per query: raise ``nprobe`` for recall, lower it for speed.
* ``hnsw``: ``IndexHNSWFlat`` (inner product) with ``M = 32`` links per node,
  ``efConstruction = 200`` and ``efSearch = 128`` (raised to the number of rows fetched).

Row ``i`` of the FAISS index is line ``i`` of the metadata file. ``--add`` reads the current
index, adds the new vectors (IVF keeps its trained centroids) and writes a new generation.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmfl.checkpoint import file_sha256
from mmfl.errors import GalleryIndexError
from mmfl.index.store import Entry, Filter, Hit

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
IVF_MIN_POINTS_PER_LIST = 39


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: 4*sqrt(n), but no more than k-means can train well."""
    return max(1, min(round(4 * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))


def new_faiss_index(vectors: np.ndarray, kind: str) -> tuple[Any, dict[str, int]]:
    """A trained, filled FAISS index of ``kind`` over ``vectors`` and the search parameters to record."""
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        index, params = faiss.IndexFlatIP(dim), {}
    elif kind == "ivf":
        nlist = ivf_nlist(len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # ivf_nlist already guarantees 39 points per list; only a one-list index of a tiny gallery has
        # fewer, and its single centroid (the mean) needs no more: don't let k-means warn about it.
        index.cp.min_points_per_centroid = 1
        index.train(vectors)
        params = {"nlist": nlist, "nprobe": min(nlist, IVF_NPROBE)}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    else:
        raise GalleryIndexError(f"unknown index kind '{kind}' (use flat, ivf or hnsw)")
    index.add(vectors)
    return index, params


def write_faiss_generation(
    index_dir: Path, gen: str, vectors: np.ndarray, entries: Sequence[Entry], kind: str,
    base: "FaissStore | None" = None,
) -> dict[str, Any]:
    """Write ``vectors-<gen>.faiss`` and ``metadata-<gen>.jsonl`` (``base``'s rows first when adding).

    Returns the manifest fields describing them (files with their SHA-256, params). Nothing
    refers to these files until the caller commits a manifest naming them.
    """
    import faiss

    vec_name, meta_name = f"vectors-{gen}.faiss", f"metadata-{gen}.jsonl"
    vec_path, meta_path = index_dir / vec_name, index_dir / meta_name
    if base is None:
        index, params = new_faiss_index(vectors, kind)
    else:
        index, params = base.index, dict(base.manifest.get("params", {}))
        if len(vectors):
            index.add(vectors)
    faiss.write_index(index, str(vec_path))
    _fsync_file(vec_path)
    with open(meta_path, "w", encoding="utf-8") as fh:
        if base is not None:
            with open(base.metadata_path, encoding="utf-8") as old:
                shutil.copyfileobj(old, fh)
        for e in entries:
            fh.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return {
        "params": params,
        "files": {vec_name: file_sha256(vec_path), meta_name: file_sha256(meta_path)},
        "faiss": {"vectors": vec_name, "metadata": meta_name},
    }


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def referenced_files(manifest: dict[str, Any] | None) -> set[str]:
    """File names a manifest points at (kept by the cleanup after a build)."""
    if not manifest or manifest.get("backend") != "faiss":
        return set()
    return set(manifest.get("faiss", {}).values())


class FaissStore:
    """An open FAISS index: files checked against the manifest's SHA-256, metadata held in memory."""

    max_fetch = 1 << 30

    def __init__(self, index_dir: str | Path, manifest: dict[str, Any]):
        import faiss

        self.index_dir = Path(index_dir)
        self.manifest = manifest
        names = manifest.get("faiss", {})
        if "vectors" not in names or "metadata" not in names:
            raise GalleryIndexError(f"{self.index_dir / 'manifest.json'}: faiss index without vectors/metadata files")
        vec_path = self.index_dir / names["vectors"]
        self.metadata_path = self.index_dir / names["metadata"]
        for path in (vec_path, self.metadata_path):
            expected = manifest.get("files", {}).get(path.name)
            if not path.is_file():
                raise GalleryIndexError(f"{path}: missing (the index folder is incomplete)")
            if not expected:  # every build records one: a manifest without it cannot vouch for the file
                raise GalleryIndexError(f"{path}: the manifest records no SHA-256 for it (edited manifest?)")
            if file_sha256(path) != expected:
                raise GalleryIndexError(f"{path}: SHA-256 differs from the manifest (corrupt or modified file)")
        try:
            self.index = faiss.read_index(str(vec_path))
        except RuntimeError as exc:
            raise GalleryIndexError(f"{vec_path}: unreadable FAISS index ({str(exc).splitlines()[0]})") from None
        self.entries = self._read_metadata()
        if self.index.ntotal != len(self.entries) or len(self.entries) != manifest["count"]:
            raise GalleryIndexError(
                f"{self.index_dir}: {self.index.ntotal} vectors, {len(self.entries)} metadata rows and "
                f"manifest count {manifest['count']} disagree"
            )
        if self.index.d != manifest["embed_dim"]:
            raise GalleryIndexError(f"{vec_path}: dimension {self.index.d} but the manifest says {manifest['embed_dim']}")
        self._by_item: dict[str, list[str]] = {}
        for e in self.entries:
            self._by_item.setdefault(e.item_id, []).append(e.image)

    def _read_metadata(self) -> list[Entry]:
        entries = []
        with open(self.metadata_path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    entries.append(Entry.from_json(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise GalleryIndexError(f"{self.metadata_path}:{lineno}: malformed metadata line") from None
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def _search_params(self, n: int) -> Any:
        import faiss

        params = self.manifest.get("params", {})
        if self.manifest["kind"] == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", IVF_NPROBE)))
        if self.manifest["kind"] == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(int(params.get("efSearch", HNSW_EF_SEARCH)), n))
        return None

    def search(self, vector: np.ndarray, n: int, flt: Filter) -> list[Hit]:
        """Nearest ``n`` rows, then ``flt`` applied (the caller over-fetches when filtering)."""
        n = min(n, len(self.entries))
        if n <= 0:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        params = self._search_params(n)
        scores, rows = self.index.search(query, n, params=params) if params else self.index.search(query, n)
        hits = []
        for score, row in zip(scores[0].tolist(), rows[0].tolist()):
            if row < 0:
                continue
            entry = self.entries[row]
            if flt.matches(entry):
                hits.append(Hit(row, float(score), entry))
        return hits

    def images_of(self, item_id: str) -> list[str]:
        return list(self._by_item.get(item_id, []))

    def indexed_images(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` are already indexed (``--add`` skips them)."""
        known = {e.image for e in self.entries}
        return {p for p in paths if p in known}

    def close(self) -> None:
        """Nothing to release: the index lives in this process' memory."""
