"""A live shop catalogue: search it, add items, remove items, while it is being searched.

``Catalog`` is the one API the ``mmfl search`` / ``mmfl index --remove`` commands and the HTTP
service (``POST /search``, ``/search/batch``, ``/items``) call. It is a
:class:`~mmfl.index.search.Searcher` (the model and one committed state of the index) plus the
update path:

* **Durable, atomic updates.** An add or a removal is written by the store (a FAISS journal
  line, Milvus rows) and committed by renaming a new ``manifest.json`` into place
  (:mod:`mmfl.index.store`). A process killed before the rename leaves the old catalogue, one
  killed after it the new one; the call returns only after the rename.
* **Readers never see half an update.** Store states are immutable objects; a writer builds the
  next state beside the current one and swaps one reference. A search reads the reference once,
  so it answers from the old catalogue or the new one, and every search that starts after
  ``add``/``remove`` returned sees the change.
* **Several processes.** Writers take the index folder's lock (:func:`~mmfl.index.store.writer_lock`)
  and first catch up with what other processes committed; readers notice a changed manifest
  (one small read per search) and catch up too, by reading only the new journal lines. So a running
  server sees ``mmfl index --remove``, and ``mmfl serve --workers N`` stays consistent.
* **Which part of a photo.** A search without a box uses the best garment box the model's box
  head predicts (when it has one; ``whole_image=True`` turns that off), and says which box it
  used and why (:meth:`mmfl.index.search.Searcher.choose_box`); a box the caller gives always
  wins. Adds never use a predicted box: shop photos keep their given box or the whole image.
* **Bounded journal.** When the rows added or removed since the generation was written exceed
  :func:`compaction_threshold`, the journal is folded into a new generation (FAISS).
* **Uploaded photos** are kept in ``INDEX/photos`` while a live row names them: each commit
  deletes the ones no row names (:func:`~mmfl.index.build.remove_unnamed_photos`), so a removed
  item's photos go with its removal, and what a killed writer left goes at the next commit.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from PIL import Image

from mmfl.atomic import atomic_write
from mmfl.data.records import Box
from mmfl.errors import DataError, MMFLError
from mmfl.index.backends import open_store
from mmfl.index.build import PHOTOS, check_compatible, compact, remove_unnamed_photos
from mmfl.labels import ANNOTATED, PREDICTED
from mmfl.index.search import Searcher, embed_inputs
from mmfl.index.store import Entry, Filter, GalleryStore, manifest_path, name_list, read_manifest, writer_lock
from mmfl.model_input import check_box_value, check_boxes, model_input, model_input_size

#: Longest item id, category or attribute name (the Milvus schema's limits).
MAX_ID_CHARS = 512
MAX_NAME_CHARS = 256
#: Most photos one ``add`` takes (an item has a handful; this bounds one request's work).
MAX_ADD_PHOTOS = 64
#: Uploaded photo formats and the file suffix they are stored under.
_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}

if TYPE_CHECKING:
    from mmfl.localise import Detection

Photo = str | Path | bytes | Image.Image


def compaction_threshold(count: int) -> int:
    """Pending journal rows that trigger a compaction: a quarter of the catalogue, at least 10,000.

    Searching the journal's rows costs a matrix product beside the FAISS search, and a removed
    row costs one extra row fetched; a quarter bounds both, and rewriting the generation (seconds
    at 100k rows) happens about once per quarter-catalogue of changes.
    """
    return max(10_000, count // 4)


def _stamp(index_dir: Path) -> bytes | None:
    """The committed manifest's bytes: every commit changes them (journal length, row counters, generation).

    Reading a few kilobytes costs microseconds beside a search, and unlike (inode, mtime, size),
    which a fast second commit can repeat (inodes are reused, mtimes are coarse), it cannot miss one.
    """
    try:
        return manifest_path(index_dir).read_bytes()
    except OSError:
        return None


class Catalog:
    """A gallery index with its model, searched and updated live. Open it with :meth:`open`."""

    def __init__(self, searcher: Searcher, stamp: bytes | None):
        self.searcher = searcher
        self.index_dir = searcher.index_dir
        self._seen = stamp
        # One writer (or catch-up) at a time in this process; searches never take it unless the
        # manifest changed under them.
        self._lock = threading.RLock()
        self._retired: list[GalleryStore] = []

    @classmethod
    def open(cls, index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             onnx: str | Path | None = None, with_model: bool = True, min_score: float | None = None) -> "Catalog":
        """The catalogue in ``index_dir`` with the model it was built with (the manifest's checkpoint, or
        ``checkpoint`` with the same SHA-256, or ``onnx`` exported from it; its box graph ``NAME.boxes.onnx``
        is used when present). ``with_model=False`` opens the index alone: searches and adds by vector,
        and removals, work; photos need the model. ``min_score``: the least score of a predicted garment
        box a search uses (default: the checkpoint's ``box.min_score``)."""
        stamp = _stamp(Path(index_dir))  # before reading: a commit in between is caught up on the first search
        return cls(Searcher(index_dir, checkpoint, device, onnx, with_model, min_score), stamp)

    # ------------------------------------------------------------------ reading

    @property
    def manifest(self) -> dict[str, Any]:
        return self.searcher.store.manifest

    @property
    def model(self) -> Any:
        return self.searcher.model

    def __len__(self) -> int:
        """Live gallery images (an item usually has several)."""
        return len(self.searcher.store)

    def images_of(self, item_id: str) -> list[str]:
        """The images recorded for ``item_id`` (empty when it is not in the catalogue)."""
        return self.searcher.store.images_of(item_id)

    @property
    def has_box_head(self) -> bool:
        """Whether searches without a box use a predicted garment box (the model, or its ONNX box graph, has a head)."""
        return self.searcher.detector is not None

    def search(self, photo_or_vector: Photo | np.ndarray, k: int = 20, box: Box | Sequence[int] | None = None,
               filter: Filter | Mapping[str, Any] | None = None, name: str | None = None,
               whole_image: bool = False) -> dict[str, Any]:
        """The ``k`` best items for a photo (a path, encoded bytes or a PIL image) or an embedding (D,).

        ``box`` (x1, y1, x2, y2 in the photo's pixels) searches that part of the photo and always wins.
        Without one, a model with a box head searches inside the best predicted garment box (a
        shopper's photo is mostly not the garment), unless ``whole_image``; with none found, or no
        head, the whole photo. ``filter`` is a :class:`~mmfl.index.store.Filter` or
        ``{"categories": [...], "attributes": [...]}``. The answer is ``mmfl search --json``'s:
        ``{"results": [...], "query": {...}}``, the query saying which box was searched (``bbox``,
        ``box_source`` user|predicted|whole, ``box_reason``) and the ``detections``. ``name`` is what
        an error about the photo calls it (default: its path, or "uploaded image").
        """
        flt = Filter.coerce(filter)
        self.refresh()
        if isinstance(photo_or_vector, np.ndarray):
            if box is not None:
                raise MMFLError("box: a vector query has no photo to crop")
            return self.searcher.search_vector(photo_or_vector, k, flt)
        user_box = None if box is None else check_box_value(box, "box")
        return self.searcher.search_photos([_photo(photo_or_vector, "photo")], [name], k, [user_box], flt,
                                           _flag(whole_image, "whole_image"))[0]

    def search_many(self, photos: Sequence[Photo] | np.ndarray, k: int = 20,
                    boxes: Sequence[Box | Sequence[int] | None] | None = None,
                    filter: Filter | Mapping[str, Any] | None = None,
                    names: Sequence[str | None] | None = None, whole_image: bool = False) -> list[dict[str, Any]]:
        """:meth:`search` for many photos in one call (one batched forward pass), answers in order.

        ``photos`` may also be an (N, D) array of embeddings. ``boxes`` and ``names``, if given, have
        one entry per photo (a box None: the predicted box, or the whole photo). ``took_ms`` is the whole call's.
        """
        flt = Filter.coerce(filter)
        self.refresh()
        if isinstance(photos, np.ndarray):
            if boxes is not None:
                raise MMFLError("boxes: vector queries have no photos to crop")
            if photos.ndim != 2:
                raise MMFLError(f"photos: expected an (N, D) array of vectors, got shape {photos.shape}")
            return [self.searcher.search_vector(v, k, flt) for v in photos]
        sources = _photo_list(photos, "photos")
        if names is not None and len(names) != len(sources):
            raise MMFLError(f"names: {len(names)} names for {len(sources)} photos")
        return self.searcher.search_photos(sources, names, k, check_boxes(boxes, len(sources)), flt,
                                           _flag(whole_image, "whole_image"))

    def search_garments(self, photo: Photo, k: int = 20, filter: Filter | Mapping[str, Any] | None = None,
                        name: str | None = None) -> dict[str, Any]:
        """Results for each garment found in the photo (an outfit: the jacket, the trousers, ...).

        :meth:`search`'s answer for the best garment plus ``garments``, one entry per detection
        (``box``, ``category``, ``score``, ``results``), all embedded in one forward pass; with no
        garment found, or no box head, one entry for the whole photo (``box_reason`` says why).
        """
        flt = Filter.coerce(filter)
        self.refresh()
        return self.searcher.search_garments(_photo(photo, "photo"), name, k, flt)

    def detect(self, photo: Photo, name: str | None = None, min_score: float | None = None) -> list["Detection"]:
        """The garments the box head finds in ``photo``, best first, boxes in the photo's upright pixels
        (clamped to it), scoring at least ``min_score`` (default: the catalogue's). A model without a
        box head is a one-line MMFLError."""
        return self.searcher.detect(_photo(photo, "photo"), name, min_score)

    def refresh(self) -> bool:
        """Catch up with updates other processes committed; True if the manifest had changed."""
        if _stamp(self.index_dir) == self._seen:
            return False
        with self._lock:
            self._catch_up()
        return True

    def _catch_up(self) -> None:
        """(Holding ``_lock``.) Advance to the committed manifest: by its new journal lines, or by a reopen."""
        stamp = _stamp(self.index_dir)
        if stamp == self._seen:
            return
        current = self.searcher.store
        store = current.caught_up(read_manifest(self.index_dir))
        if store is None:  # a rebuild or a compaction by another process: a new generation
            store = open_store(self.index_dir)
            if self.model is not None:
                check_compatible(store.manifest, self.model, self.index_dir)
        self._swap(store, stamp)

    def _swap(self, store: GalleryStore, stamp: bytes | None) -> None:
        old = self.searcher.store
        self.searcher.store = store  # the one assignment that publishes the new state
        self._seen = stamp
        client = getattr(old, "client", None)  # Milvus: states of one collection share their connection
        if client is not None and client is not getattr(store, "client", None):
            self._retired.append(old)  # a search may still use its connection: closed with the catalogue

    # ------------------------------------------------------------------ updating

    def add(self, photos: Sequence[Photo] | np.ndarray, item_id: str, category: str | None = None,
            attributes: Sequence[str] | None = None, boxes: Sequence[Box | Sequence[int] | None] | None = None,
            names: Sequence[str | None] | None = None) -> dict[str, Any]:
        """Add an item's photos (paths, encoded bytes or PIL images), or its vectors ((N, D) unit-norm).

        The photos are embedded as the gallery was; ``category`` and ``attributes`` are stored as
        annotated, and where not given the model's predictions are stored (``attribute_source``
        "predicted"). Uploaded bytes and images are kept in ``INDEX/photos`` (named by content);
        a path is recorded as it is, like ``mmfl index`` does. Photos the item already has are
        skipped. ``names`` (one per photo) are what errors call the photos. Returns
        ``{"item_id", "added", "already_indexed", "count"}`` once committed.
        """
        item_id = _name(item_id, "item_id", MAX_ID_CHARS)
        category = None if category is None else _name(category, "category", MAX_NAME_CHARS)
        given = None if attributes is None else name_list(attributes, "attributes")
        for a in given or ():
            _name(a, "attributes", MAX_NAME_CHARS)
        if isinstance(photos, np.ndarray):
            if boxes is not None:
                raise MMFLError("boxes: vectors have no photos to crop")
            vectors = _unit_rows(photos, self.manifest["embed_dim"])
            entries = [Entry(item_id, "", category, given or (), ANNOTATED if given is not None else None)] * len(vectors)
            files: list[tuple[str, bytes | None]] = [("", None)] * len(vectors)
        else:
            sources = _photo_list(photos, "photos")
            if len(sources) > MAX_ADD_PHOTOS:
                raise MMFLError(f"photos: {len(sources)} photos; one add takes at most {MAX_ADD_PHOTOS}")
            if names is not None and len(names) != len(sources):
                raise MMFLError(f"names: {len(names)} names for {len(sources)} photos")
            labels = [(names[n] if names else None) or f"photo {n + 1} of item {item_id!r}" for n in range(len(sources))]
            vectors, entries, files = self._embed_for_add(sources, check_boxes(boxes, len(sources)), labels, item_id,
                                                          category, given)
        with self._lock, writer_lock(self.index_dir):
            self._catch_up()
            store = self.searcher.store
            seen, keep = set(store.images_of(item_id)), []
            for i, (image, _) in enumerate(files):  # vectors (no image) are always new
                if not image or image not in seen:
                    keep.append(i)
                    seen.add(image)
            if keep:
                for i in keep:
                    if files[i][1] is not None:
                        self._store_photo(files[i][0], files[i][1])
                store = store.with_added(vectors[keep], [entries[i] for i in keep])
                self._swap(store, _stamp(self.index_dir))
                self._after_commit()
        return {"item_id": item_id, "added": len(keep), "already_indexed": len(files) - len(keep), "count": len(self)}

    def _embed_for_add(self, sources: list[Photo], boxes: list[Box | None], labels: list[str], item_id: str,
                       category: str | None, given: tuple[str, ...] | None
                       ) -> tuple[np.ndarray, list[Entry], list[tuple[str, bytes | None]]]:
        """Vectors, entries and (image path, bytes to store or None) for photos being added (outside the lock)."""
        model = self.searcher.require_model()
        size = model_input_size(model)
        inputs, files = [], []
        for source, box, label in zip(sources, boxes, labels):  # shop photos: the given box or the whole photo
            inputs.append(model_input(source, box, size, label)[0])
            files.append(self._photo_file(source, label))
        queries = embed_inputs(model, inputs, self.searcher.device)
        entries = []
        for q, (path, _) in zip(queries, files):
            if given is not None:
                attrs, source = given, ANNOTATED
            elif model.meta.get("attribute_names"):
                attrs, source = q.attributes, PREDICTED
            else:
                attrs, source = (), None
            entries.append(Entry(item_id, path, category or q.category, attrs, source))
        return np.stack([q.vector for q in queries]), entries, files

    def _photo_file(self, source: Photo, label: str) -> tuple[str, bytes | None]:
        """Where an added photo's image is recorded, and the bytes to write there (None: nothing to write)."""
        if isinstance(source, (str, Path)):
            return str(Path(source).resolve()), None
        if isinstance(source, Image.Image):
            buffer = io.BytesIO()
            source.save(buffer, format="PNG")
            data, fmt = buffer.getvalue(), "PNG"
        else:
            data = source
            with Image.open(io.BytesIO(data)) as probe:  # already decoded once: the header is known good
                fmt = probe.format or ""
            if fmt not in _SUFFIX:
                raise DataError(f"{label}: {fmt or 'unknown'} images cannot be stored (use {', '.join(_SUFFIX)})")
        name = hashlib.sha256(data).hexdigest()[:32] + _SUFFIX[fmt]
        return str((self.index_dir / PHOTOS / name).resolve()), data

    def _store_photo(self, path: str, data: bytes) -> None:
        """(Holding the writer lock.) Write an uploaded photo before the commit that names it."""
        if not os.path.isfile(path):
            atomic_write(path, lambda fh: fh.write(data))

    def remove(self, item_ids: Sequence[str], missing_ok: bool = False) -> int:
        """Remove every image of ``item_ids``; the number of items removed, once committed.

        An id the catalogue does not hold is an error naming it (and nothing is removed) unless
        ``missing_ok``.
        """
        ids = list(dict.fromkeys(name_list(item_ids, "item_ids")))
        with self._lock, writer_lock(self.index_dir):
            self._catch_up()
            store = self.searcher.store
            unknown = [i for i in ids if not store.images_of(i)]
            if unknown and not missing_ok:
                shown = ", ".join(repr(i) for i in unknown[:5])
                shown += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                raise MMFLError(f"{self.index_dir}: {len(unknown)} of {len(ids)} item ids are not in the catalogue "
                                f"({shown}); nothing was removed")
            known = [i for i in ids if i not in set(unknown)]
            if known:
                store, _ = store.with_removed(known)
                self._swap(store, _stamp(self.index_dir))
                self._after_commit()
        return len(known)

    def compact(self) -> None:
        """Fold the journal of live updates into a new generation now (FAISS; Milvus needs none)."""
        with self._lock, writer_lock(self.index_dir):
            self._catch_up()
            self._swap(compact(self.searcher.store), _stamp(self.index_dir))
            remove_unnamed_photos(self.searcher.store)

    def _after_commit(self) -> None:
        """(Holding the writer lock, after an update's commit.) Compact when the journal is due, and delete the
        uploaded photos no live row names: a removed item's photos go with its removal."""
        store = self.searcher.store
        if store.pending_rows() > compaction_threshold(len(store)):
            self._swap(compact(store), _stamp(self.index_dir))
        remove_unnamed_photos(self.searcher.store)

    def close(self) -> None:
        for store in [*self._retired, self.searcher.store]:
            store.close()
        self._retired.clear()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- argument checks

def _name(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MMFLError(f"{what}: expected a non-empty string, got {value!r}")
    if len(value) > limit:
        raise MMFLError(f"{what}: {value[:40]!r}... is longer than {limit} characters")
    if any(ord(c) < 32 for c in value):
        raise MMFLError(f"{what}: {value!r} contains a control character")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise MMFLError(f"{what}: expected True or False, got {value!r}")
    return value


def _photo(value: Any, what: str) -> Photo:
    if isinstance(value, (str, Path, bytes, Image.Image)):
        return value
    raise MMFLError(f"{what}: expected a path, encoded bytes or a PIL image, got {type(value).__name__}")


def _photo_list(values: Any, what: str) -> list[Photo]:
    """A non-empty list of photos; one photo where a list is expected is refused (a string would be iterated)."""
    if isinstance(values, (str, Path, bytes, Image.Image)) or not isinstance(values, (list, tuple)):
        raise MMFLError(f"{what}: expected a list of photos, got {type(values).__name__} (write [photo])")
    if not values:
        raise MMFLError(f"{what}: the list is empty")
    return [_photo(v, f"{what}[{i}]") for i, v in enumerate(values)]


def _unit_rows(vectors: np.ndarray, dim: int) -> np.ndarray:
    if vectors.ndim != 2 or vectors.shape[1] != dim or not len(vectors):
        raise MMFLError(f"photos: expected an (N, {dim}) array of vectors, got shape {vectors.shape}")
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise MMFLError("photos: vectors must be finite and non-zero")
    return np.ascontiguousarray(vectors / norms)
