"""Cost growth with dataset size: train epoch time and memory, index build time, size and memory, query time.

For each dataset size (generated items) it runs what a user runs, each command in its own
process so that its peak resident memory is its own: ``mmfl train`` for one epoch (the demo's
CPU settings: ``mmfl`` preset, MobileNetV2, 112 px, P x K = 8 x 4), ``mmfl index`` over the shop
images of the train split, then a warm :class:`mmfl.index.search.Searcher` answering consumer
photos (decode + embed + search; p50 of ``--queries``). Gallery growth far beyond a generated
dataset (10k to 1M vectors) is ``bench/search.py``'s job. Prints a table, writes a JSON with
``--json``; ``--quick`` is the toy run the tests use.

    python bench/growth.py --items 150,300,600 --json docs/results/growth.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: Runs ``mmfl.cli.main`` and reports its peak resident memory (KiB on Linux) as the last stderr line.
_MEASURED = """
import json, resource, sys
from mmfl.cli import main
code = main(sys.argv[1:])
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"peak_rss_kib": peak}), file=sys.stderr)
sys.exit(code)
"""


def run_measured(argv: list[str]) -> dict[str, float]:
    """Wall seconds and peak resident MiB of one ``mmfl`` command in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mmfl {' '.join(argv[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    peak = json.loads(proc.stderr.strip().splitlines()[-1])["peak_rss_kib"]
    return {"seconds": seconds, "peak_rss_mib": peak / 1024}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def train_overrides(root: Path, out: Path, size: int, backbone: str, workers: int) -> list[str]:
    return [f"data.root={root}", f"output_dir={out}", f"model.backbone={backbone}", "model.pretrained=none",
            f"input.size={size}", f"data.num_workers={workers}", "train.batch_items=8", "train.images_per_item=4",
            "train.epochs=1", "train.warmup_epochs=0", "train.eval_every=0", "train.tensorboard=false",
            "model.freeze_stages=2", "model.neck_width=128"]


def query_p50_ms(index_dir: Path, queries: list[Any], k: int) -> float:
    """Median decode + embed + search time of consumer photos against the index, warm process."""
    from mmfl.index.search import Searcher

    searcher = Searcher(index_dir)
    try:
        searcher.search_photo(queries[0].path, k=k, bbox=queries[0].box)  # warm-up
        times = []
        for record in queries:
            t0 = time.perf_counter()
            searcher.search_photo(record.path, k=k, bbox=record.box)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        searcher.close()
    return statistics.median(times)


def measure_size(items: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mmfl.data.formats import read_dataset
    from mmfl.synth import generate

    root, run = work / f"data{items}", work / f"run{items}"
    t0 = time.perf_counter()
    generate(root, items, seed=0, size=args.size, workers=args.workers)
    synth_s = time.perf_counter() - t0
    catalog = read_dataset(root, "deepfashion-c2s")
    train_images = len(catalog.split("train", "consumer")) + len(catalog.split("train", "shop"))
    train = run_measured(["train", "--config", "mmfl", "--no-progress",
                          *train_overrides(root, run, args.size, args.backbone, args.workers)])
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = next(row for row in history if row["kind"] == "epoch")
    checkpoint = run / "checkpoints" / "last.pt"
    index_dir = work / f"index{items}"
    index = run_measured(["index", str(checkpoint), "--data", str(root), "--format", "deepfashion-c2s",
                          "--split", "train", "--out", str(index_dir), "--workers", str(args.workers), "--no-progress"])
    gallery = json.loads((index_dir / "manifest.json").read_text())["count"]
    queries = catalog.split("test", "consumer")[: args.queries]
    epoch_images = epoch["step"] * 32  # one epoch = one P x K batch per 8 items
    return {
        "items": items, "train_images": train_images, "synth_s": synth_s,
        "train_process_s": train["seconds"], "train_peak_rss_mib": train["peak_rss_mib"],
        "epoch_images": epoch_images, "train_epoch_s": epoch_images / epoch["images_per_s"],
        "gallery": gallery, "index_build_s": index["seconds"], "index_peak_rss_mib": index["peak_rss_mib"],
        "index_bytes": folder_bytes(index_dir), "checkpoint_bytes": checkpoint.stat().st_size,
        "query_p50_ms": query_p50_ms(index_dir, queries, k=20), "queries": len(queries),
    }


GROWTH_KEYS = ("epoch_images", "train_epoch_s", "train_process_s", "train_peak_rss_mib", "gallery", "index_build_s",
               "index_peak_rss_mib", "index_bytes", "query_p50_ms")
#: cost = fixed + per_unit * size, least squares over the measured sizes: (cost, size it grows with).
FITS = (("train_epoch_s", "epoch_images"), ("train_process_s", "epoch_images"), ("index_build_s", "gallery"),
        ("index_bytes", "gallery"), ("query_p50_ms", "gallery"))


def growth_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Largest over smallest for each cost and for the sizes it depends on."""
    first, last = rows[0], rows[-1]
    return {key: last[key] / first[key] for key in GROWTH_KEYS if first[key]}


def linear_fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``cost = fixed + per_unit * size`` through the measured points (two or more sizes)."""
    fits = {}
    for cost, size in FITS:
        xs, ys = [float(r[size]) for r in rows], [float(r[cost]) for r in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if len(rows) < 2 or sxx == 0:
            continue
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        fits[cost] = {"per": size, "fixed": my - slope * mx, "per_unit": slope}
    return fits


def print_table(rows: list[dict[str, Any]], growth: dict[str, float], fits: dict[str, dict[str, float]]) -> None:
    head = ("items", "epoch imgs", "epoch s", "train process s", "train MiB", "gallery", "index s", "index MiB",
            "index KiB", "query p50 ms")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([str(r["items"]), str(r["epoch_images"]), f"{r['train_epoch_s']:.1f}",
                          f"{r['train_process_s']:.1f}", f"{r['train_peak_rss_mib']:.0f}", str(r["gallery"]),
                          f"{r['index_build_s']:.1f}", f"{r['index_peak_rss_mib']:.0f}",
                          f"{r['index_bytes'] / 1024:.0f}", f"{r['query_p50_ms']:.1f}"]))
    print("growth, largest / smallest: " + ", ".join(f"{k} x{v:.2f}" for k, v in growth.items()))
    for cost, f in fits.items():
        print(f"fit: {cost} = {f['fixed']:.4g} + {f['per_unit']:.4g} per {f['per']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default="150,300,600", help="generated dataset sizes, comma list (default 150,300,600)")
    ap.add_argument("--size", type=int, default=112, help="image size (default 112, as make demo)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="toy sizes (tests): items 12,24, 64 px, resnet18")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.size, args.backbone, args.queries = "12,24", 64, "resnet18", 3
    sizes = sorted(int(x) for x in args.items.split(","))
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmfl-growth-") as tmp:
        for items in sizes:
            rows.append(measure_size(items, Path(tmp), args))
            print(f"[growth] {items} items done", flush=True)
    growth, fits = growth_rows(rows), linear_fits(rows)
    print_table(rows, growth, fits)
    if args.json:
        from mmfl.atomic import atomic_write_text

        report = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": "python bench/growth.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "load_before": load, "load_after": os.getloadavg()[0]},
                  "settings": {"size": args.size, "backbone": args.backbone, "workers": args.workers,
                               "preset": "mmfl", "batch": "8 x 4", "queries": args.queries},
                  "rows": rows, "growth_largest_over_smallest": growth, "linear_fits": fits}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
