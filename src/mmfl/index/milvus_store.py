"""The scale-out backend: the gallery in a Milvus collection, through ``pymilvus.MilvusClient``.

The same code talks to embedded Milvus Lite (a local ``*.db`` path, what the tests use; by
default ``INDEX/milvus.db``) and to a Milvus server or cluster (``http(s)://host:19530``; a
token, if needed, comes from the ``MILVUS_TOKEN`` environment variable and is never written
to the manifest). Category/attribute filters become Milvus filter expressions, so filtering
happens inside Milvus rather than after the fact.

Atomicity: a full build fills a new collection ``mmfl_<index_id>_<gen>`` and the manifest
switch makes it current. ``--add`` and live adds insert rows numbered from the manifest's
``next_row`` upwards into the current collection, and every query carries ``row < next_row``:
rows of an add that died before its manifest commit are invisible, and the next writer deletes
them first. A live removal commits first (the manifest lists the rows as ``dead_rows``, which
every query excludes) and deletes the rows from Milvus after: a crash in between leaves them
hidden, and the next writer deletes them before committing a manifest that no longer lists them.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mmfl.errors import GalleryIndexError
from mmfl.index.ann import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NPROBE, ivf_nlist
from mmfl.index.store import Entry, Filter, Hit, updated_manifest, write_manifest

DEFAULT_LITE_DB = "milvus.db"
#: Milvus refuses larger top-k (``limit``) values.
MAX_TOPK = 16384
INSERT_BATCH = 1000
_OUTPUT = ["item_id", "image", "category", "attributes"]
#: Added after the first release: collections built before it lack the field (read as None).
_SOURCE = "attribute_source"
_REMOTE_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


def is_remote(uri: str) -> bool:
    return uri.startswith(_REMOTE_SCHEMES)


def record_uri(index_dir: Path, uri: str | None) -> str:
    """What the manifest records for ``--milvus-uri``: a Lite file inside INDEX relative (the folder can move)."""
    if not uri:
        return DEFAULT_LITE_DB
    if is_remote(uri):
        return uri
    if not uri.endswith(".db"):
        raise GalleryIndexError(f"--milvus-uri {uri}: a local Milvus Lite path must end in .db (or use http(s)://host:19530)")
    path = Path(uri).resolve()
    return path.name if path.parent == index_dir.resolve() else str(path)


def connect_uri(index_dir: Path, recorded: str) -> str:
    """The URI to connect to for a recorded one (relative Lite paths live inside INDEX)."""
    if is_remote(recorded) or Path(recorded).is_absolute():
        return recorded
    return str((index_dir / recorded).resolve())


def connect(uri: str) -> Any:
    """A MilvusClient for ``uri``; a connection failure is a one-line GalleryIndexError."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    try:
        return MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
    except (MilvusException, OSError, RuntimeError) as exc:
        hint = "" if is_remote(uri) else "; Milvus Lite lets one process at a time open a .db: is another one using it?"
        raise GalleryIndexError(f"Milvus at {uri}: cannot connect ({str(exc).splitlines()[0][:160]}){hint}") from None


def collection_name(index_id: str, gen: str) -> str:
    return f"mmfl_{index_id}_{gen}"


def _literal(value: str) -> str:
    """A Milvus string literal (JSON's escaping is what Milvus' expression parser accepts)."""
    return json.dumps(value, ensure_ascii=False)


def next_row(manifest: dict[str, Any]) -> int:
    """The first row number not committed (indexes from before live updates: their count)."""
    return int(manifest["milvus"].get("next_row", manifest["count"]))


def committed_rows(manifest: dict[str, Any]) -> str:
    """The Milvus filter for the rows ``manifest`` commits: below ``next_row`` and not removed."""
    expr = f"row < {next_row(manifest)}"
    dead = manifest["milvus"].get("dead_rows") or []
    return expr + (f" and row not in [{', '.join(str(int(r)) for r in dead)}]" if dead else "")


def filter_expression(flt: Filter, manifest: dict[str, Any]) -> str:
    """The Milvus ``filter`` for ``flt``, restricted to the committed rows of ``manifest``."""
    parts = [committed_rows(manifest)]
    if flt.categories:
        parts.append(f"category in [{', '.join(_literal(c) for c in flt.categories)}]")
    parts += [f"ARRAY_CONTAINS(attributes, {_literal(a)})" for a in flt.attributes]
    return " and ".join(parts)


def _index_params(client: Any, kind: str, count: int) -> tuple[Any, dict[str, int]]:
    ip = client.prepare_index_params()
    if kind == "flat":
        ip.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        return ip, {}
    if kind == "ivf":
        nlist = ivf_nlist(count)
        ip.add_index(field_name="vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
        return ip, {"nlist": nlist, "nprobe": min(nlist, IVF_NPROBE)}
    ip.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                 params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
    return ip, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}


def _schema(dim: int, num_attributes: int) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("item_id", DataType.VARCHAR, max_length=512)
    schema.add_field("image", DataType.VARCHAR, max_length=4096)
    schema.add_field("category", DataType.VARCHAR, max_length=256)
    schema.add_field("attributes", DataType.ARRAY, element_type=DataType.VARCHAR,
                     max_capacity=max(1, min(num_attributes, 4096)), max_length=256)
    schema.add_field(_SOURCE, DataType.VARCHAR, max_length=16)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _rows(start: int, vectors: np.ndarray, entries: Sequence[Entry],
          with_source: bool = True) -> Iterable[list[dict[str, Any]]]:
    """Insert batches; ``with_source`` False for a collection made before the source field existed."""
    batch: list[dict[str, Any]] = []
    for offset, (vec, e) in enumerate(zip(vectors, entries)):
        row = {"row": start + offset, "item_id": e.item_id, "image": e.image, "category": e.category or "",
               "attributes": list(e.attributes), "vector": vec.astype(np.float32).tolist()}
        if with_source:
            row[_SOURCE] = e.attribute_source or ""
        batch.append(row)
        if len(batch) == INSERT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def write_milvus_generation(
    index_dir: Path, gen: str, vectors: np.ndarray, entries: Sequence[Entry], kind: str,
    index_id: str, uri: str | None, num_attributes: int, base: "MilvusStore | None" = None,
) -> dict[str, Any]:
    """Fill a new collection (full build) or append to ``base``'s (add); returns the manifest fields."""
    if base is not None:
        start = base.insert(vectors, entries)
        return {"params": dict(base.manifest.get("params", {})), "files": {},
                "milvus": {**base.manifest["milvus"], "next_row": start + len(entries), "dead_rows": []}}
    recorded = record_uri(index_dir, uri)
    client = connect(connect_uri(index_dir, recorded))
    try:
        name = collection_name(index_id, gen)
        index_params, params = _index_params(client, kind, len(vectors))
        client.create_collection(name, schema=_schema(vectors.shape[1], num_attributes), index_params=index_params,
                                 consistency_level="Strong")
        for batch in _rows(0, vectors, entries):
            client.insert(name, batch)
        client.flush(name)
        client.load_collection(name)
    finally:
        client.close()
    return {"params": params, "files": {}, "milvus": {"uri": recorded, "collection": name}}


def drop_stale_collections(index_dir: Path, manifest: dict[str, Any], keep: set[str]) -> None:
    """Drop this index's collections not in ``keep`` (older generations, failed builds)."""
    client = connect(connect_uri(index_dir, manifest["milvus"]["uri"]))
    try:
        prefix = f"mmfl_{manifest['index_id']}_"
        for name in client.list_collections():
            if name.startswith(prefix) and name not in keep:
                client.drop_collection(name)
    finally:
        client.close()


class MilvusStore:
    """An open Milvus-backed index; search and lookups run inside Milvus."""

    max_fetch = MAX_TOPK

    def __init__(self, index_dir: str | Path, manifest: dict[str, Any]):
        self.index_dir = Path(index_dir)
        self.manifest = manifest
        info = manifest.get("milvus") or {}
        if "uri" not in info or "collection" not in info:
            raise GalleryIndexError(f"{self.index_dir / 'manifest.json'}: milvus index without uri/collection")
        self.collection = info["collection"]
        self.client = connect(connect_uri(self.index_dir, info["uri"]))
        if not self.client.has_collection(self.collection):
            self.client.close()
            raise GalleryIndexError(f"{self.index_dir}: Milvus collection {self.collection} not found at {info['uri']}")
        self.client.load_collection(self.collection)
        fields = {f["name"] for f in self.client.describe_collection(self.collection)["fields"]}
        self.output_fields = [*_OUTPUT, _SOURCE] if _SOURCE in fields else list(_OUTPUT)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _purge(self) -> None:
        """Delete rows no commit will show: an uncommitted add's, and removed ones still stored."""
        self.client.delete(self.collection, filter=f"row >= {next_row(self.manifest)}")
        dead = self.manifest["milvus"].get("dead_rows") or []
        if dead:
            self.client.delete(self.collection, ids=[int(r) for r in dead])

    def insert(self, vectors: np.ndarray, entries: Sequence[Entry]) -> int:
        """Store rows for ``entries`` from ``next_row`` on (after a purge), flushed; the first row number.

        Uncommitted until a manifest with the new ``next_row`` is written.
        """
        self._purge()
        start = next_row(self.manifest)
        for batch in _rows(start, vectors, entries, with_source=_SOURCE in self.output_fields):
            self.client.insert(self.collection, batch)
        self.client.flush(self.collection)
        return start

    def with_added(self, vectors: np.ndarray, entries: Sequence[Entry]) -> "MilvusStore":
        """Insert and commit ``entries``; the new state."""
        start = self.insert(vectors, entries)
        milvus = {**self.manifest["milvus"], "next_row": start + len(entries), "dead_rows": []}
        manifest = updated_manifest(self.manifest, len(self) + len(entries), added=entries, milvus=milvus)
        write_manifest(self.index_dir, manifest)
        return self._view(manifest)

    def with_removed(self, item_ids: Sequence[str]) -> "tuple[MilvusStore, list[Entry]]":
        """Commit the removal of ``item_ids`` (rows listed as dead), then delete the rows; the new state."""
        self._purge()
        found = self.client.query(
            self.collection, output_fields=["row", *self.output_fields],
            filter=f"item_id in [{', '.join(_literal(i) for i in item_ids)}] and {committed_rows(self.manifest)}")
        found.sort(key=lambda r: r["row"])
        rows, removed = [int(r["row"]) for r in found], [_entry(r) for r in found]
        milvus = {**self.manifest["milvus"], "next_row": next_row(self.manifest), "dead_rows": rows}
        manifest = updated_manifest(self.manifest, len(self) - len(rows), removed=removed, milvus=milvus)
        write_manifest(self.index_dir, manifest)
        if rows:
            self.client.delete(self.collection, ids=rows)
        return self._view(manifest), removed

    def caught_up(self, manifest: dict[str, Any]) -> "MilvusStore | None":
        """The same collection under a newer manifest (the manifest is its whole state); None for another one."""
        if manifest.get("milvus", {}).get("collection") != self.collection:
            return None
        return self._view(manifest)

    def pending_rows(self) -> int:
        """Milvus applies updates itself: nothing to compact."""
        return 0

    def _view(self, manifest: dict[str, Any]) -> "MilvusStore":
        """This connection seen through ``manifest`` (the states share the client; close the last one)."""
        view = copy.copy(self)
        view.manifest = manifest
        return view

    def search(self, vector: np.ndarray, n: int, flt: Filter) -> list[Hit]:
        """Nearest ``n`` rows passing ``flt``: the filter runs inside Milvus."""
        n = min(n, len(self), MAX_TOPK)
        if n <= 0:
            return []
        kind, params = self.manifest["kind"], self.manifest.get("params", {})
        search_params: dict[str, Any] = {"metric_type": "IP", "params": {}}
        if kind == "ivf":
            search_params["params"] = {"nprobe": int(params.get("nprobe", IVF_NPROBE))}
        elif kind == "hnsw":
            search_params["params"] = {"ef": max(int(params.get("efSearch", HNSW_EF_SEARCH)), n)}
        result = self.client.search(
            self.collection, data=[np.asarray(vector, dtype=np.float32).tolist()], limit=n,
            filter=filter_expression(flt, self.manifest), output_fields=self.output_fields, search_params=search_params,
        )
        return [Hit(int(h["row"]), float(h["distance"]), _entry(h["entity"])) for h in result[0]]

    def images_of(self, item_id: str) -> list[str]:
        rows = self.client.query(self.collection, filter=f"item_id == {_literal(item_id)} and {committed_rows(self.manifest)}",
                                 output_fields=["row", "image"])
        return [r["image"] for r in sorted(rows, key=lambda r: r["row"])]

    def indexed_images(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` are already in the committed rows (``--add`` skips them)."""
        found: set[str] = set()
        for start in range(0, len(paths), 500):
            chunk = paths[start:start + 500]
            rows = self.client.query(
                self.collection, output_fields=["image"],
                filter=f"image in [{', '.join(_literal(p) for p in chunk)}] and {committed_rows(self.manifest)}",
            )
            found.update(r["image"] for r in rows)
        return found

    def close(self) -> None:
        self.client.close()


def _entry(entity: dict[str, Any]) -> Entry:
    return Entry(entity["item_id"], entity["image"], entity.get("category") or None,
                 tuple(entity.get("attributes") or ()), entity.get(_SOURCE) or None)
