"""``mmfl train``: train a preset or config file, with overrides; ``--resume`` continues last.pt."""
from __future__ import annotations

import argparse

from mmfl.commands.common import add_config_args, add_progress_arg, add_skip_args


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description="Train MMFL-Net. Multi-GPU/multi-node: launch the same command with torchrun "
                    "(e.g. torchrun --nproc_per_node 4 -m mmfl.cli train ...).",
    )
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt")
    add_skip_args(p)
    add_progress_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.config import load_config
    from mmfl.train import train

    skip = [] if args.skip_bad is None else [f"data.skip_bad={str(args.skip_bad).lower()}"]
    cfg = load_config(args.config, [*args.overrides, *skip])
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"checkpoint: {result.last_checkpoint}")
    if result.best_checkpoint is not None:
        print(f"best (val top-20): {result.best_checkpoint}")
    return 0
