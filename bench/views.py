#!/usr/bin/env python
"""Generated consumer views: what one costs to render, and what it costs a training image, one thread.

Catalogue-only training (``data.views``) renders each consumer-side image in the data workers
instead of reading a pre-rendered file. Per protocol and canvas size, CPU time in one process and
one thread (as a data worker runs), on the same photos:

* ``render``: :func:`mmfl.data.consumer_views.render_view` alone (the view and its JPEG bytes);
* ``pre-rendered``: what a worker does for a pre-rendered view: decode the JPEG file, crop to the
  garment box, the training transform (``mmfl.data.transforms.train_transform``);
* ``generated``: the same for a generated view: open the shop photo, render, decode, crop, transform
  (:class:`mmfl.data.generated_views.ViewMaker`, as the training Dataset calls it);
* ``ratio``: generated / pre-rendered time per image.

Photos: clothing-small's training photos when found (``--src``, ``$MMFL_SHARED``, ``../shared``),
else generated shop photos. Prints a table and writes a JSON with ``--json``. The end-to-end
training rate of both loaders is a row of ``bench/realphoto.py`` (``mmfl`` vs ``mmfl-onthefly``).

    python bench/views.py --json docs/results/views_bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from mmfl.data.consumer_views import PROTOCOLS, open_view_source, render_view, view_rng  # noqa: E402
from mmfl.data.generated_views import ViewMaker, ViewPlan  # noqa: E402
from mmfl.data.images import load_crop  # noqa: E402
from mmfl.data.realphoto import find_clothing_small  # noqa: E402
from mmfl.data.records import Record  # noqa: E402
from mmfl.data.transforms import train_transform  # noqa: E402


def photo_paths(src: str | None, count: int, work: Path) -> tuple[list[str], str]:
    """``count`` photos: clothing-small's first training photos, else generated shop photos."""
    found = find_clothing_small(src)
    if found is not None:
        paths = sorted(str(p) for p in (found / "train").rglob("*.jpg"))[:count]
        return paths, f"clothing-small ({found})"
    from mmfl.synth import generate

    generate(work / "synth", items=count, seed=0, size=256)
    paths = sorted(str(p) for p in (work / "synth").rglob("shop_*.jpg"))[:count]
    return paths, "generated shop photos (clothing-small not found)"


def per_image_ms(fn: Callable[[int], object], n: int, repeats: int) -> float:
    """Median over ``repeats`` passes of the mean CPU time of ``fn(i)`` for i < n, in ms.

    CPU time of this one-thread process, not wall time: on a shared machine it is what the work
    costs, whatever else runs (the end-to-end training rate is wall time, in bench/realphoto.py).
    """
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(n):
            fn(i)
        times.append((time.process_time() - t0) / n * 1000)
    return statistics.median(times)


def measure(paths: list[str], protocol: str, size: int, input_size: int, repeats: int, work: Path) -> dict:
    photos = [open_view_source(p, size) for p in paths]
    transform = train_transform(input_size)
    # The pre-rendered views: the very bytes the benchmark writes (same renderer, same streams).
    rendered = [render_view(photo, view_rng("bench", i), size, protocol) for i, photo in enumerate(photos)]
    files = []
    for i, view in enumerate(rendered):
        path = work / f"{protocol}-{size}-{i}.jpg"
        path.write_bytes(view.jpeg)
        files.append((str(path), view.box))
    plan = ViewPlan(protocol=protocol, per_item=1, mix=1.0, size=size, seed=0, held_out_seed=0, cache=work)
    maker = ViewMaker(plan)
    virtual = [Record(path=p, item_id=str(i), domain="consumer", split="train", view=1) for i, p in enumerate(paths)]

    render_ms = per_image_ms(lambda i: render_view(photos[i], view_rng("bench", i), size, protocol), len(paths), repeats)
    pre_ms = per_image_ms(lambda i: transform(load_crop(files[i][0], files[i][1])), len(paths), repeats)
    gen_ms = per_image_ms(lambda i: transform(maker.image(virtual[i])), len(paths), repeats)
    return {"protocol": protocol, "canvas": size, "input_size": input_size, "render_ms": round(render_ms, 2),
            "pre_rendered_ms": round(pre_ms, 2), "generated_ms": round(gen_ms, 2), "ratio": round(gen_ms / pre_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="clothing-small folder (default: $MMFL_SHARED or ../shared)")
    p.add_argument("--photos", type=int, default=40, help="photos per measurement (default 40)")
    p.add_argument("--canvases", default="192,256", help="canvas sizes in pixels (mmfl train's default at a 128 px input "
                                                          "is 192, the pre-rendered benchmark's 256)")
    p.add_argument("--input-size", type=int, default=128, help="model input size the training transform crops to")
    p.add_argument("--repeats", type=int, default=3, help="passes per measurement; the median is kept")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmfl-views-bench-") as tmp:
        work = Path(tmp)
        paths, source = photo_paths(args.src, args.photos, work)
        for protocol in PROTOCOLS:
            for size in (int(s) for s in args.canvases.split(",")):
                rows.append(measure(paths, protocol, size, args.input_size, args.repeats, work))
                print(f"measured {protocol} {size} px", file=sys.stderr, flush=True)
    print("| protocol | canvas | input | render (ms/view) | pre-rendered (ms/image) | generated (ms/image) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['canvas']} | {r['input_size']} | {r['render_ms']:.1f} | {r['pre_rendered_ms']:.1f} "
              f"| {r['generated_ms']:.1f} | {r['ratio']:.1f}x |")
    if args.json:
        report = {"rows": rows, "photos": len(paths), "source": source, "repeats": args.repeats,
                  "command": " ".join(["python bench/views.py", *(argv if argv is not None else sys.argv[1:])]),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                              "threads": 1, "load_average": os.getloadavg()}}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
