"""The ``mmfl`` command line: one sub-parser per subcommand, each defined in ``mmfl.commands``.

A command module exposes ``register(subparsers, name, help_text)``, which adds its parser and sets
``func=run``. Heavy imports (torch, faiss) happen inside ``run`` so ``mmfl --help`` is fast.
User errors (:class:`~mmfl.errors.MMFLError`) print one line and exit 2; ``--debug`` shows
the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mmfl import __version__
from mmfl.errors import MMFLError, one_line

#: subcommand -> (module under mmfl.commands, one-line help); order is the order in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "generate a consumer-to-shop dataset (DeepFashion layout)"),
    "train": ("train", "train MMFL-Net (or a baseline preset)"),
    "eval": ("evaluate", "evaluate a checkpoint: top-k accuracy, mAP, plots"),
    "index": ("index", "embed a shop gallery into a searchable index"),
    "search": ("search", "find the shop items matching a photo"),
    "detect": ("detect", "find the garments (boxes, categories, scores) in whole photos"),
    "embed": ("embed", "embed images (folder, list or dataset) to .npy or .parquet, resumably"),
    "serve": ("serve", "HTTP API and web page for visual search"),
    "export": ("export", "export a checkpoint to ONNX (parity-checked)"),
    "demo": ("demo", "run the whole pipeline on generated data"),
    "model-info": ("model_info", "parameters, GFLOPs and embedding size of a preset"),
    "config": ("config_cmd", "show a resolved config with every key's help, or list the keys"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmfl",
        description="Consumer-to-shop fashion retrieval with MMFL-Net.",
    )
    parser.add_argument("--version", action="version", version=f"mmfl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(f"mmfl.commands.{module}").register(subparsers, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except MMFLError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, letting flags stand among a subcommand's ``key=value`` overrides.

    argparse gives a ``nargs="*"`` positional only its first unbroken run of words, so in
    ``train data.root=x --no-progress train.epochs=1`` the last override would be refused as
    unrecognised. The words it leaves over are appended to the overrides in order (they all come
    after the run it took); anything else left over is still refused.
    """
    args, extra = parser.parse_known_args(argv)
    overrides = [word for word in extra if "=" in word and not word.startswith("-")]
    if extra and (len(overrides) != len(extra) or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


if __name__ == "__main__":
    sys.exit(main())
