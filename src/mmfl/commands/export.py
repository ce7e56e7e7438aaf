"""``mmfl export CHECKPOINT --onnx OUT.onnx``: an ONNX graph for ONNX Runtime, parity-checked.

The graph takes float images in [0, 1] (N, 3, S, S) with a dynamic batch axis; the pixel
normalisation is inside. The parity check against PyTorch is printed last; a difference above
1e-3 is an error and leaves OUT.onnx untouched. A checkpoint with a box head also gets OUT.boxes.onnx:
whole photos (N, 3, B, B) at its ``box.size`` B in, decoded garment boxes out (parity-checked the same way).
"""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text + ".")
    parser.add_argument("checkpoint", help="checkpoint written by 'mmfl train'")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX graph")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--size", type=int, help="square input size in pixels (default: the checkpoint's input.size)")
    parser.add_argument("--json", action="store_true", help="print the parity report as one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.checkpoint import load_model
    from mmfl.errors import MMFLError
    from mmfl.export import MIN_SIZE, box_graph_path, export_box_onnx, export_onnx
    from mmfl.localise import box_settings, has_box_head
    from mmfl.model_input import model_input_size

    if args.size is not None and args.size < MIN_SIZE:  # 0 must not quietly mean "the checkpoint's size"
        raise MMFLError(f"--size {args.size}: too small (use {MIN_SIZE} or more, or leave it out for the "
                        "checkpoint's input.size)")
    model = load_model(args.checkpoint, "cpu")
    size = args.size if args.size is not None else model_input_size(model)
    report = export_onnx(model, args.onnx, size, opset=args.opset)
    if has_box_head(model):
        box = box_settings(model)
        report["boxes"] = export_box_onnx(model, box_graph_path(args.onnx), box["size"], box["max_boxes"], args.opset)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, opset {report['opset']}, "
          f"input images (batch, 3, {size}, {size}) in [0, 1], outputs {', '.join(report['outputs'])})")
    diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in report["checked"].items())
    print(f"parity vs PyTorch at batch {'/'.join(map(str, report['batches']))}: max abs diff {diffs} "
          f"(logits relative to their largest magnitude when above 1; limit {report['tolerance']:g}): ok")
    if "boxes" in report:
        b = report["boxes"]
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in b["checked"].items())
        print(f"wrote {b['path']} (whole photos (batch, 3, {b['size']}, {b['size']}) in, outputs "
              f"{', '.join(b['outputs'])}); parity: max diff {diffs} (boxes relative to the size): ok")
    return 0
