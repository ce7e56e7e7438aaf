"""``mmfl detect CHECKPOINT PHOTO...``: the garment boxes a checkpoint's box head finds, as a table or JSON.

Each photo gets its boxes (original pixels), categories and scores, plus the box a search would
use and why (:func:`mmfl.localise.choose_box`). A photo that cannot be read is one ``error:``
line on stderr (``"error"`` in the JSON); the others are still reported and the exit status is 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    parser.add_argument("checkpoint", help="checkpoint trained with model.box_head=true")
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="whole photos to look at")
    parser.add_argument("--max-boxes", type=int, help="boxes per photo (default: the checkpoint's box.max_boxes)")
    parser.add_argument("--min-score", type=float,
                        help="report boxes scoring at least this (default: the checkpoint's box.min_score)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON list, one object per photo")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.checkpoint import load_model
    from mmfl.data.images import open_image
    from mmfl.errors import MMFLError
    from mmfl.localise import box_settings, choose_box, detect, has_box_head

    if args.max_boxes is not None and args.max_boxes < 1:
        raise MMFLError(f"--max-boxes {args.max_boxes}: must be at least 1")
    if args.min_score is not None and not 0.0 <= args.min_score < 1.0:
        raise MMFLError(f"--min-score {args.min_score}: must lie in [0, 1)")
    model = load_model(args.checkpoint, args.device)
    if not has_box_head(model):
        raise MMFLError(f"{args.checkpoint}: this checkpoint has no box head (train with model.box_head=true)")
    min_score = box_settings(model)["min_score"] if args.min_score is None else args.min_score
    answers: list[dict[str, Any]] = []
    failed = 0
    for path in args.photos:
        try:
            image = open_image(path)
        except MMFLError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr)
            answers.append({"image": path, "error": str(exc)})
            continue
        found = detect(model, image, args.max_boxes, min_score)
        box, reason = choose_box(found, image.size, min_score=min_score)
        answers.append({"image": path, "width": image.width, "height": image.height,
                        "detections": [d.to_dict() for d in found],
                        "search_box": list(box) if box is not None else None, "reason": reason})
    if args.json:
        print(json.dumps(answers, indent=2, ensure_ascii=False))
    else:
        print("\n".join(format_table(a) for a in answers if "error" not in a))
    return 2 if failed else 0


def format_table(answer: dict[str, Any]) -> str:
    """One header line per photo (size, what a search would use), then rank, score, category, box."""
    lines = [f"{answer['image']} {answer['width']}x{answer['height']}: {answer['reason']}"]
    rows = [("rank", "score", "category", "cat.prob", "box x1,y1,x2,y2")]
    for rank, d in enumerate(answer["detections"], 1):
        rows.append((str(rank), f"{d['score']:.3f}", d["category"], f"{d['category_score']:.2f}",
                     ",".join(map(str, d["box"]))))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
