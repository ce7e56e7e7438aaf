"""``mmfl embed``: embeddings of a folder, a list file or a dataset, to ``.npy`` (+ ``.json``) or ``.parquet``.

For engineers who want the vectors themselves (their own vector database, deduplication,
clustering) rather than an mmfl index. The work is cut into chunks of ``--chunk-size`` images;
each finished chunk is written atomically to ``OUT.partial/`` under a name derived from the
checkpoint's hash and the chunk's images and boxes, so a run that was killed (or that failed on
a bad image) resumes where it stopped: a re-run reuses every chunk whose inputs are unchanged.
The final file is assembled chunk by chunk (memory bounded by one chunk), written atomically,
and the partial folder removed. Embedding goes through :class:`mmfl.retriever.Retriever`, the
same code as the Python API.

A bad image (missing, not decodable, a box outside it) ends the run with one line naming it, the
finished chunks kept. With ``--skip-bad`` it is skipped instead: one ``skipped: <reason>`` line on
stderr each, and every reason in the output's metadata (``skipped``), so nothing goes missing
unsaid. Images are not decoded twice for this: a chunk is embedded as usual, and only a chunk
that fails is decoded image by image to find its bad ones (kept in its chunk file, so a resumed
run lists them again without decoding them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

from mmfl.commands.common import add_progress_arg, add_skip_args

if TYPE_CHECKING:
    import numpy as np

    from mmfl.retriever import Retriever

#: Output kinds by suffix.
SUFFIXES = (".npy", ".parquet")
#: ``PATH x1,y1,x2,y2`` on a list-file line: the box is the last whitespace-separated word.
_LIST_BOX = re.compile(r"^(?P<path>.*\S)\s+(?P<box>[-+\d.eE]+,[-+\d.eE]+,[-+\d.eE]+,[-+\d.eE]+)$")
FORMAT, VERSION = "mmfl-embeddings", 1

_DESCRIPTION = """\
Embed images with a trained checkpoint, in batches, resumably.

INPUT is one of:
  a folder         every image below it (.jpg .jpeg .png .bmp .webp), sorted; id = path relative to the folder
  a list file      (.txt) one image per line, 'PATH' or 'PATH x1,y1,x2,y2'; relative paths are relative to
                   the list's folder; blank lines and lines starting with # are ignored; id = PATH as written
  an image         a single image file; id = its file name
  a dataset root   with --format (deepfashion-c2s, inshop, street2shop, deepfashion2, csv); its boxes are
                   used; id = the item id; --split / --domain select records

OUT is either
  FEATS.npy        float32 (N, D) L2-normalised vectors, plus FEATS.json beside it: {"format", "version",
                   "checkpoint", "checkpoint_sha256", "embed_dim", "count", "vectors", "rows"}, where rows[i]
                   = {"id", "path", "box", "domain", "split", "category"} describes vector i (box is
                   [x1, y1, x2, y2] or null; domain, split and category only for datasets, else null)
  FEATS.parquet    one row per image: id, path, box, domain, split, category, embedding (list of float32);
                   the checkpoint and its sha256 are in the schema metadata (needs pyarrow)

Finished chunks are kept in OUT.partial/ until the end; re-running the same command after an
interruption reuses them (only chunks whose images, boxes and checkpoint are unchanged).

A bad image stops the run with one line naming it (a dataset of the folder formats skips by
default); with --skip-bad each is skipped, listed on stderr ('skipped: <reason>') and in the
output's metadata ("skipped"), and the rest is embedded."""


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="trained checkpoint (.pt)")
    parser.add_argument("input", metavar="INPUT", help="folder of images, list file, image, or dataset root with --format")
    parser.add_argument("--out", required=True, help="FEATS.npy (vectors + FEATS.json) or FEATS.parquet")
    parser.add_argument("--format", dest="fmt", help="read INPUT as a dataset of this format (as 'mmfl index')")
    parser.add_argument("--split", help="dataset split(s) to embed, comma-separated (default: all)")
    parser.add_argument("--domain", choices=("shop", "consumer"), help="only this domain of a dataset (default: both)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--chunk-size", type=int, default=1024,
                        help="images per resumable chunk written to OUT.partial/ (default: 1024)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    add_skip_args(parser)
    add_progress_arg(parser)
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class Row:
    """One image to embed and what the output keeps about it."""

    id: str
    path: str
    box: tuple[int, int, int, int] | None = None
    domain: str | None = None
    split: str | None = None
    category: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "box": list(self.box) if self.box else None,
                "domain": self.domain, "split": self.split, "category": self.category}


def run(args: argparse.Namespace) -> int:
    from mmfl.data.formats import skips_bad
    from mmfl.errors import MMFLError
    from mmfl.progress import progress as make_progress
    from mmfl.retriever import Retriever

    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise MMFLError(f"--out {out}: expected a .npy or .parquet file name")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--chunk-size", args.chunk_size, 1),
                               ("--workers", args.workers, 0)):
        if value < least:
            raise MMFLError(f"{flag} {value}: must be at least {least}")
    if out.suffix.lower() == ".parquet":
        _require_pyarrow(out)
    rows, skipped = gather_rows(args.input, args.fmt, args.split, args.domain, args.skip_bad)
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    if not rows:
        raise MMFLError(f"{args.input}: no images to embed" + (f" ({len(skipped)} skipped)" if skipped else ""))
    retriever = Retriever.load(args.checkpoint, args.device)
    partial = out.with_name(out.name + ".partial")
    chunks = plan_chunks(rows, args.chunk_size, retriever.checkpoint_sha256, partial)
    skip_bad = skips_bad(args.skip_bad, args.fmt) if args.fmt else bool(args.skip_bad)
    finished = [c.done(retriever.embed_dim, skip_bad) for c in chunks]
    reused = sum(finished)
    if reused:
        print(f"resuming: {reused} of {len(chunks)} chunks already in {partial}", file=sys.stderr)
    bar = make_progress(sum(len(c.rows) for c, done in zip(chunks, finished) if not done), "embedding",
                        not args.no_progress, unit="img")
    try:
        for chunk, done in zip(chunks, finished):
            if not done:
                chunk.save(*embed_chunk(retriever, chunk, args.batch_size, args.workers, skip_bad,
                                        bar.update if bar is not None else None))
            for reason in chunk.skipped.values():
                print(f"skipped: {reason}", file=sys.stderr)
            skipped += chunk.skipped.values()
    finally:
        if bar is not None:
            bar.close()
    count = sum(len(c.kept) for c in chunks)
    if not count:
        raise MMFLError(f"{args.input}: no image could be embedded ({len(skipped)} skipped)")
    meta = {"format": FORMAT, "version": VERSION, "checkpoint": str(Path(retriever.checkpoint).resolve()),
            "checkpoint_sha256": retriever.checkpoint_sha256, "embed_dim": retriever.embed_dim, "count": count,
            "num_skipped": len(skipped), "skipped": skipped}
    if out.suffix.lower() == ".npy":
        sidecar = write_npy(out, chunks, meta)
        written = f"{out} + {sidecar}"
    else:
        write_parquet(out, chunks, meta)
        written = str(out)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"{written}: {count} images{f', {len(skipped)} skipped' if skipped else ''}, {retriever.embed_dim}-d, "
          f"checkpoint sha256 {retriever.checkpoint_sha256[:12]} "
          f"({len(chunks)} chunk{'s' if len(chunks) != 1 else ''}, {reused} reused)")
    return 0


def embed_chunk(retriever: "Retriever", chunk: "Chunk", batch_size: int, workers: int, skip_bad: bool,
                progress: Callable[[int], None] | None) -> tuple["np.ndarray", dict[int, str]]:
    """The chunk's vectors (a NaN row for each skipped image) and ``{row in chunk: reason}`` of those skipped.

    The chunk is embedded in one pass; only when that fails on a bad image and ``skip_bad`` is each of
    its images decoded alone to find the bad ones (the same decode as the embedding's), and the rest
    embedded. Without ``skip_bad`` the error goes up: one line naming the image.
    """
    import numpy as np

    from mmfl.errors import DataError
    from mmfl.model_input import model_input

    def embed(rows: Sequence[Row]) -> np.ndarray:
        return retriever.embed([r.path for r in rows], [r.box for r in rows], batch_size=batch_size, workers=workers,
                               progress=progress or False)

    try:
        return embed(chunk.rows), {}
    except DataError as exc:
        if not skip_bad:
            raise
        failure = exc
    skipped = {}
    for i, row in enumerate(chunk.rows):
        try:
            model_input(row.path, row.box, retriever.input_size, str(Path(row.path)))
        except DataError as exc:
            skipped[i] = str(exc)
    if not skipped:  # no image fails alone: not a bad image's doing
        raise failure
    vectors = np.full((len(chunk.rows), retriever.embed_dim), np.nan, np.float32)
    good = [i for i in range(len(chunk.rows)) if i not in skipped]
    if good:
        vectors[good] = embed([chunk.rows[i] for i in good])
    return vectors, skipped


def gather_rows(source: str, fmt: str | None, split: str | None, domain: str | None,
                skip_bad: bool | None = None) -> tuple[list[Row], list[str]]:
    """The images named by INPUT, in a stable order (so chunk names stay valid across runs), and the reasons
    for those left out: bad dataset records (skipped by the reader), list lines naming missing images.

    ``skip_bad``: True skips, False refuses (one line naming the file); None is the dataset format's
    default (:func:`mmfl.data.formats.read_dataset`), and refusing for folders, lists and images.
    """
    from mmfl.errors import DataError

    path = Path(source)
    if fmt is not None:
        return _dataset_rows(source, fmt, split, domain, skip_bad)
    if split or domain:
        raise DataError("--split and --domain select records of a dataset; give --format too")
    if path.is_dir():
        return _folder_rows(path), []
    if not path.is_file():
        raise DataError(f"{path}: not found")
    from mmfl.data.formats.annotations import IMAGE_SUFFIXES

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [Row(path.name, str(path.resolve()))], []
    if path.suffix.lower() == ".txt":
        return _list_rows(path, bool(skip_bad))
    raise DataError(f"{path}: expected a folder, a .txt list of images, an image, or a dataset root with --format")


def _dataset_rows(root: str, fmt: str, split: str | None, domain: str | None,
                  skip_bad: bool | None) -> tuple[list[Row], list[str]]:
    from mmfl.data.formats import read_dataset
    from mmfl.errors import DataError

    catalog = read_dataset(root, fmt, skip_bad=skip_bad)
    records = catalog.records
    if split:
        wanted = [s.strip() for s in split.split(",") if s.strip()]
        records = catalog.split(wanted)
        if not records:
            known = sorted({r.split for r in catalog.records})
            raise DataError(f"{root}: no records in split {split!r} (splits: {', '.join(known)})")
    if domain:
        records = [r for r in records if r.domain == domain]
    return [Row(r.item_id, r.path, r.box, r.domain, r.split, r.category) for r in records], list(catalog.skipped)


def _folder_rows(folder: Path) -> list[Row]:
    """Every image file below ``folder`` (hidden files and folders skipped), by relative path."""
    from mmfl.data.formats.annotations import IMAGE_SUFFIXES

    rows = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                full = Path(dirpath, name)
                rows.append(Row(full.relative_to(folder).as_posix(), str(full.resolve())))
    return sorted(rows, key=lambda r: r.id)


def _list_rows(listing: Path, skip_bad: bool) -> tuple[list[Row], list[str]]:
    """``PATH`` or ``PATH x1,y1,x2,y2`` per line; a missing image is refused here, naming its line (with
    ``skip_bad``: left out, the same line its reason)."""
    from mmfl.errors import DataError
    from mmfl.model_input import check_box_value

    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{listing}: cannot read list file ({exc})") from None
    rows, skipped = [], []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{listing}:{number}"
        box = None
        match = _LIST_BOX.match(text)
        if match:
            text = match["path"]
            box = check_box_value(match["box"].split(","), f"{where}: box")
        image = Path(text) if Path(text).is_absolute() else listing.parent / text
        if not image.is_file():
            if not skip_bad:
                raise DataError(f"{where}: image {image} not found")
            skipped.append(f"{where}: image {image} not found")
            continue
        rows.append(Row(text, str(image.resolve()), box))
    return rows, skipped


@dataclass
class Chunk:
    """A slice of the rows and the file its vectors are kept in until the final file is written.

    ``skipped`` maps a row of the chunk to why it was skipped (``--skip-bad``); its vector is a NaN
    row, and the reasons are kept in ``<chunk>.skipped.json``, written before the vectors, so a
    resumed run lists them again.
    """

    rows: Sequence[Row]
    path: Path
    skipped: dict[int, str] = field(default_factory=dict)

    @property
    def skipped_path(self) -> Path:
        return self.path.with_suffix(".skipped.json")

    @property
    def kept(self) -> list[Row]:
        """The rows that have a vector."""
        return [r for i, r in enumerate(self.rows) if i not in self.skipped]

    def done(self, dim: int, skip_bad: bool) -> bool:
        """Whether a previous run finished this chunk (a file of the right shape is there, its NaN rows those
        its reasons name). One that skipped images is redone without ``skip_bad``, which then stops at the first."""
        import numpy as np

        if not self.path.is_file():
            return False
        try:
            vectors = np.load(self.path)
            skipped = json.loads(self.skipped_path.read_text(encoding="utf-8")) if self.skipped_path.is_file() else {}
        except (OSError, ValueError):
            return False
        if vectors.shape != (len(self.rows), dim):
            return False
        self.skipped = {int(i): str(reason) for i, reason in skipped.items()}
        if sorted(self.skipped) != np.flatnonzero(np.isnan(vectors).any(axis=1)).tolist():
            return False
        return skip_bad or not self.skipped

    def save(self, vectors: Any, skipped: dict[int, str]) -> None:
        import numpy as np

        from mmfl.atomic import atomic_write, atomic_write_text

        self.skipped = skipped
        if skipped:
            atomic_write_text(self.skipped_path, json.dumps(skipped, ensure_ascii=False))
        atomic_write(self.path, lambda fh: np.save(fh, vectors))

    def load(self) -> Any:
        """The vectors of :attr:`kept`."""
        import numpy as np

        vectors = np.load(self.path)
        return np.delete(vectors, sorted(self.skipped), axis=0) if self.skipped else vectors


def plan_chunks(rows: list[Row], size: int, checkpoint_sha256: str, partial: Path) -> list[Chunk]:
    """Chunks of ``size`` rows named ``chunk-NNNNNN-<key>.npy``; the key hashes the checkpoint and the
    chunk's paths and boxes, so a chunk is reused only for the same inputs and the same weights."""
    chunks = []
    for number, start in enumerate(range(0, len(rows), size)):
        part = rows[start:start + size]
        digest = hashlib.sha256(checkpoint_sha256.encode())
        for r in part:
            digest.update(json.dumps([r.path, r.box]).encode())
        chunks.append(Chunk(part, partial / f"chunk-{number:06d}-{digest.hexdigest()[:16]}.npy"))
    return chunks


def write_npy(out: Path, chunks: list[Chunk], meta: dict[str, Any]) -> Path:
    """``out`` (the vectors, streamed chunk by chunk) and its ``.json`` sidecar, both written atomically."""
    import numpy as np

    from mmfl.atomic import atomic_write, atomic_write_text

    def write(fh: IO[bytes]) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (meta["count"], meta["embed_dim"])}
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in chunks:
            fh.write(np.ascontiguousarray(chunk.load(), dtype=np.float32).tobytes())

    atomic_write(out, write)
    sidecar = out.with_suffix(".json")
    rows = [r.to_json() for c in chunks for r in c.kept]
    atomic_write_text(sidecar, json.dumps({**meta, "vectors": out.name, "rows": rows}, ensure_ascii=False) + "\n")
    return sidecar


def write_parquet(out: Path, chunks: list[Chunk], meta: dict[str, Any]) -> None:
    """``out`` as one row group per chunk, written atomically; run metadata in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmfl.atomic import atomic_write

    dim = meta["embed_dim"]
    schema = pa.schema([
        ("id", pa.string()), ("path", pa.string()), ("box", pa.list_(pa.int32(), 4)),
        ("domain", pa.string()), ("split", pa.string()), ("category", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ], metadata={"mmfl": json.dumps(meta)})

    def table(chunk: Chunk) -> "pa.Table":
        vectors = chunk.load().astype("float32").reshape(-1)
        columns = {name: [getattr(r, name) for r in chunk.kept] for name in ("id", "path", "domain", "split", "category")}
        columns["box"] = [list(r.box) if r.box else None for r in chunk.kept]
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors, pa.float32()), dim)
        return pa.table(columns, schema=schema)

    def write(fh: IO[bytes]) -> None:
        with pq.ParquetWriter(fh, schema) as writer:
            for chunk in chunks:
                writer.write_table(table(chunk))

    atomic_write(out, write)


def _require_pyarrow(out: Path) -> None:
    """Refuse a .parquet output before any work when pyarrow is missing (it comes with milvus-lite)."""
    from mmfl.errors import MMFLError

    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MMFLError(f"--out {out}: writing .parquet needs pyarrow (pip install pyarrow), or use a .npy name") from None

