"""The embedded backend: a FAISS index file plus one JSON line of metadata per vector.

Vectors are L2-normalised, so inner product is cosine similarity. Index kinds (their knobs are
in :mod:`mmfl.index.ann`, recorded in the manifest's ``params`` and used at search time):

* ``flat``: ``IndexFlatIP``, exact; the right choice up to a few hundred thousand images.
* ``ivf``: ``IndexIVFFlat``: raise ``nprobe`` for recall, lower it for speed.
* ``hnsw``: ``IndexHNSWFlat`` (inner product).

Row ``i`` of the FAISS index is line ``i`` of the metadata file. ``--add`` reads the current
index, adds the new vectors (IVF keeps its trained centroids) and writes a new generation.
Live updates (:class:`mmfl.catalog.Catalog`) go to a journal beside the generation instead;
see :class:`FaissStore`.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmfl.atomic import fsync_dir
from mmfl.hashing import file_sha256
from mmfl.errors import GalleryIndexError
from mmfl.index.ann import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NPROBE, ivf_nlist
from mmfl.index.store import Entry, Filter, Hit, updated_manifest, write_manifest

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
    """Write ``vectors-<gen>.faiss`` and ``metadata-<gen>.jsonl`` (``base``'s live rows first when adding).

    With ``base`` this is also the compaction of live updates: its journal (rows added, items
    removed) is folded into the new files, which start without one. Returns the manifest
    fields describing them (files with their SHA-256, params). Nothing refers to these files
    until the caller commits a manifest naming them.
    """
    import faiss

    vec_name, meta_name = f"vectors-{gen}.faiss", f"metadata-{gen}.jsonl"
    vec_path, meta_path = index_dir / vec_name, index_dir / meta_name
    if base is None:
        index, params = new_faiss_index(vectors, kind)
        old_entries: list[Entry] = []
    else:
        index, params = base.live_index(), dict(base.manifest.get("params", {}))
        old_entries = base.entries
        if len(vectors):
            index.add(vectors)
    faiss.write_index(index, str(vec_path))
    _fsync_file(vec_path)
    with open(meta_path, "w", encoding="utf-8") as fh:
        for e in [*old_entries, *entries]:
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
    names = set(manifest.get("faiss", {}).values())
    if manifest.get("journal"):
        names.add(manifest["journal"]["file"])
    return names


class FaissStore:
    """One committed state of a FAISS index: the generation's files (checked against the manifest's
    SHA-256) plus its journal of live updates, held in memory.

    Live updates never touch the generation's files. Each is one line appended to
    ``journal-<gen>.jsonl`` (an add carries its rows' vectors and metadata, a removal its item
    ids), fsynced, and committed by the manifest, which records how many bytes of the journal
    are valid and their SHA-256: a writer killed before that rename leaves a tail no reader
    looks at (the next writer cuts it off), one killed after it has committed. In memory, rows
    ``0 .. base_count-1`` are the generation's FAISS index, the rows after it the journal's added
    vectors (searched exactly with one matrix product), and removed rows are a set skipped in
    results. An update makes a new object sharing the big FAISS index, so searches running
    meanwhile keep the state they started with; :func:`write_faiss_generation` (a compaction or
    ``mmfl index --add``) folds the journal into new files.
    """

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
        self.base_entries = self._read_metadata()
        journal = manifest.get("journal") or {}
        self.base_count = int(journal.get("base_count", manifest["count"]))
        if self.index.ntotal != len(self.base_entries) or len(self.base_entries) != self.base_count:
            raise GalleryIndexError(
                f"{self.index_dir}: {self.index.ntotal} vectors, {len(self.base_entries)} metadata rows and "
                f"manifest count {self.base_count} disagree"
            )
        if self.index.d != manifest["embed_dim"]:
            raise GalleryIndexError(f"{vec_path}: dimension {self.index.d} but the manifest says {manifest['embed_dim']}")
        self.delta_vectors = np.zeros((0, self.index.d), np.float32)
        self.delta_entries: list[Entry] = []
        self.dead: frozenset[int] = frozenset()
        self.dead_in_base = 0
        self.rows_of: dict[str, tuple[int, ...]] = {}
        for row, e in enumerate(self.base_entries):
            self.rows_of[e.item_id] = (*self.rows_of.get(e.item_id, ()), row)
        self.journal_bytes, self.journal_hash, self.journal_lines = 0, hashlib.sha256(), 0
        if journal:
            self._replay(journal)
        if len(self) != manifest["count"]:
            raise GalleryIndexError(f"{self.index_dir}: {len(self)} live rows but manifest count {manifest['count']}")

    def _read_metadata(self) -> list[Entry]:
        entries = []
        with open(self.metadata_path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    entries.append(Entry.from_json(json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise GalleryIndexError(f"{self.metadata_path}:{lineno}: malformed metadata line") from None
        return entries

    # ------------------------------------------------------------------ journal

    def _replay(self, journal: dict[str, Any]) -> None:
        """Apply the committed journal bytes past ``self.journal_bytes`` to this (not yet shared) object."""
        path = self.index_dir / journal["file"]
        end = int(journal["bytes"])
        try:
            with open(path, "rb") as fh:
                fh.seek(self.journal_bytes)
                data = fh.read(end - self.journal_bytes)
        except OSError as exc:
            raise GalleryIndexError(f"{path}: unreadable journal ({exc.strerror})") from None
        digest = self.journal_hash.copy()
        digest.update(data)
        if len(data) != end - self.journal_bytes or digest.hexdigest() != journal["sha256"]:
            raise GalleryIndexError(f"{path}: SHA-256 of its first {end} bytes differs from the manifest "
                                    "(corrupt or modified file)")
        lineno = self.journal_lines
        for lineno, line in enumerate(data.splitlines(), lineno + 1):
            try:
                record = json.loads(line)
                if record["op"] == "add":
                    vectors = np.frombuffer(base64.b64decode(record["vectors"]), dtype="<f4").reshape(-1, self.index.d)
                    self._apply_add(vectors, [Entry.from_json(e) for e in record["entries"]])
                elif record["op"] == "remove":
                    self._apply_remove(record["item_ids"])
                else:
                    raise ValueError(f"unknown op {record['op']!r}")
            except (ValueError, KeyError, TypeError):
                raise GalleryIndexError(f"{path}:{lineno}: malformed journal line") from None
        self.journal_lines = lineno
        self.journal_bytes, self.journal_hash = end, digest

    def _apply_add(self, vectors: np.ndarray, entries: Sequence[Entry]) -> None:
        if len(vectors) != len(entries):
            raise ValueError("one vector per entry")
        first = self.base_count + len(self.delta_entries)
        self.delta_vectors = np.concatenate([self.delta_vectors, np.asarray(vectors, np.float32)])
        self.delta_entries = [*self.delta_entries, *entries]
        self.rows_of = dict(self.rows_of)
        for row, e in enumerate(entries, first):
            self.rows_of[e.item_id] = (*self.rows_of.get(e.item_id, ()), row)

    def _apply_remove(self, item_ids: Sequence[str]) -> list[Entry]:
        ids = set(item_ids)
        rows = [r for item in ids for r in self.rows_of.get(item, ())]
        self.dead = self.dead | frozenset(rows)
        self.dead_in_base += sum(1 for r in rows if r < self.base_count)
        self.rows_of = dict(self.rows_of)  # a C-level copy: ~1 ms for 100k items, a filtering rebuild ~40
        for item in ids:
            self.rows_of.pop(item, None)
        return [self.entry(r) for r in rows]

    def _append(self, record: dict[str, Any]) -> "tuple[dict[str, Any], Any]":
        """Append one journal line durably after the committed bytes: the manifest's new ``journal`` field
        and the SHA-256 state of the journal up to the end of that line."""
        name = (self.manifest.get("journal") or {}).get("file") or f"journal-{self.manifest['generation']}.jsonl"
        path = self.index_dir / name
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self.journal_bytes)  # the uncommitted tail of a writer killed before its commit
            os.lseek(fd, self.journal_bytes, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.journal_bytes == 0:
            fsync_dir(self.index_dir)
        digest = self.journal_hash.copy()
        digest.update(data)
        return {"file": name, "bytes": self.journal_bytes + len(data), "sha256": digest.hexdigest(),
                "base_count": self.base_count}, digest

    def _derive(self) -> "FaissStore":
        return copy.copy(self)

    def with_added(self, vectors: np.ndarray, entries: Sequence[Entry]) -> "FaissStore":
        """Journal ``entries`` with their vectors and commit; the new state (this one is unchanged)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        journal, digest = self._append({"op": "add", "entries": [e.to_json() for e in entries],
                                "vectors": base64.b64encode(vectors.astype("<f4").tobytes()).decode("ascii")})
        new = self._derive()
        new._apply_add(vectors, entries)
        return new._commit(journal, digest, added=entries)

    def with_removed(self, item_ids: Sequence[str]) -> "tuple[FaissStore, list[Entry]]":
        """Journal the removal of ``item_ids`` and commit; the new state and the entries it removed."""
        journal, digest = self._append({"op": "remove", "item_ids": list(item_ids)})
        new = self._derive()
        removed = new._apply_remove(item_ids)
        return new._commit(journal, digest, removed=removed), removed

    def _commit(self, journal: dict[str, Any], digest: Any, added: Sequence[Entry] = (),
                removed: Sequence[Entry] = ()) -> "FaissStore":
        """The commit point: the manifest naming the journal's new length replaces the old one."""
        self.manifest = updated_manifest(self.manifest, len(self), added, removed, journal=journal)
        self.journal_bytes, self.journal_hash, self.journal_lines = journal["bytes"], digest, self.journal_lines + 1
        write_manifest(self.index_dir, self.manifest)
        return self

    def caught_up(self, manifest: dict[str, Any]) -> "FaissStore | None":
        """This state advanced to ``manifest`` by reading only the journal lines it adds; None for another generation."""
        if manifest == self.manifest:
            return self
        journal, mine = manifest.get("journal") or {}, self.manifest.get("journal") or {}
        if (manifest["generation"] != self.manifest["generation"] or not journal
                or (mine and mine["file"] != journal["file"]) or int(journal["bytes"]) < self.journal_bytes):
            return None
        new = self._derive()
        new._replay(journal)
        new.manifest = manifest
        if len(new) != manifest["count"]:
            raise GalleryIndexError(f"{self.index_dir}: {len(new)} live rows but manifest count {manifest['count']}")
        return new

    def pending_rows(self) -> int:
        return len(self.delta_entries) + len(self.dead)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self.base_count + len(self.delta_entries) - len(self.dead)

    def entry(self, row: int) -> Entry:
        return self.base_entries[row] if row < self.base_count else self.delta_entries[row - self.base_count]

    def live_rows(self) -> list[int]:
        """Row numbers of the live images, in order."""
        return [r for r in range(self.base_count + len(self.delta_entries)) if r not in self.dead]

    @property
    def entries(self) -> list[Entry]:
        """The live images' entries, in row order (what a compaction writes)."""
        return [self.entry(r) for r in self.live_rows()]

    def live_index(self) -> Any:
        """A new FAISS index holding exactly the live rows, in order (IVF keeps its trained centroids)."""
        import faiss

        index = faiss.clone_index(self.index)
        dead_base = sorted(r for r in self.dead if r < self.base_count)
        if dead_base:
            source = self.index
            if self.manifest["kind"] == "ivf":  # reconstructing IVF rows needs a direct map; not on the shared index
                source = faiss.clone_index(self.index)
                source.make_direct_map()
            keep = np.ones(self.base_count, bool)
            keep[dead_base] = False
            vectors = source.reconstruct_n(0, self.base_count)[keep]
            index.reset()
            index.add(vectors)
        live_delta = [i for i in range(len(self.delta_entries)) if self.base_count + i not in self.dead]
        if live_delta:
            index.add(self.delta_vectors[live_delta])
        return index

    def _search_params(self, n: int) -> Any:
        import faiss

        params = self.manifest.get("params", {})
        if self.manifest["kind"] == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", IVF_NPROBE)))
        if self.manifest["kind"] == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(int(params.get("efSearch", HNSW_EF_SEARCH)), n))
        return None

    def search(self, vector: np.ndarray, n: int, flt: Filter) -> list[Hit]:
        """Nearest ``n`` live rows, then ``flt`` applied (the caller over-fetches when filtering).

        Removed rows are skipped, so each part is asked for ``n`` plus its removed rows.
        """
        n = min(n, len(self))
        if n <= 0:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        found: list[tuple[float, int]] = []
        fetch = min(self.base_count, n + self.dead_in_base)
        if fetch > 0:
            params = self._search_params(fetch)
            scores, rows = self.index.search(query, fetch, params=params) if params else self.index.search(query, fetch)
            found += [(s, r) for s, r in zip(scores[0].tolist(), rows[0].tolist()) if r >= 0 and r not in self.dead]
        if len(self.delta_entries):
            scores = self.delta_vectors @ query[0]
            fetch = min(len(scores), n + len(self.dead) - self.dead_in_base)
            top = np.argpartition(-scores, fetch - 1)[:fetch] if fetch < len(scores) else np.arange(len(scores))
            found += [(float(scores[i]), self.base_count + int(i)) for i in top if self.base_count + int(i) not in self.dead]
        found.sort(key=lambda sr: (-sr[0], sr[1]))
        return [Hit(r, float(s), self.entry(r)) for s, r in found[:n] if flt.matches(self.entry(r))]

    def images_of(self, item_id: str) -> list[str]:
        return [self.entry(r).image for r in self.rows_of.get(item_id, ())]

    def indexed_images(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` live rows name (``--add`` skips them; uploaded photos no row names are deleted).

        One pass over the rows, looking each image up in ``paths``: a few ms for 100k rows, as
        every live commit asks it about the uploaded photos.
        """
        wanted = set(paths)
        rows = enumerate(itertools.chain(self.base_entries, self.delta_entries))
        return {e.image for row, e in rows if e.image in wanted and row not in self.dead}

    def close(self) -> None:
        """Nothing to release: the index lives in this process' memory."""
