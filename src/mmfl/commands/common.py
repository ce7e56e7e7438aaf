"""Arguments and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def add_config_args(parser: argparse.ArgumentParser, default: str = "mmfl") -> None:
    """``--config PRESET|FILE`` plus trailing ``key=value`` overrides."""
    parser.add_argument(
        "--config", default=default,
        help=f"preset name (global, mgn, mmfl) or a YAML file (default: {default})",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 (flags may stand among them)")


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``, the one name every subcommand with progress reports uses for silencing them."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress reports (bars on a terminal, periodic lines in a log)")


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device`` and ``--workers`` of the commands that embed a whole split."""
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
