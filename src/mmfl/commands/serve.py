"""``mmfl serve``: the search API and web page for an index, with uvicorn."""
from __future__ import annotations

import argparse
import os

#: Environment variable holding the admin token when --admin-token is not given.
TOKEN_ENV = "MMFL_ADMIN_TOKEN"


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ": the page at /, the API docs at /docs.")
    parser.add_argument("index", help="index folder made by 'mmfl index'")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes, each with its own model and index (default 1)")
    parser.add_argument("--checkpoint", help="checkpoint to use instead of the one recorded in the index (same file content)")
    parser.add_argument("--onnx", metavar="FILE",
                        help="graph from 'mmfl export --onnx' of the index's checkpoint, run with ONNX Runtime on CPU")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--max-upload-mb", type=int, default=10,
                        help="largest accepted request body in MiB (one search, a batch, an add), at least 1 (default 10)")
    parser.add_argument("--admin-token", metavar="TOKEN",
                        help="turn on POST /items and DELETE /items/{id} for requests with 'Authorization: Bearer TOKEN' "
                             f"(at least 16 characters; default: ${TOKEN_ENV}, and without either they are off). "
                             f"Prefer ${TOKEN_ENV}: a command line is visible to other users of the machine")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging.config

    import uvicorn

    from mmfl.errors import MMFLError
    from mmfl.serve.app import create_app, log_config

    if args.workers < 1:
        raise MMFLError(f"--workers {args.workers}: must be at least 1")
    if args.max_upload_mb < 1:
        raise MMFLError(f"--max-upload-mb {args.max_upload_mb}: must be at least 1")
    if args.workers > 1:
        _check_multi_process(args.index)
    logging_setup = log_config()
    logging.config.dictConfig(logging_setup)  # before loading, so the warm-up line shows
    # Load once here so a bad index or checkpoint fails with one line before anything listens.
    token = args.admin_token or os.environ.get(TOKEN_ENV) or None
    app = create_app(args.index, args.checkpoint, args.device, args.max_upload_mb, args.onnx, token)
    # access_log=False: the app's RequestLog writes the one line per request (with its duration).
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", log_config=logging_setup, access_log=False)
        return 0
    os.environ.update({
        "MMFL_SERVE_INDEX": os.path.abspath(args.index),
        "MMFL_SERVE_CHECKPOINT": os.path.abspath(args.checkpoint) if args.checkpoint else "",
        "MMFL_SERVE_DEVICE": args.device, "MMFL_SERVE_MAX_UPLOAD_MB": str(args.max_upload_mb),
        "MMFL_SERVE_ONNX": os.path.abspath(args.onnx) if args.onnx else "", TOKEN_ENV: token or "",
    })
    app.state.catalog.close()  # each worker process builds its own from the environment
    uvicorn.run("mmfl.serve.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="info", log_config=logging_setup, access_log=False)
    return 0


def _check_multi_process(index: str) -> None:
    """Several workers each open the index; Milvus Lite allows one process per .db file."""
    from mmfl.errors import MMFLError
    from mmfl.index.milvus_store import is_remote
    from mmfl.index.store import read_manifest

    manifest = read_manifest(index)
    if manifest["backend"] == "milvus" and not is_remote(manifest["milvus"]["uri"]):
        raise MMFLError(f"--workers: {index} uses Milvus Lite, which one process at a time can open; "
                        "use --workers 1 or an index on a Milvus server (--milvus-uri http://host:19530)")
