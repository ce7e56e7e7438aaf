"""JPEG decode + resize to a tensor: PIL (our path, ``mmfl.data.images``) vs ``torchvision.io``.

The trainer decodes in DataLoader workers; this measures, in one process and one thread, whether
torchvision.io's libjpeg-turbo path would be faster than PIL for our images. PIL stays the
default because it also handles EXIF orientation, CMYK, 16-bit and palette images and refuses
decompression bombs (``docs/RELIABILITY.md``); torchvision.io would only be worth a fast path
for plain RGB JPEGs if it wins clearly.

    python bench/decode.py --images 'demo-out/data/img/**/*.jpg' --size 112
"""
from __future__ import annotations

import argparse
import glob
import json
import time

import torch
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from mmfl.data.images import open_image
from mmfl.data.transforms import eval_transform


def bench(fn, paths: list[str], repeats: int) -> float:
    """Best images/s over ``repeats`` passes."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            fn(p)
        best = max(best, len(paths) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="glob of JPEG files (quoted)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = sorted(glob.glob(args.images, recursive=True))[: args.limit]
    if not paths:
        raise SystemExit(f"no files match {args.images}")
    to_tensor = eval_transform(args.size)

    def pil(p: str) -> torch.Tensor:
        return to_tensor(open_image(p))

    def tv(p: str) -> torch.Tensor:
        img = decode_jpeg(read_file(p), mode=ImageReadMode.RGB)
        return TF.to_dtype(TF.resize(img, [args.size, args.size], antialias=True), torch.float32, scale=True)

    diff = max(float((pil(p) - tv(p)).abs().mean()) for p in paths[:20])
    rates = {"pil": bench(pil, paths, args.repeats), "torchvision.io": bench(tv, paths, args.repeats)}
    print(f"{len(paths)} images, {args.size} px, 1 thread")
    for name, rate in rates.items():
        print(f"  {name:<15} {rate:8.0f} img/s")
    print(f"  ratio torchvision.io / pil: {rates['torchvision.io'] / rates['pil']:.2f}x; "
          f"mean |difference| {diff:.4f} (different JPEG decoders and resize kernels)")
    print(json.dumps({"images": len(paths), "size": args.size, **rates}))


if __name__ == "__main__":
    main()
