"""``mmfl search``: the shop items matching one photo, as a table or JSON.

The first line says which part of the photo was searched and why: the ``--bbox`` given, the
predicted garment box (a checkpoint with a box head), or the whole photo.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

#: Attributes per row of the table (most confident first).
TABLE_ATTRIBUTES = 4


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    parser.add_argument("index", help="index folder made by 'mmfl index'")
    parser.add_argument("image", help="query photo")
    parser.add_argument("--bbox", help="search inside this box of the photo: x1,y1,x2,y2 in pixels "
                                       "(default: the best predicted garment box when the checkpoint has a box head)")
    parser.add_argument("--whole-image", action="store_true",
                        help="search the whole photo, not the predicted garment box (a --bbox still wins)")
    parser.add_argument("--min-score", type=float, metavar="S",
                        help="least score of a predicted box (default: the checkpoint's box.min_score)")
    parser.add_argument("--top-k", type=int, default=20, help="number of items (default 20)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="category=NAME (any of several) or attribute=NAME (all of several); repeatable")
    parser.add_argument("--checkpoint", help="checkpoint to use instead of the one recorded in the index (same file content)")
    parser.add_argument("--onnx", metavar="FILE",
                        help="graph from 'mmfl export --onnx' of the index's checkpoint, run with ONNX Runtime on CPU")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the JSON answer instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.catalog import Catalog
    from mmfl.index.search import parse_bbox
    from mmfl.index.store import parse_filters

    flt = parse_filters(args.filter)
    bbox = parse_bbox(args.bbox) if args.bbox else None
    with Catalog.open(args.index, args.checkpoint, args.device, args.onnx, min_score=args.min_score) as catalog:
        answer = catalog.search(args.image, k=args.top_k, box=bbox, filter=flt, whole_image=args.whole_image)
    print(json.dumps(answer, indent=2, ensure_ascii=False) if args.json else format_table(answer))
    return 0


def format_table(answer: dict[str, Any]) -> str:
    """Rank, score, item, category, attributes (and whether the dataset's labels or the model's
    predictions), and image, one line per item, under a query summary."""
    q = answer["query"]
    head = f"query {q['width']}x{q['height']}" + (f" box {','.join(map(str, q['bbox']))}" if q["bbox"] else " whole")
    head += f" [{q['box_source']}: {q['box_reason']}]"
    if q["category"]:
        head += f", looks like {q['category']}"
    if q["filters"]:
        head += f", filters {' '.join(q['filters'])}"
    rows = [("rank", "score", "item", "category", "attributes", "from", "image")]
    for rank, r in enumerate(answer["results"], 1):
        rows.append((str(rank), f"{r['score']:.4f}", r["item_id"], r["category"] or "-",
                     _short(r["attributes"]), r["attribute_source"] or "-", r["image"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [head + f" ({len(answer['results'])} items, {q['took_ms']} ms)"]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    if not answer["results"]:
        lines.append("(no matching items)")
    return "\n".join(lines)


def _short(attributes: list[str], shown: int = TABLE_ATTRIBUTES) -> str:
    """The most confident attributes, and how many more (the JSON has them all)."""
    text = ",".join(attributes[:shown]) or "-"
    return text + (f" +{len(attributes) - shown}" if len(attributes) > shown else "")
