"""``mmfl synth OUT``: generate a consumer-to-shop dataset in the DeepFashion layout."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Draw garments procedurally and write them as DeepFashion Consumer-to-shop: "
                    "img/<CAT>/<SUB>/id_XXXXXXXX/{shop,comsumer}_NN.jpg plus Anno/ and Eval/ lists. "
                    "The same seed gives byte-identical files for any number of workers.",
    )
    parser.add_argument("out", type=Path, metavar="OUT",
                        help="output folder: new, empty, or a previous 'mmfl synth' output (replaced)")
    parser.add_argument("--items", type=int, default=300, help="number of items (at least 3; default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels, 32..1024 (default 128)")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing items in parallel (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.synth import generate

    start = time.perf_counter()
    s = generate(args.out, args.items, seed=args.seed, size=args.size, workers=args.workers)
    print(
        f"wrote {s['items']} items in {s['categories']} categories to {s['out']}: "
        f"{s['shop_images']} shop + {s['consumer_images']} consumer images, {s['pairs']} pairs; "
        f"train/val/test items {s['train_items']}/{s['val_items']}/{s['test_items']} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    return 0
