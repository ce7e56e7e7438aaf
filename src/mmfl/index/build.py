"""Building and extending a gallery index: embed shop images, store vectors + metadata, commit atomically.

The manifest is written last, with an atomic rename, so a build that fails or is killed at
any point leaves the previous index (manifest and the generation it names) usable. Leftovers
of such builds are removed after the next successful commit.
"""
from __future__ import annotations

import contextlib
import functools
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from mmfl.atomic import fsync_dir
from mmfl.data.records import Catalog, Record
from mmfl.errors import DataError, GalleryIndexError
from mmfl.index import faiss_store, milvus_store
from mmfl.index.ann import KINDS
from mmfl.index.backends import open_store
from mmfl.labels import ANNOTATED, PREDICTED, AttributeDecoder, predicted_category
from mmfl.index.store import (
    BACKENDS, FORMAT, MANIFEST, VERSION, Entry, Facets, GalleryStore, new_generation, read_manifest, utc_now,
    write_manifest, writer_lock,
)
from mmfl.model_input import model_input_size

if TYPE_CHECKING:
    import torch

#: Files a build may leave in INDEX: data of some generation (its journal of live updates too) or a
#: manifest being written.
_OWN_FILES = re.compile(r"^(vectors-\w+\.faiss|metadata-\w+\.jsonl|journal-\w+\.jsonl|\.manifest\.json\.tmp-\d+|milvus\.db)$")
#: The folder of photos uploaded to a live catalogue (:class:`mmfl.catalog.Catalog`).
PHOTOS = "photos"


@dataclass
class BuildReport:
    """What a build did: images added, images skipped because already indexed, total rows."""

    index_dir: Path
    added: int
    already_indexed: int
    count: int
    manifest: dict[str, Any]


def check_compatible(manifest: dict[str, Any], model: Any, index_dir: Path) -> None:
    """Refuse a model whose checkpoint or embedding size differs from the one the index was built with."""
    sha = model.meta["checkpoint_sha256"]
    if manifest["checkpoint_sha256"] != sha:
        source = model.meta["checkpoint"]
        if model.meta.get("onnx"):  # an exported graph carries its source checkpoint's path and hash
            source = f"{model.meta['onnx']} (exported from {source})"
        raise GalleryIndexError(
            f"{index_dir}: built with checkpoint {manifest['checkpoint']} (sha256 {manifest['checkpoint_sha256'][:12]}), "
            f"but {source} has sha256 {sha[:12]}; rebuild the index with this checkpoint"
        )
    if manifest["embed_dim"] != model.embed_dim:
        raise GalleryIndexError(
            f"{index_dir}: vectors have {manifest['embed_dim']} dimensions, the model makes {model.embed_dim}"
        )


def _check_target(index_dir: Path) -> dict[str, Any] | None:
    """The current manifest (None for a fresh target); refuse to write into a folder that is not ours."""
    if not index_dir.exists():
        return None
    if not index_dir.is_dir():
        raise GalleryIndexError(f"{index_dir}: exists and is not a folder; choose another --out")
    if (index_dir / MANIFEST).exists():
        return read_manifest(index_dir)
    foreign = [p.name for p in index_dir.iterdir() if not _OWN_FILES.match(p.name) and p.name != PHOTOS]
    if foreign:
        raise GalleryIndexError(f"{index_dir}: exists and is not an mmfl index (holds {foreign[0]}); choose another --out")
    return None


def gallery_entries(records: Sequence[Record], attribute_probs: np.ndarray | None, category_probs: np.ndarray | None,
                    decoder: AttributeDecoder, category_names: Sequence[str],
                    catalog: Catalog | None = None) -> list[Entry]:
    """Metadata rows: the dataset's category when it has one (else the predicted one); the item's
    annotated attributes when ``catalog`` labels it, else the model's decisions (``decoder``).

    Labels, where they exist, are the truth a shopper filters on; predictions only fill the gaps,
    and each row's ``attribute_source`` says which it holds.
    """
    entries = []
    for i, rec in enumerate(records):
        annotated = catalog.annotated_attributes(rec.item_id) if catalog is not None else None
        if annotated is not None:
            attrs, source = annotated, ANNOTATED
        elif attribute_probs is not None and decoder.names:
            attrs, source = decoder.attributes(attribute_probs[i]), PREDICTED
        else:
            attrs, source = (), None
        category = rec.category or predicted_category(None if category_probs is None else category_probs[i], category_names)
        entries.append(Entry(rec.item_id, str(Path(rec.path).resolve()), category, attrs, source))
    return entries


def build_index(
    model: Any,
    records: Sequence[Record],
    index_dir: str | Path,
    backend: str = "faiss",
    kind: str = "flat",
    add: bool = False,
    milvus_uri: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    catalog: Catalog | None = None,
    decode_device: "torch.device | None" = None,
) -> BuildReport:
    """Embed ``records`` with ``model`` (from :func:`mmfl.checkpoint.load_model`) into the index at ``index_dir``.

    Without ``add`` the index is rebuilt from ``records`` alone; with ``add`` they are appended
    (images already indexed are skipped), which requires the same checkpoint, dimension,
    backend and kind as the existing index. ``catalog`` (the dataset ``records`` come from)
    supplies annotated attributes; without it, or for items it does not label, attributes are
    the model's predictions under the checkpoint's thresholds and exclusive groups. ``decode_device``
    (``mmfl index --decode gpu``) decodes the JPEGs there (:func:`mmfl.extract.extract_features`).

    Builds and live updates of other processes (a server's ``POST /items``) take turns on the
    index's :func:`writer_lock`. A rebuild holds it throughout; an add embeds first and takes it
    only to write and commit, so live updates go on while it embeds (minutes for a large
    folder). It then checks again which images are indexed: one another writer committed in the
    meantime is not added twice.
    """
    index_dir = Path(index_dir)
    if backend not in BACKENDS:
        raise GalleryIndexError(f"unknown backend '{backend}' (use {' or '.join(BACKENDS)})")
    if kind not in KINDS:
        raise GalleryIndexError(f"unknown index kind '{kind}' (use {', '.join(KINDS)})")
    if not add and not records:
        raise DataError("no gallery images to index (is the split empty or are there no shop images?)")
    embed = functools.partial(_embed, model, batch_size=batch_size, device=device, num_workers=num_workers,
                              progress=progress, catalog=catalog, decode_device=decode_device)
    if add:
        return _add(model, records, index_dir, backend, kind, embed)
    _check_target(index_dir)  # a foreign folder is refused before anything is made in it
    index_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(index_dir):
        previous = _check_target(index_dir)
        vectors, entries = embed(records)
        return _commit(model, index_dir, previous, None, vectors, entries, backend, kind, milvus_uri, len(records))


def _embed(model: Any, records: Sequence[Record], batch_size: int, device: str, num_workers: int, progress: bool,
           catalog: Catalog | None, decode_device: "torch.device | None") -> tuple[np.ndarray, list[Entry]]:
    """The vectors and metadata rows of ``records`` (see :func:`gallery_entries`)."""
    from mmfl.extract import extract_features

    feats = extract_features(model, records, model_input_size(model), batch_size=batch_size, device=device,
                             num_workers=num_workers, progress=progress, predictions=True,
                             decode_device=decode_device)
    vectors = np.ascontiguousarray(feats.embeddings.numpy(), dtype=np.float32)
    entries = gallery_entries(
        records,
        None if feats.attribute_probs is None else feats.attribute_probs.numpy(),
        None if feats.category_probs is None else feats.category_probs.numpy(),
        AttributeDecoder.from_meta(model.meta), model.meta["category_names"], catalog,
    )
    return vectors, entries


def _addable(index_dir: Path, model: Any, backend: str, kind: str) -> dict[str, Any]:
    """The index's manifest, refused unless ``model``, ``backend`` and ``kind`` are the index's own."""
    previous = _check_target(index_dir)
    if previous is None:
        raise GalleryIndexError(f"{index_dir}: no index to add to (build it first without --add)")
    check_compatible(previous, model, index_dir)
    if (previous["backend"], previous["kind"]) != (backend, kind):
        raise GalleryIndexError(
            f"{index_dir}: is a {previous['backend']}/{previous['kind']} index; --add needs the same "
            f"--backend {previous['backend']} --kind {previous['kind']}"
        )
    return previous


def _add(model: Any, records: Sequence[Record], index_dir: Path, backend: str, kind: str,
         embed: Callable[[Sequence[Record]], tuple[np.ndarray, list[Entry]]]) -> BuildReport:
    """:func:`build_index` with ``add``: embed what is not indexed yet, then append it under the writer lock."""
    previous = _addable(index_dir, model, backend, kind)
    with contextlib.closing(open_store(index_dir)) as store:
        known = store.indexed_images([str(Path(r.path).resolve()) for r in records])
        count = len(store)
    todo = [r for r in records if str(Path(r.path).resolve()) not in known]
    if not todo:
        return BuildReport(index_dir, 0, len(records), count, previous)
    vectors, entries = embed(todo)
    with writer_lock(index_dir):
        previous = _addable(index_dir, model, backend, kind)  # a rebuild may have come in between
        base = open_store(index_dir)
        try:
            committed = base.indexed_images([e.image for e in entries])  # added by others meanwhile
            keep = [i for i, e in enumerate(entries) if e.image not in committed]
            if not keep:
                return BuildReport(index_dir, 0, len(records), len(base), previous)
            return _commit(model, index_dir, previous, base, vectors[keep], [entries[i] for i in keep], backend,
                           kind, None, len(records))
        finally:
            base.close()


def _commit(model: Any, index_dir: Path, previous: dict[str, Any] | None, base: GalleryStore | None,
            vectors: np.ndarray, entries: list[Entry], backend: str, kind: str, milvus_uri: str | None,
            asked: int) -> BuildReport:
    """(Holding the writer lock.) Write a generation of ``entries`` (after ``base``'s live rows when adding) and
    commit its manifest; ``asked`` is how many images the caller asked for (the rest were already indexed)."""
    gen = new_generation()
    index_id = previous["index_id"] if previous else secrets.token_hex(4)
    if backend == "faiss":
        written = faiss_store.write_faiss_generation(index_dir, gen, vectors, entries, kind, base)
    else:
        written = milvus_store.write_milvus_generation(
            index_dir, gen, vectors, entries, kind, index_id, milvus_uri, len(model.meta["attribute_names"]), base)
    adding = base is not None
    decoder = AttributeDecoder.from_meta(model.meta)
    now = utc_now()
    manifest = {
        "format": FORMAT, "version": VERSION, "index_id": index_id, "generation": gen,
        "backend": backend, "kind": kind, "embed_dim": int(vectors.shape[1]),
        "count": (len(base) if adding else 0) + len(entries),
        "checkpoint": str(Path(model.meta["checkpoint"]).resolve()),
        "checkpoint_sha256": model.meta["checkpoint_sha256"],
        "created": previous["created"] if adding and previous else now, "updated": now,
        "facets": Facets.from_json(previous.get("facets") if adding and previous else None).add(entries).to_json(),
        # how rows with attribute_source "predicted" were decided (thresholds' origin, groups)
        "attribute_predictions": decoder.describe() if decoder.names else None,
        **written,
    }
    commit_generation(index_dir, manifest, previous)
    return BuildReport(index_dir, len(entries), asked - len(entries), manifest["count"], manifest)


def commit_generation(index_dir: Path, manifest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Make ``manifest``'s generation the index (the atomic rename), then delete what no manifest names."""
    write_manifest(index_dir, manifest)
    _remove_leftovers(index_dir, manifest, previous)


def compact(store: GalleryStore) -> GalleryStore:
    """Fold a FAISS index's journal of live updates into a new generation; the store opened on it.

    Call it holding :func:`writer_lock`. The journal's rows become ordinary rows and removed rows
    are gone for good. A crash before the commit leaves the journal-bearing generation in place;
    the dead one's files are removed by the next build or compaction. Milvus applies updates
    itself: its store comes back as is.
    """
    if store.manifest["backend"] != "faiss" or not store.pending_rows():
        return store
    index_dir = Path(store.index_dir)
    gen = new_generation()
    written = faiss_store.write_faiss_generation(
        index_dir, gen, np.zeros((0, store.manifest["embed_dim"]), np.float32), [], store.manifest["kind"], store)
    manifest = {k: v for k, v in store.manifest.items() if k != "journal"}
    manifest.update(generation=gen, updated=utc_now(), count=len(store), **written)
    commit_generation(index_dir, manifest, store.manifest)
    return open_store(index_dir)


def remove_unnamed_photos(store: GalleryStore) -> int:
    """Delete the uploaded photos (``INDEX/photos``) that no live row of ``store`` names; how many.

    Call it holding :func:`writer_lock`, after a commit, with the committed state: a removal's
    photos then go as soon as it is durable. A process killed between its commit and this call
    (or an add killed after writing its photos, before its commit) leaves files no row names,
    which the next commit's call deletes. A photo that two items share (the same upload) stays
    while either is live; every photo is written under the same lock, so none is in flight here.
    """
    folder = Path(store.index_dir) / PHOTOS
    try:
        files = {str(path.resolve()): path for path in folder.iterdir()}
    except FileNotFoundError:
        return 0
    if not files:
        return 0
    live = store.indexed_images(list(files))
    gone = [path for name, path in files.items() if name not in live]
    for path in gone:
        path.unlink(missing_ok=True)
    return len(gone)


def _remove_leftovers(index_dir: Path, manifest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """After a commit: delete older generations (best effort: the new index is already live)."""
    keep = faiss_store.referenced_files(manifest)
    try:
        for path in index_dir.iterdir():
            if _OWN_FILES.match(path.name) and path.is_file() and path.name not in keep:
                path.unlink()
        fsync_dir(index_dir)
        # A server started on the previous generation keeps working until restarted: keep that one too.
        keep_collections = {m["milvus"]["collection"] for m in (previous, manifest) if m and m["backend"] == "milvus"}
        targets = {m["milvus"]["uri"]: m for m in (previous, manifest) if m and m["backend"] == "milvus"}
        for m in targets.values():
            milvus_store.drop_stale_collections(index_dir, m, keep=keep_collections)
    except (OSError, GalleryIndexError) as exc:
        warnings.warn(f"{index_dir}: could not remove an old generation ({exc})", stacklevel=2)

