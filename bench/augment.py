"""Training augmentation cost per image, one thread: torchvision's tensor ColorJitter vs our affine jitter.

What a DataLoader worker does per training image (decode + crop by box, random resized crop,
flip, colour jitter, to float, random erasing), timed in one process and one thread for:

* ``tensor-colorjitter``: the pipeline mmfl used up to 2026-11-28 (tensor ops after ``ToImage``,
  torchvision's ``ColorJitter`` with hue, i.e. an HSV round trip per pixel);
* ``pil-colorjitter``: the same ops on the PIL image (torchvision dispatches to PIL);
* ``affine-jitter``: ``mmfl.data.transforms.train_transform`` (``ColorJitterAffine``: one
  ``Image.convert`` with a 3 x 4 colour matrix; uint8 out, scaled to float on the device);
* ``decode-only``: the PIL decode alone (``mmfl.data.images.load_crop``), the floor of all three.

On the H100 (2026-11-28) 14 workers fed only 661 images/s at 320 px with the first pipeline,
against 797 images/s for the MMFL-Net step (``docs/BENCHMARKS.md``); this measures the per-worker
rate behind that number. Prints a table and writes a JSON with ``--json``.

    python bench/augment.py --sizes 128,256,320
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torchvision.transforms import v2

from mmfl.data.images import load_crop
from mmfl.data.transforms import train_transform


def reference_pipeline(size: int, on_tensor: bool) -> Callable:
    """torchvision's ColorJitter in our training recipe, on the uint8 tensor or on the PIL image."""
    crop = [v2.RandomResizedCrop((size, size), scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    jitter = [v2.ColorJitter(0.2, 0.2, 0.2, 0.05)]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=0.5, value=0.5)]
    if on_tensor:
        return v2.Compose([v2.ToImage(), *crop, *jitter, *tail])
    return v2.Compose([*crop, *jitter, v2.ToImage(), *tail])


def images_per_s(fn: Callable, paths: list[str], repeats: int) -> float:
    """Best rate over ``repeats`` passes of decode + ``fn``."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(load_crop(p, None, p))
        best = max(best, len(paths) / (time.perf_counter() - t0))
    return best


def make_images(root: Path, size: int, items: int) -> list[str]:
    from mmfl.synth import generate

    generate(root, items, seed=0, size=size, workers=1)
    return sorted(str(p) for p in root.rglob("*.jpg"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,256,320", help="training input sizes (comma list)")
    ap.add_argument("--items", type=int, default=20, help="generated items per size (about 4 photos each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="mmfl-augment-") as tmp:
            paths = make_images(Path(tmp) / "synth", size, args.items)
            rates = {
                "decode-only": images_per_s(lambda img: img, paths, args.repeats),
                "tensor-colorjitter": images_per_s(reference_pipeline(size, on_tensor=True), paths, args.repeats),
                "pil-colorjitter": images_per_s(reference_pipeline(size, on_tensor=False), paths, args.repeats),
                "affine-jitter": images_per_s(train_transform(size), paths, args.repeats),
            }
        rows.append({"size": size, "images": len(paths), "images_per_s": rates,
                     "affine_over_tensor": rates["affine-jitter"] / rates["tensor-colorjitter"]})
    print("| size | images | decode only img/s | tensor ColorJitter img/s | PIL ColorJitter img/s | "
          "affine jitter img/s | affine / tensor |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        x = r["images_per_s"]
        print(f"| {r['size']} | {r['images']} | {x['decode-only']:.0f} | {x['tensor-colorjitter']:.0f} | {x['pil-colorjitter']:.0f} | "
              f"{x['affine-jitter']:.0f} | {r['affine_over_tensor']:.2f}x |")
    if args.json:
        from mmfl.atomic import atomic_write_text

        doc = {"rows": rows, "threads": 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "load_avg_1m": os.getloadavg()[0]},
               "command": "python bench/augment.py --sizes " + args.sizes}
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
