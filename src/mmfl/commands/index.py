"""``mmfl index``: embed a dataset's shop images into a gallery index (FAISS folder or Milvus), or remove items from one."""
from __future__ import annotations

import argparse
import sys

from mmfl.commands.common import add_extraction_args, add_progress_arg, add_skip_args


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    parser.add_argument("checkpoint", nargs="?", help="trained checkpoint (.pt); not needed with --remove")
    parser.add_argument("--data", help="dataset root folder (required unless --remove)")
    parser.add_argument("--format", dest="fmt",
                        help="dataset format: deepfashion-c2s, inshop, street2shop, deepfashion2, csv, folder or "
                             "folder-photos (required unless --remove)")
    parser.add_argument("--split", default="test",
                        help="split(s) whose shop images form the gallery: a name, a comma-separated list, or all "
                             "(default: test)")
    parser.add_argument("--out", required=True, help="index folder (created, rebuilt, or extended with --add)")
    parser.add_argument("--backend", choices=("faiss", "milvus"), default=None,
                        help="faiss: files in --out (default); milvus: a Milvus collection (manifest in --out)")
    parser.add_argument("--milvus-uri", help="Milvus Lite file (*.db, default OUT/milvus.db) or http(s)://host:19530; "
                                             "a server token is read from $MILVUS_TOKEN")
    parser.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default=None,
                        help="flat: exact (default); ivf/hnsw: approximate, for large catalogues")
    parser.add_argument("--add", action="store_true",
                        help="append to the existing index (same checkpoint); images already indexed are skipped")
    parser.add_argument("--remove", metavar="IDS",
                        help="remove these items (all their images) from the index in --out: comma-separated item "
                             "ids, or @FILE with one id per line; an id not in the index is an error and nothing is "
                             "removed. A running 'mmfl serve' of the index sees the change at its next search")
    add_skip_args(parser)
    add_extraction_args(parser)
    add_progress_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.errors import MMFLError

    if args.remove is not None:
        extra = [flag for flag, given in (("CHECKPOINT", args.checkpoint), ("--data", args.data), ("--format", args.fmt),
                                          ("--add", args.add)) if given]
        if extra:
            raise MMFLError(f"--remove: takes only --out INDEX, not {', '.join(extra)}")
        return remove(args.out, parse_ids(args.remove))
    missing = [flag for flag, given in (("CHECKPOINT", args.checkpoint), ("--data", args.data), ("--format", args.fmt))
               if not given]
    if missing:
        raise MMFLError(f"mmfl index: {', '.join(missing)} required (or --remove IDS --out INDEX to remove items)")
    return build(args)


def parse_ids(text: str) -> list[str]:
    """``a,b,c`` or ``@FILE`` (one id per line; blank lines and ``#`` comments skipped) -> item ids."""
    from mmfl.errors import MMFLError

    if text.startswith("@"):
        path = text[1:]
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except FileNotFoundError:
            raise MMFLError(f"--remove {text}: {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MMFLError(f"--remove {text}: {path}: unreadable ({exc})") from None
        ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise MMFLError(f"--remove {text!r}: no item ids given")
    return ids


def remove(index: str, ids: list[str]) -> int:
    """``mmfl index --remove``: the same :meth:`mmfl.catalog.Catalog.remove` the service's DELETE /items calls."""
    from mmfl.catalog import Catalog

    with Catalog.open(index, with_model=False) as catalog:
        before = len(catalog)
        removed = catalog.remove(ids)
        print(f"{index}: removed {removed} items ({before - len(catalog)} images); {len(catalog)} images left")
    return 0


def build(args: argparse.Namespace) -> int:
    from mmfl.checkpoint import load_model
    from mmfl.commands.common import decode_device_for
    from mmfl.devices import resolve_device
    from mmfl.data.formats import read_dataset
    from mmfl.errors import DataError
    from mmfl.index.build import build_index
    from mmfl.index.store import read_manifest

    # --add keeps the existing backend and kind unless told otherwise; a new index is exact FAISS by default.
    existing = read_manifest(args.out) if args.add else {"backend": "faiss", "kind": "flat"}
    backend, kind = args.backend or existing["backend"], args.kind or existing["kind"]
    # Skipping decodes every image up front, so one that breaks only when decoded (a truncated
    # JPEG) is a counted skip rather than the end of the build half-way through embedding.
    catalog = read_dataset(args.data, args.fmt, skip_bad=args.skip_bad, check_images=None)
    for reason in catalog.skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    splits = sorted({r.split for r in catalog.records}) if args.split == "all" else \
        [s.strip() for s in args.split.split(",") if s.strip()]
    gallery = catalog.split(splits, domain="shop")
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
