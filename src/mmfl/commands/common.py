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
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3")


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
