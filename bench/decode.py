"""JPEG decode + resize to a tensor: PIL in full, PIL at a reduced JPEG scale (our path), torchvision.io.

What one DataLoader worker or one search request spends turning a JPEG into the model's input,
in one process and one thread:

* ``pil-full``: ``mmfl.data.images.open_image`` (every pixel decoded), then the eval resize;
* ``pil-reduced``: ``open_crop(min_size=size)``, what training, indexing and search now do: the
  decoder's DCT scaling (1/2, 1/4, 1/8) skips the resolution the resize would throw away;
* ``torchvision.io``: libjpeg-turbo through ``decode_jpeg``, full size, then the same resize.

PIL stays the only decoder because it also handles EXIF orientation, CMYK, 16-bit and palette
images and refuses decompression bombs (``docs/RELIABILITY.md``). ``--generate N`` writes N
photo-like JPEGs of ``--photo-size`` (default: a 12-megapixel phone photo) instead of ``--images``.

    python bench/decode.py --images 'demo-out/data/img/**/*.jpg' --size 112
    python bench/decode.py --generate 40 --size 256
"""
from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from mmfl.data.images import open_crop, open_image
from mmfl.data.transforms import eval_transform


def bench(fn: Callable[[str], torch.Tensor], paths: list[str], repeats: int) -> float:
    """Best images/s over ``repeats`` passes."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = max(best, len(paths) / (time.perf_counter() - t0))
    return best


def generate_photos(folder: Path, count: int, width: int, height: int) -> list[str]:
    """Photo-like JPEGs: smooth colour fields and a few sharp-edged shapes, different per file, quality 90."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    paths = []
    for i in range(count):
        f = rng.uniform(2, 9, 3)
        rgb = np.stack([0.5 + 0.4 * np.sin(f[0] * x + i), 0.5 + 0.4 * np.cos(f[1] * y),
                        0.5 + 0.3 * np.sin(f[2] * (x + y))], -1)
        for _ in range(6):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.6), rng.uniform(0.03, 0.15)
            rgb[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray((rgb * 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", help="glob of JPEG files (quoted)")
    ap.add_argument("--generate", type=int, default=0, help="write this many photo-like JPEGs instead")
    ap.add_argument("--photo-size", default="4032x3024", help="WxH of the generated photos")
    ap.add_argument("--size", type=int, default=112, help="the model's input size")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if bool(args.images) == bool(args.generate):
        ap.error("give one of --images and --generate")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.generate:
            width, height = (int(v) for v in args.photo_size.lower().split("x"))
            paths = generate_photos(Path(tmp), args.generate, width, height)
        else:
            paths = sorted(glob.glob(args.images, recursive=True))[: args.limit]
        if not paths:
            raise SystemExit(f"no files match {args.images}")
        return measure(paths, args.size, args.repeats)


def measure(paths: list[str], size: int, repeats: int) -> dict:
    to_tensor = eval_transform(size)

    def pil_full(p: str) -> torch.Tensor:
        return to_tensor(open_image(p))

    def pil_reduced(p: str) -> torch.Tensor:
        return to_tensor(open_crop(p, None, min_size=size)[0])

    def tv(p: str) -> torch.Tensor:
        img = decode_jpeg(read_file(p), mode=ImageReadMode.RGB)
        return TF.to_dtype(TF.resize(img, [size, size], antialias=True), torch.float32, scale=True)

    sample = paths[:20]
    diffs = {"pil-reduced": max(float((pil_reduced(p) - pil_full(p)).abs().mean()) for p in sample),
             "torchvision.io": max(float((tv(p) - pil_full(p)).abs().mean()) for p in sample)}
    rates = {name: bench(fn, paths, repeats) for name, fn in
             (("pil-full", pil_full), ("pil-reduced", pil_reduced), ("torchvision.io", tv))}
    with Image.open(paths[0]) as first:
        shape = f"{first.width}x{first.height}"
    print(f"{len(paths)} JPEGs ({shape} first), model input {size} px, 1 thread")
    print(f"  {'decoder':<15} {'img/s':>8} {'vs pil-full':>12} {'max mean |diff| vs pil-full':>28}")
    for name, rate in rates.items():
        diff = f"{diffs[name]:.4f}" if name in diffs else "-"
        print(f"  {name:<15} {rate:8.1f} {rate / rates['pil-full']:11.2f}x {diff:>28}")
    report = {"images": len(paths), "first_shape": shape, "size": size, "images_per_s": rates,
              "mean_abs_diff_vs_full": diffs}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
