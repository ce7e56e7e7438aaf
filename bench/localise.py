#!/usr/bin/env python
"""Finding the garment (issue 16): how well MMFL-Net's box head finds it, what that buys retrieval,
and what it costs a query.

Two datasets whose consumer photos have known garment boxes:

* ``generated``: ``mmfl synth`` data (worn garments on cluttered scenes with a distracting wearer),
  test split: queries = consumer photos, gallery = shop photos (cropped to their boxes, as always);
* ``realphoto``: the ``clothing-small`` real photos (:mod:`mmfl.data.realphoto`, rendered into
  ``--work``, never into the repository), validation split: queries = the consumer-style views.

For each: a retrieval model (the ``mmfl`` preset, ImageNet MobileNetV2) trained with
``model.box_head=true``, so the box stage (features frozen) runs after it. Reported:

* the top box against the given box: mean IoU and share with IoU >= 0.5, beside a centred box
  of the training boxes' mean size;
* retrieval top-1 / mAP with the query as the whole photo, the predicted box (the search rule of
  :func:`mmfl.localise.choose_box`: below ``box.min_score`` the whole photo) and the given box, and
  the share of the whole-to-given top-1 gap the predicted box recovers;
* CPU query latency, p50 in one run, interleaved query by query, from the JPEG's bytes to the
  embedding (:func:`mmfl.index.search.embed_query`, the search path without the index look-up):
  embed the whole photo vs detect + choose + embed the box; one torch thread;
* generated data only: the box stage with the features frozen (default) vs fine-tuned by the box
  loss (``box.freeze_features=false``, backbone stages 2-3, levels 3-4, trained by it): IoU and
  the given-box top-1 it leaves;
* cheaper head designs on the same retrieval weights: ``model.box_level=3`` (stride 8) and
  ``box.size=64``.

    python bench/localise.py                 # about 30 minutes on 2 CPU cores shared with other jobs
    python bench/localise.py --smoke         # tiny sizes, a minute: checks the script runs

Writes ``docs/results/localise.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from mmfl.atomic import atomic_write_text  # noqa: E402
from mmfl.checkpoint import load_model  # noqa: E402
from mmfl.config import config_from_dict, load_config  # noqa: E402
from mmfl.data.box_dataset import box_images  # noqa: E402
from mmfl.data.formats import read_dataset  # noqa: E402
from mmfl.data.images import open_image  # noqa: E402
from mmfl.data.records import Catalog  # noqa: E402
from mmfl.extract import extract_features  # noqa: E402
from mmfl.localise import box_settings, choose_box, detect  # noqa: E402
from mmfl.metrics import retrieval_metrics  # noqa: E402
from mmfl.models.box_head import BoxHead  # noqa: E402
from mmfl.train import train  # noqa: E402
from mmfl.train.boxes import centred_baseline, evaluate_boxes, train_box_head  # noqa: E402

FULL = {"synth_items": 150, "synth_size": 128, "real_train": 150, "real_val": 80, "real_size": 256,
        "input_size": 192, "box_size": 96, "epochs": 3, "box_epochs": 8, "latency_queries": 40, "latency_rounds": 3}
SMOKE = {"synth_items": 24, "synth_size": 64, "real_train": 12, "real_val": 8, "real_size": 96,
         "input_size": 64, "box_size": 64, "epochs": 1, "box_epochs": 1, "latency_queries": 4, "latency_rounds": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/mmfl-localise", help="data and runs (default /tmp/mmfl-localise)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "localise.json"))
    parser.add_argument("--src", help="clothing-small folder (default: the shared folder beside the checkout)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def retrieval_overrides(s: dict[str, Any], root: Path, fmt: str, out: Path, seed: int) -> list[str]:
    """The retrieval run, box head on (the stage runs after it); a short CPU budget."""
    return [
        f"data.root={root}", f"data.format={fmt}", "data.num_workers=2", "model.backbone=mobilenet_v2",
        "model.pretrained=imagenet", "model.freeze_stages=3", f"input.size={s['input_size']}",
        f"train.epochs={s['epochs']}", "train.warmup_epochs=1", "train.batch_items=8", "train.images_per_item=4",
        "train.eval_every=0", "train.tensorboard=false", "train.device=cpu", "loss.attribute_weight=0",
        "model.box_head=true", f"box.size={s['box_size']}", f"box.epochs={s['box_epochs']}", "box.batch_size=16",
        "box.lr=3e-3", f"output_dir={out}", f"seed={seed}",
    ]


def trained(name: str, overrides: list[str], work: Path) -> Path:
    """Train (or reuse a finished run with the same overrides) and return its last checkpoint."""
    out = work / "runs" / name
    stamp = out / "bench-overrides.json"
    last = out / "checkpoints" / "last.pt"
    if last.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == overrides:
        _log(f"[{name}] reusing {last}")
        return last
    if out.exists():
        shutil.rmtree(out)
    _log(f"[{name}] training -> {out}")
    t0 = time.perf_counter()
    result = train(load_config("mmfl", overrides), progress=False)
    _log(f"[{name}] trained in {time.perf_counter() - t0:.0f} s")
    stamp.write_text(json.dumps(overrides))
    return result.last_checkpoint


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def localisation(model: Any, catalog: Catalog, split: str, train_split: str) -> dict[str, Any]:
    """Top-box IoU and retrieval top-1/mAP with whole / predicted / given query boxes on ``split``."""
    queries = [q for q in catalog.split(split, "consumer") if q.box is not None]
    gallery = catalog.split(split, "shop")
    min_score = box_settings(model)["min_score"]
    ious, predicted, fallbacks = [], [], 0
    for q in queries:
        image = open_image(q.path)
        found = detect(model, image, min_score=0.0)
        ious.append(_iou(found[0].box, q.box) if found else 0.0)
        box, _ = choose_box(found, image.size, min_score=min_score)
        fallbacks += box is None
        predicted.append(box)
    size = int(model.meta["config"]["input"]["size"])
    g = extract_features(model, gallery, size, progress=False).embeddings
    scores: dict[str, Any] = {}
    for name, boxes in (("whole", [None] * len(queries)), ("predicted", predicted),
                        ("given", [q.box for q in queries])):
        recs = [dataclasses.replace(q, box=b) for q, b in zip(queries, boxes)]
        emb = extract_features(model, recs, size, progress=False).embeddings
        m = retrieval_metrics(emb @ g.T, [q.item_id for q in queries], [r.item_id for r in gallery])
        scores[name] = {"top1": m["top1"], "top5": m["top5"], "mAP": m["mAP"]}
    gap = scores["given"]["top1"] - scores["whole"]["top1"]
    base = centred_baseline(box_images(catalog.split(train_split), catalog.category_names),
                            box_images(queries, catalog.category_names))
    return {
        "split": split, "queries": len(queries), "gallery": len(gallery),
        "mean_iou": sum(ious) / len(ious), "iou50": sum(v >= 0.5 for v in ious) / len(ious),
        "centred_baseline": {"mean_iou": base["mean_iou"], "iou50": base["iou50"]},
        "whole_photo_fallbacks": fallbacks, "min_score": min_score,
        "retrieval": scores,
        "gap_recovered": (scores["predicted"]["top1"] - scores["whole"]["top1"]) / gap if gap > 0 else None,
    }


def latency(model: Any, paths: list[str], rounds: int) -> dict[str, Any]:
    """p50 ms per query, whole photo vs detect + box, interleaved query by query (same run, same load)."""
    from mmfl.index.search import embed_query

    blobs = [Path(p).read_bytes() for p in paths]
    min_score = box_settings(model)["min_score"]

    def whole(blob: bytes) -> None:
        embed_query(model, open_image(blob))

    def boxed(blob: bytes) -> None:
        image = open_image(blob)
        box, _ = choose_box(detect(model, image), image.size, min_score=min_score)
        embed_query(model, image, box)

    times: dict[str, list[float]] = {"embed_only": [], "detect_and_embed": []}
    for blob in blobs[:3]:  # warm-up
        whole(blob)
        boxed(blob)
    for r in range(rounds):
        for i, blob in enumerate(blobs):
            order = (("embed_only", whole), ("detect_and_embed", boxed))
            for name, fn in (order if (i + r) % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn(blob)
                times[name].append((time.perf_counter() - t0) * 1000)
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"p50_ms": p50, "extra": p50["detect_and_embed"] / p50["embed_only"] - 1.0,
            "queries": len(blobs), "rounds": rounds, "torch_threads": torch.get_num_threads()}


def frozen_vs_finetuned(checkpoint: Path, catalog: Catalog, split: str) -> dict[str, Any]:
    """The box stage again on the same retrieval checkpoint with the features fine-tuned by the box loss."""
    rows: dict[str, Any] = {}
    for name, freeze in (("frozen", True), ("finetuned", False)):
        model = load_model(checkpoint)
        cfg = config_from_dict(model.meta["config"])
        cfg.box.freeze_features = freeze
        if not freeze:  # the retrieval run froze stages 1-3 (model.freeze_stages=3); the box loss may train 2-3
            model.backbone.freeze(1)
            cfg.model.freeze_stages = 1
            head = model.box_head  # a fresh head, as the frozen stage started from
            torch.manual_seed(cfg.seed)
            model.box_head = BoxHead(head.body[0].in_channels, head.num_categories, head.body[0].out_channels)
        if freeze:  # the checkpoint already holds the frozen stage's head
            stage = model.meta["box_metrics"]
        else:
            torch.manual_seed(cfg.seed)
            t0 = time.perf_counter()
            stage = train_box_head(model, catalog, cfg, torch.device("cpu"), progress=False)
            stage["seconds"] = time.perf_counter() - t0
        queries = [q for q in catalog.split(split, "consumer") if q.box is not None]
        boxes = evaluate_boxes(model, box_images(queries, catalog.category_names), cfg.box.size, torch.device("cpu"))
        gallery = catalog.split(split, "shop")
        size = cfg.input.size
        g = extract_features(model, gallery, size, progress=False).embeddings
        q = extract_features(model, queries, size, progress=False).embeddings
        m = retrieval_metrics(q @ g.T, [r.item_id for r in queries], [r.item_id for r in gallery])
        rows[name] = {"mean_iou": boxes["mean_iou"], "iou50": boxes["iou50"], "given_box_top1": m["top1"],
                      "given_box_mAP": m["mAP"], "stage_seconds": stage.get("seconds")}
    return rows


def table(results: dict[str, Any]) -> str:
    lines = [f"{'dataset':<17} {'IoU':>6} {'>=0.5':>6} {'centred':>8}   top-1 whole / predicted / given   "
             f"mAP whole / predicted / given   gap rec.  p50 ms embed / +detect (extra)"]
    for name, r in results["datasets"].items():
        s, lat = r["retrieval"], r["latency"]
        gap = "-" if r["gap_recovered"] is None else f"{r['gap_recovered']:.0%}"
        lines.append(
            f"{name:<17} {r['mean_iou']:6.3f} {r['iou50']:6.1%} {r['centred_baseline']['mean_iou']:8.3f}   "
            f"{s['whole']['top1']:.3f} / {s['predicted']['top1']:.3f} / {s['given']['top1']:.3f}           "
            f"{s['whole']['mAP']:.3f} / {s['predicted']['mAP']:.3f} / {s['given']['mAP']:.3f}          "
            f"{gap:>6}    {lat['p50_ms']['embed_only']:.1f} / {lat['p50_ms']['detect_and_embed']:.1f} "
            f"({lat['extra']:+.0%})")
    if "stage" in results:
        for name, row in results["stage"].items():
            lines.append(f"box stage {name}: IoU {row['mean_iou']:.3f}, >=0.5 {row['iou50']:.1%}, "
                         f"given-box top-1 {row['given_box_top1']:.3f}, mAP {row['given_box_mAP']:.3f}")
    return "\n".join(lines)


def with_box_variant(checkpoint: Path, catalog: Catalog, overrides: list[str]) -> Any:
    """The checkpoint's retrieval weights with a box head of another design (``overrides`` of the
    ``model.box_*`` / ``box.*`` keys), trained by the box stage (features frozen)."""
    from mmfl.config import apply_override, config_to_dict
    from mmfl.models import build_model

    base = load_model(checkpoint)
    cfg = config_from_dict(base.meta["config"])
    for item in overrides:
        apply_override(cfg, item)
    cfg.model.pretrained = "none"
    model = build_model(cfg, base.num_items, base.num_attributes, base.num_categories,
                        len(base.meta["box_category_names"]))
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in base.state_dict().items() if not k.startswith("box_head.")}, strict=False)
    assert not unexpected and all(k.startswith("box_head.") for k in missing), (missing, unexpected)
    model.meta = {**base.meta, "config": config_to_dict(cfg)}
    torch.manual_seed(cfg.seed)
    model.meta["box_metrics"] = train_box_head(model, catalog, cfg, torch.device("cpu"), progress=False)
    return model.eval()


def measured(model: Any, catalog: Catalog, split: str, s: dict[str, Any]) -> dict[str, Any]:
    """One table row: localisation, retrieval with each query box, latency, and what the stage logged."""
    row = localisation(model, catalog, split, "train")
    row["latency"] = latency(model, [q.path for q in catalog.split(split, "consumer")][: s["latency_queries"]],
                             s["latency_rounds"])
    row["box_stage"] = {k: v for k, v in model.meta["box_metrics"].items() if k != "losses"}
    row["box_design"] = {k: model.meta["config"]["model"][k] for k in ("box_level", "box_source", "box_width")}
    row["box_design"]["box_size"] = model.meta["config"]["box"]["size"]
    return row


def cached(work: Path, name: str, settings: dict[str, Any], compute: Any) -> Any:
    """``compute()``, or its stored result from an earlier run of the same settings (rows take minutes)."""
    path = work / f"result-{name}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["settings"] == settings:
            _log(f"[{name}] reusing {path}")
            return stored["result"]
    _log(f"[{name}] measuring")
    result = compute()
    atomic_write_text(path, json.dumps({"settings": settings, "result": result}) + "\n")
    _log(table({"datasets": {name: result}}) if "retrieval" in result else json.dumps(result))
    return result


#: Box designs measured besides the default (level 4 of the backbone at 96 px): the cheaper level 3
#: (stride 8), and level 4 on a 64 px photo.
VARIANTS = {"level3": ["model.box_level=3"], "size64": ["box.size=64"]}


def main(argv: list[str] | None = None) -> int:
    from mmfl.data.realphoto import build_realphoto, find_clothing_small
    from mmfl.synth import generate

    args = parse_args(argv)
    s = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)
    work = Path(args.work) / ("smoke" if args.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"datasets": {}}
    key = {**s, "seed": args.seed}

    sets: list[tuple[str, Catalog, Path, str]] = []
    synth_root = work / f"synth-n{s['synth_items']}-{s['synth_size']}px-s{args.seed}"
    if not (synth_root / "Eval").is_dir():
        generate(synth_root, items=s["synth_items"], seed=args.seed, size=s["synth_size"], workers=2)
    synth = read_dataset(synth_root, "deepfashion-c2s")
    sets.append(("generated", synth, trained(f"synth-s{args.seed}", retrieval_overrides(
        s, synth_root, "deepfashion-c2s", work / "runs" / f"synth-s{args.seed}", args.seed), work), "test"))
    src = find_clothing_small(args.src)
    if src is None:
        _log("clothing-small not found: the real-photo rows are skipped")
    else:
        real_root = work / f"realphoto-{s['real_size']}px-t{s['real_train']}-v{s['real_val']}-s{args.seed}"
        csv = real_root / "dataset.csv"
        if not csv.is_file():
            csv = build_realphoto(src, real_root, views=3, seed=args.seed, size=s["real_size"],
                                  max_items={"train": s["real_train"], "validation": s["real_val"]}, workers=2)
        real = read_dataset(csv, "csv")
        sets.append(("realphoto", real, trained(f"realphoto-s{args.seed}", retrieval_overrides(
            s, csv, "csv", work / "runs" / f"realphoto-s{args.seed}", args.seed), work), "val"))

    for name, catalog, ckpt, split in sets:
        results["datasets"][name] = cached(work, name, key,
                                           lambda: measured(load_model(ckpt), catalog, split, s))
        for variant, overrides in VARIANTS.items():
            results["datasets"][f"{name}/{variant}"] = cached(
                work, f"{name}-{variant}", key,
                lambda: measured(with_box_variant(ckpt, catalog, overrides), catalog, split, s))
    results["stage"] = cached(work, "stage", key, lambda: frozen_vs_finetuned(sets[0][2], synth, "test"))

    results.update({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/localise.py" + (" --smoke" if args.smoke else ""),
        "settings": s, "seed": args.seed, "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    })
    print(table(results))
    if not args.smoke:
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
        _log(f"wrote {args.out}")
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
