"""``mmfl demo``: the main job end to end on generated data, sized for a laptop CPU.

synth -> train (plus an untrained baseline; then the garment box stage) -> eval with plots ->
FAISS index -> one consumer photo searched with its given box and with none (the predicted box)
-> ``report.html``. Every stage goes through the same functions the other subcommands use,
so the demo is also a smoke test of the whole product.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mmfl.commands.common import add_progress_arg


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--items", type=int, default=300, help="generated items (default: 300)")
    p.add_argument("--size", type=int, default=112, help="image size in pixels (default: 112)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    p.add_argument("--box-epochs", type=int, default=4,
                   help="epochs of the garment box stage after training, so a search needs no box (default: 4; 0 = no box head)")
    p.add_argument("--preset", default="mmfl", help="model preset (default: mmfl)")
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone (default: mobilenet_v2)")
    p.add_argument("--pretrained", default="imagenet", help="imagenet | none | PATH (default: imagenet)")
    p.add_argument("--seed", type=int, default=0)
    add_progress_arg(p)
    p.add_argument("--workers", type=int, default=2, help="worker processes for generation and data loading (default: 2; 0 = load in the main process)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    timings: dict[str, float] = {}

    def stage(name: str) -> None:
        timings[name] = time.perf_counter()
        print(f"\n== {name} ==", flush=True)

    def done(name: str) -> None:
        timings[name] = time.perf_counter() - timings[name]
        print(f"({name}: {timings[name]:.0f} s)", flush=True)

    from mmfl.synth import generate

    stage("synth")
    data = out / "data"
    summary = generate(data, items=args.items, seed=args.seed, size=args.size, workers=max(1, args.workers))
    print(f"{summary['items']} items, {summary['shop_images']} shop + {summary['consumer_images']} consumer images -> {data}")
    done("synth")

    import torch

    from mmfl.checkpoint import load_model
    from mmfl.config import load_config
    from mmfl.data.formats import read_dataset
    from mmfl.train import train

    torch.manual_seed(args.seed)
    common = [
        f"data.root={data}", f"model.backbone={args.backbone}", f"model.pretrained={args.pretrained}",
        f"input.size={args.size}", f"data.num_workers={args.workers}", f"seed={args.seed}",
        "train.batch_items=8", "train.images_per_item=4", "train.warmup_epochs=1", "train.lr=5e-4",
        # CPU budget: the first two backbone stages stay at their ImageNet weights, a narrower neck.
        "model.freeze_stages=2", "model.neck_width=128",
    ]
    stage("train")
    baseline_cfg = load_config(args.preset, [*common, f"output_dir={out / 'baseline'}", "train.epochs=0"])
    baseline = train(baseline_cfg, progress=False)
    boxes = ["model.box_head=true", f"box.epochs={args.box_epochs}"] if args.box_epochs > 0 else []
    cfg = load_config(args.preset, [*common, f"output_dir={out / 'run'}", f"train.epochs={args.epochs}", *boxes])
    result = train(cfg, progress=not args.no_progress)  # it logs each epoch's loss and speed itself
    done("train")

    stage("eval")
    from mmfl.commands.evaluate import write_plots
    from mmfl.evaluate import run_evaluation

    catalog = read_dataset(data, "deepfashion-c2s")
    checkpoint = result.best_checkpoint or result.last_checkpoint
    metrics: dict[str, dict[str, Any]] = {}
    for name, path in ((f"untrained heads ({args.pretrained} backbone)", baseline.last_checkpoint), (f"{args.preset} trained", checkpoint)):
        ev = run_evaluation(load_model(path), catalog, split="test", progress=False)
        metrics[name] = ev.metrics
    plots = write_plots(ev, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for name, m in metrics.items():
        print(f"{name:<36} top1 {100 * m['top1']:5.1f}  top5 {100 * m['top5']:5.1f}  "
              f"top20 {100 * m['top20']:5.1f}  mAP {100 * m['mAP']:5.1f}  ({m['num_queries']} queries, {m['num_gallery']} gallery)")
    done("eval")

    stage("index + search")
    from mmfl.catalog import Catalog
    from mmfl.index.build import build_index

    report = build_index(load_model(checkpoint), catalog.split("test", "shop"), out / "index", progress=False,
                         catalog=catalog)
    print(f"indexed {report.manifest['count']} shop images -> {out / 'index'}")
    query = catalog.split("test", "consumer")[0]
    print(f"query {Path(query.path).relative_to(data.resolve())} (item {query.item_id}):")
    with Catalog.open(out / "index") as shop:
        # the dataset's box, then no box: the box head's garment (or the whole photo without a head)
        for answer in (shop.search(query.path, k=5, box=query.box), shop.search(query.path, k=5)):
            asked = answer["query"]
            box = "whole photo" if asked["bbox"] is None else "box " + ",".join(map(str, asked["bbox"]))
            print(f" {box} [{asked['box_source']}: {asked['box_reason']}]")
            for rank, hit in enumerate(answer["results"], 1):
                mark = "  <- same item" if hit["item_id"] == query.item_id else ""
                print(f"  {rank}. {hit['item_id']}  score {hit['score']:.3f}  {hit['category']}{mark}")
    done("index + search")

    from mmfl.report import write_report

    notes = [
        f"data: {summary['items']} generated items at {args.size} px (seed {args.seed}); test split = "
        f"consumer queries vs shop gallery",
        f"model: {args.preset} preset, {args.backbone} backbone ({args.pretrained} weights), {args.epochs} epochs"
        + (f", box head ({args.box_epochs} box epochs)" if args.box_epochs > 0 else ""),
        "stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        f"index: {out / 'index'} (mmfl search {out / 'index'} IMAGE; mmfl serve {out / 'index'})",
    ]
    page = write_report(out / "report.html", "mmfl demo", metrics,
                        {"CMC curve (test split)": plots[0], "Ranked results (green = same item)": plots[1]}, notes)
    print(f"\nreport: {page}")
    print(f"total: {sum(timings.values()):.0f} s", file=sys.stderr)
    return 0
