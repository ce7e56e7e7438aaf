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


def add_skip_args(parser: argparse.ArgumentParser) -> None:
    """``--skip-bad`` / ``--strict``: what an unreadable image or bad annotation line does (``args.skip_bad``:
    True, False, or None for the format's default: a photo folder skips, an annotated dataset refuses)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--skip-bad", dest="skip_bad", action="store_const", const=True, default=None,
                       help="count and skip unreadable images and bad annotation lines, one line each "
                            "(the default for the folder formats)")
    group.add_argument("--strict", dest="skip_bad", action="store_const", const=False,
                       help="stop at the first unreadable image or bad annotation line (the default for "
                            "annotated datasets)")


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device``, ``--workers`` and ``--decode`` of the commands that embed a whole split."""
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                        help="where JPEGs are decoded: cpu (the worker processes) or gpu (batched nvJPEG on the "
                             "model's CUDA device; falls back to cpu with a notice elsewhere; default: cpu)")


def decode_device_for(choice: str, device: "torch.device") -> "torch.device | None":
    """The ``--decode`` choice as :func:`mmfl.data.gpu_decode.pick_decode_device` resolves it for ``device``."""
    from mmfl.data.gpu_decode import pick_decode_device

    return pick_decode_device(choice, device)
