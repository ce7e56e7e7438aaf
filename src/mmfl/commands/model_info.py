"""``mmfl model-info``: size and cost of a preset on a backbone, without data or weights.

Parameters are counted twice: all of them, and without the ID classifiers, whose size depends
only on how many items the training set has (``--items``, 1000 by default). GFLOPs come from
``torch.utils.flop_counter`` on one eval-mode forward of a single image: floating-point operations
(a multiply-add counts 2) divided by 1e9, convolutions and matrix products only.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, get_args, get_type_hints

from mmfl.config import ModelConfig

BACKBONES = get_args(get_type_hints(ModelConfig)["backbone"])


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    parser.add_argument("--preset", default="mmfl", help="preset name or YAML file (default: mmfl)")
    parser.add_argument("--backbone", choices=BACKBONES, help="override model.backbone")
    parser.add_argument("--size", type=int, help="square input size in pixels (default: the config's input.size)")
    parser.add_argument("--items", type=int, default=1000, help="number of training items (ID classes; default 1000)")
    parser.add_argument("--attributes", type=int, default=0, help="number of attributes (default 0)")
    parser.add_argument("--categories", type=int, default=0, help="number of categories (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.last_stride=2")
    parser.set_defaults(func=run)


def model_info(preset: str, overrides: list[str], size: int | None, items: int, attributes: int, categories: int) -> dict[str, Any]:
    """Parameters, GFLOPs at ``size`` x ``size``, embedding size and branch widths of a config."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmfl.config import load_config
    from mmfl.errors import MMFLError
    from mmfl.models import build_model

    cfg = load_config(preset, [*overrides, "model.pretrained=none"])
    size = size or cfg.input.size
    if size < 32:
        raise MMFLError(f"--size: {size} is too small (use 32 or more)")
    model = build_model(cfg, items, attributes, categories).eval()
    params = sum(p.numel() for p in model.parameters())
    classifiers = sum(h.classifier.weight.numel() for b in model.branches for h in b.heads)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.rand(1, 3, size, size))
    branches = [
        {"name": spec.name, "level": spec.level, "source": spec.source, "partition": spec.partition,
         "pooling": spec.pooling,
         "embeddings": len(branch.names), "dim": spec.dim, "width": sum(branch.dims)}
        for spec, branch in zip(cfg.model.branches, model.branches)
    ]
    return {
        "preset": preset, "backbone": cfg.model.backbone, "size": size, "fusion": cfg.model.fusion,
        "params": params, "params_without_id_classifiers": params - classifiers,
        "gflops": counter.get_total_flops() / 1e9, "embed_dim": model.embed_dim, "branches": branches,
    }


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"model.backbone={args.backbone}"] if args.backbone else [])
    info = model_info(args.preset, overrides, args.size, args.items, args.attributes, args.categories)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['preset']} on {info['backbone']} (fusion {info['fusion']}), input {info['size']}x{info['size']}")
    print(f"params      {info['params'] / 1e6:.2f} M ({info['params_without_id_classifiers'] / 1e6:.2f} M without "
          f"the ID classifiers for {args.items} items)")
    print(f"GFLOPs      {info['gflops']:.2f}")
    print(f"embed_dim   {info['embed_dim']}")
    for b in info["branches"]:
        print(f"  {b['name']:<10} level {b['level']} {b['source']:<8}  {b['partition']:<10} {b['pooling']:<4} "
              f"{b['embeddings']} x {b['dim']} = {b['width']}")
    return 0
