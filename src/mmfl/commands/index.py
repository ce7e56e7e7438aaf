"""``mmfl index``: embed a dataset's shop images into a gallery index (FAISS folder or Milvus)."""
from __future__ import annotations

import argparse
import sys

from mmfl.commands.common import add_extraction_args, add_progress_arg


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    parser.add_argument("checkpoint", help="trained checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="dataset root folder")
    parser.add_argument("--format", required=True, dest="fmt",
                        help="dataset format: deepfashion-c2s, inshop, street2shop, deepfashion2 or csv")
    parser.add_argument("--split", default="test", help="split whose shop images form the gallery (default: test)")
    parser.add_argument("--out", required=True, help="index folder (created, rebuilt, or extended with --add)")
    parser.add_argument("--backend", choices=("faiss", "milvus"), default=None,
                        help="faiss: files in --out (default); milvus: a Milvus collection (manifest in --out)")
    parser.add_argument("--milvus-uri", help="Milvus Lite file (*.db, default OUT/milvus.db) or http(s)://host:19530; "
                                             "a server token is read from $MILVUS_TOKEN")
    parser.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default=None,
                        help="flat: exact (default); ivf/hnsw: approximate, for large catalogues")
    parser.add_argument("--add", action="store_true",
                        help="append to the existing index (same checkpoint); images already indexed are skipped")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images/annotations instead of failing")
    add_extraction_args(parser)
    add_progress_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.checkpoint import load_model
    from mmfl.commands.common import decode_device_for, resolve_device
    from mmfl.data.formats import read_dataset
    from mmfl.errors import DataError
    from mmfl.index.build import build_index
    from mmfl.index.store import read_manifest

    # --add keeps the existing backend and kind unless told otherwise; a new index is exact FAISS by default.
    existing = read_manifest(args.out) if args.add else {"backend": "faiss", "kind": "flat"}
    backend, kind = args.backend or existing["backend"], args.kind or existing["kind"]
    # Under --skip-bad every image is decoded up front, so one that breaks only when decoded (a
    # truncated JPEG) is a counted skip rather than the end of the build half-way through embedding.
    catalog = read_dataset(args.data, args.fmt, skip_bad=args.skip_bad,
                           check_images="decode" if args.skip_bad else "header")
    for reason in catalog.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    gallery = catalog.split(args.split, domain="shop")
    if not gallery:
        raise DataError(f"{args.data}: no shop images in split '{args.split}'")
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    report = build_index(
        model, gallery, args.out, backend=backend, kind=kind, add=args.add, milvus_uri=args.milvus_uri,
        batch_size=args.batch_size, device=str(device), num_workers=args.workers, progress=not args.no_progress,
        catalog=catalog, decode_device=decode_device_for(args.decode, device),
    )
    m = report.manifest
    print(f"{report.index_dir}: {report.count} images ({report.added} added, {report.already_indexed} already indexed), "
          f"{m['backend']}/{m['kind']}, {m['embed_dim']}-d, checkpoint sha256 {m['checkpoint_sha256'][:12]}")
    return 0
