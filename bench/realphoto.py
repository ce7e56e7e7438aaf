#!/usr/bin/env python
"""Real-photo benchmark: does each part of MMFL-Net earn its place on real clothing photos?

Builds the ``clothing-small`` retrieval set (every photo one item; its clean photo is the shop
image, seeded consumer-style views are the queries; see :mod:`mmfl.data.realphoto`), then trains
and evaluates, from the same ImageNet MobileNetV2 weights and at the same budget:

* ``imagenet-only``: the pretrained backbone's global-average-pooled last stage, L2-normalised,
  no training at all (what the ImageNet features alone give);
* ``global``, ``mgn``, ``mmfl``: the three presets;
* loss ablations of ``mmfl``: ``id-only``, ``+batch-hard``, ``+improved``, ``+center``,
  ``+attributes`` (the 10 classes as a category target);
* on request (``--variants``), ``mmfl-fuse345`` (the ``mmfl`` preset until 2026-12-02, whose neck
  fused levels 3..5) and the design variants of it that decided the switch to levels 4..5;
* ``mmfl-onthefly``: the ``mmfl`` preset trained on the catalogue alone (``catalogue.csv``: the
  training photos, no consumer image), its consumer views generated in the data workers each
  epoch by the same renderer (:mod:`mmfl.data.generated_views`) on ``mmfl train``'s default
  canvas (twice the input, as the pre-rendered views), scored on the same queries;
  ``mmfl-onthefly-1.5x`` on a canvas 1.5x the input (cheaper, measured less accurate).

Training uses ``train/`` photos, evaluation the ``validation/`` photos: gallery = their clean
photos, queries = their views. ``--protocol hard`` renders harder views (non-rigid warp, partial
views, strong lighting, low resolution, motion blur, heavier occlusion;
:mod:`mmfl.data.consumer_views.hard`) for training and queries alike. ``--distractors N`` also scores
every run against a catalogue-sized gallery: the validation photos plus N shop photos of training
items the ``--items`` subset leaves out (never trained on; the build checks it). Every comparison
in ``COMPARISONS`` whose two sides share at least 2 seeds is reported as a paired t test over
those seeds (:mod:`mmfl.stats`). It measures instance retrieval on real photographs under
synthetic consumer-style changes, not the real consumer-to-shop gap. Variants whose resolved
config is identical (``mmfl`` and ``+center`` here: the CSV set has no attribute annotations)
are trained once and reported under both names (``same_as``). Every finished run stores its row
in its run folder and is reused when the benchmark is started again with the same settings.

    python bench/realphoto.py                    # CPU budget (about an hour on 2 cores)
    python bench/realphoto.py --device cuda      # full size on a GPU
    python bench/realphoto.py --smoke            # 20 items, 64 px, 1 epoch, 2 variants
    python bench/realphoto.py --protocol hard --seeds 0,1,2,3,4   # hard views, 2,000 distractors
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from mmfl.atomic import atomic_write_text  # noqa: E402
from mmfl.config import load_config  # noqa: E402
from mmfl.data.consumer_views import PROTOCOLS  # noqa: E402
from mmfl.data.realphoto import CATALOGUE_NAME, DISTRACTOR_SPLIT, build_realphoto, find_clothing_small  # noqa: E402
from mmfl.errors import MMFLError  # noqa: E402
from mmfl.stats import paired_t  # noqa: E402

#: configs/mmfl.yaml's branches with the local branch's source and width left open (design variants).
_MMFL_BRANCHES = (
    "[{{name: global, level: 5, source: backbone, partition: whole, pooling: gem, dim: 256}}, "
    "{{name: part2, level: 5, source: backbone, partition: 'stripes:2', pooling: max, dim: 256, with_whole: true}}, "
    "{{name: part3, level: 5, source: backbone, partition: 'stripes:3', pooling: max, dim: 256}}, "
    "{{name: local, level: 4, source: {local_source}, partition: 'grid:2x2', pooling: max, dim: {local_dim}}}]"
)
#: variant -> (preset, overrides); ``None`` preset = no training (pooled ImageNet features).
NO_AUX = ["loss.center_weight=0", "loss.attribute_weight=0"]
FUSE345 = ["model.fusion_levels=[3,4,5]"]
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "imagenet-only": (None, []),
    "global": ("global", []),
    "mgn": ("mgn", []),
    "mmfl": ("mmfl", []),
    "id-only": ("mmfl", ["loss.triplet=none", *NO_AUX]),
    "+batch-hard": ("mmfl", ["loss.triplet=batch_hard", *NO_AUX]),
    "+improved": ("mmfl", ["loss.triplet=improved", *NO_AUX]),
    "+center": ("mmfl", ["loss.triplet=improved", "loss.center_weight=5e-4", "loss.attribute_weight=0"]),
    "+attributes": ("mmfl", ["loss.triplet=improved", "loss.center_weight=5e-4", "model.category_head=true",
                             "loss.category_weight=1.0"]),
    # a speed option, not an ablation: the backbone's BN statistics and affine frozen at ImageNet's
    "mmfl+frozen-bn": ("mmfl", ["model.backbone_norm=frozen"]),
    # The ``mmfl`` preset until 2026-12-02 (the neck fused levels 3..5); the hard protocol's tables
    # before the switch call it ``mmfl``. Kept so the decision to fuse 4..5 can be re-run.
    "mmfl-fuse345": ("mmfl", FUSE345),
    "mmfl-fuse345+frozen-bn": ("mmfl", [*FUSE345, "model.backbone_norm=frozen"]),
    # Design variants of that preset (named before any run on the hard protocol, run because it
    # did not beat ``mgn`` there): neck width, fused levels, where the local branch reads, branch
    # width. Not in the default variant list. ``mmfl-fuse45`` won and is the ``mmfl`` preset now.
    "mmfl-neck128": ("mmfl", [*FUSE345, "model.neck_width=128"]),
    "mmfl-fuse45": ("mmfl", ["model.fusion_levels=[4,5]"]),
    # the local branch on the backbone's level 4 instead of the fused map: no branch reads the neck, so it goes
    "mmfl-local-bb": ("mmfl", [*FUSE345, "model.fusion=none",
                               "model.branches=" + _MMFL_BRANCHES.format(local_source="backbone", local_dim=128)]),
    "mmfl-local256": ("mmfl", [*FUSE345, "model.branches=" + _MMFL_BRANCHES.format(local_source="fused",
                                                                                   local_dim=256)]),
    # Catalogue-only training (issue 23): the training split is the bare photos (CATALOGUE_VARIANTS reads
    # catalogue.csv), its views generated on the fly; view_mix=1 because the validation rows are real views.
    "mmfl-onthefly": ("mmfl", ["data.view_mix=1"]),
    "mmfl-onthefly-1.5x": ("mmfl", ["data.view_mix=1"]),
}
#: Variants that train on ``catalogue.csv`` (views generated while training) instead of ``dataset.csv``,
#: with their canvas over the input size (None = what ``mmfl train`` picks: twice the input).
CATALOGUE_VARIANTS: dict[str, float | None] = {"mmfl-onthefly": None, "mmfl-onthefly-1.5x": 1.5}
DESIGN_VARIANTS = ("mmfl-fuse345", "mmfl-fuse345+frozen-bn", "mmfl-neck128", "mmfl-fuse45", "mmfl-local-bb",
                   "mmfl-local256")
#: The preset comparison; every other trained variant is a loss ablation or design variant of ``mmfl``.
PRESET_VARIANTS = ("global", "mgn", "mmfl")
METRICS = ("top1", "top5", "top10", "top20", "mAP")
#: Paired comparisons (a, b): is ``a`` better than ``b``? Reported when both share >= 2 seeds.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("mmfl", "mgn"), ("mmfl", "global"), ("mgn", "global"), ("mmfl+frozen-bn", "mmfl"),
    ("+batch-hard", "id-only"), ("+improved", "+batch-hard"), ("+center", "+improved"), ("+attributes", "+center"),
    *((v, "mmfl-fuse345") for v in DESIGN_VARIANTS if v != "mmfl-fuse345"), ("mmfl-fuse345", "mgn"),
    ("mmfl", "mmfl-fuse345"), ("mmfl-onthefly", "mmfl"), ("mmfl-onthefly-1.5x", "mmfl"),
    ("mmfl-onthefly", "mmfl-onthefly-1.5x"),
)
#: Metrics the paired comparisons test.
PAIRED_METRICS = ("top1", "mAP")

#: Budgets per device, stated in the results. CPU: sized for about an hour on an idle 2-core
#: machine. Measured there (contended, so rough): training costs ~0.08 CPU-s/image for global
#: and mgn and ~0.2 for mmfl-based variants at 128 px (its 256-wide fusion neck outweighs the
#: MobileNetV2 backbone), evaluation ~0.06 CPU-s/image over the 1,364 validation images, and
#: rendering ~0.11 CPU-s/item (once, then cached). 250 items x 2 epochs is ~1,900 training
#: images per run; 14 trained runs (7 distinct configs x 2 seeds) then take ~55-65 minutes.
#: The render size is twice the input (at most the photos' 384 px) so box crops are not upsampled.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"items": 250, "val_items": None, "size": 128, "epochs": 2, "freeze_stages": 2, "batch_items": 16,
            "images_per_item": 4, "warmup_epochs": 1, "num_workers": 1, "seeds": "0,1"},
    "cuda": {"items": None, "val_items": None, "size": 256, "epochs": 8, "freeze_stages": 0, "batch_items": 16,
             "images_per_item": 4, "warmup_epochs": 1, "num_workers": 12, "seeds": "0,1"},
    "smoke": {"items": 20, "val_items": 20, "size": 64, "epochs": 1, "freeze_stages": 2, "batch_items": 8,
              "images_per_item": 4, "warmup_epochs": 0, "num_workers": 0, "seeds": "0",
              "variants": "imagenet-only,global"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.rsplit("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="clothing-small folder (or a shared folder holding data/clothing-small); "
                                 "default $MMFL_SHARED/data/clothing-small, then ../shared beside the repo")
    p.add_argument("--work", default="/tmp/mmfl-realphoto", help="rendered data and runs go here (outside the repo)")
    p.add_argument("--items", type=int, help="training items (a seeded subset of the 3,068 train photos)")
    p.add_argument("--val-items", type=int, help="validation items (default: all 341)")
    p.add_argument("--size", type=int, help="input size in pixels")
    p.add_argument("--epochs", type=int)
    p.add_argument("--freeze-stages", type=int, help="backbone stages kept frozen")
    p.add_argument("--seeds", help="comma-separated training seeds")
    p.add_argument("--ablation-seeds", help="seeds of the loss ablations (id-only ... +attributes); default: --seeds")
    p.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} "
                                      f"(default: all but the design variants)")
    p.add_argument("--views", type=int, default=3, help="consumer views per item")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the rendered views and of the item subset")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="consumer views: standard or hard (mmfl.data.consumer_views)")
    p.add_argument("--distractors", type=int,
                   help="extra gallery shop photos of training items outside --items, reported beside the "
                        "plain gallery (default: 2000 with --protocol hard, else 0)")
    p.add_argument("--pretrained", default="imagenet", help="backbone weights: imagenet | none | file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny run: 20 items, 64 px, 1 epoch, 1 seed, 2 variants")
    p.add_argument("--json", help="results file (default docs/results/realphoto.json; "
                                  "--smoke: WORK/realphoto-smoke.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _seed_list(text: Any, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise MMFLError(f"{flag}: '{text}' is not a comma-separated list of integers") from None
    if not seeds:
        raise MMFLError(f"{flag}: give at least one seed")
    return seeds


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved budget: the device profile, then explicit flags."""
    prof = dict(PROFILES["smoke" if args.smoke else args.device])
    for key in ("items", "val_items", "size", "epochs", "freeze_stages", "seeds", "ablation_seeds", "variants"):
        if getattr(args, key) is not None:
            prof[key] = getattr(args, key)
    default_variants = ",".join(v for v in VARIANTS if v not in DESIGN_VARIANTS)
    variants = [v for v in str(prof.get("variants") or default_variants).split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise MMFLError(f"--variants: unknown variant '{unknown[0]}' (choose from {', '.join(VARIANTS)})")
    seeds = _seed_list(prof["seeds"], "--seeds")
    ablation_seeds = _seed_list(prof.get("ablation_seeds") or prof["seeds"], "--ablation-seeds")
    defaults = load_config("global").train
    distractors = args.distractors if args.distractors is not None else (2000 if args.protocol == "hard" else 0)
    if distractors < 0:
        raise MMFLError(f"--distractors: {distractors} must be 0 or more")
    gallery = "the clean photos of the same split"
    if distractors:
        gallery += f"; also with {distractors} distractor shop photos of training items outside the subset"
    return {
        **prof,
        "variants": variants,
        "seeds": seeds,
        "ablation_seeds": ablation_seeds,
        "device": args.device,
        "render_size": min(384, 2 * prof["size"]),
        "views": args.views,
        "data_seed": args.data_seed,
        "protocol": args.protocol,
        "distractors": distractors,
        "backbone": "mobilenet_v2",
        "pretrained": args.pretrained,
        "optimizer": f"{defaults.optimizer} lr {defaults.lr:g}, {defaults.schedule} schedule, "
                     f"weight decay {defaults.weight_decay:g}",
        "batch": "P items x K images (batch_items x images_per_item)",
        "evaluation": f"split val: queries = consumer views, gallery = {gallery}",
    }


def base_overrides(s: dict[str, Any], data_root: Path, out: Path, seed: int, variant: str = "") -> list[str]:
    """The budget's overrides; a catalogue variant reads ``catalogue.csv`` and generates views of the same
    protocol and count per item as the pre-rendered ones, on the canvas ``mmfl train`` picks by default."""
    root = data_root / CATALOGUE_NAME if variant in CATALOGUE_VARIANTS else data_root
    scale = CATALOGUE_VARIANTS.get(variant)
    return [
        "data.format=csv", f"data.root={root}", f"data.num_workers={s['num_workers']}",
        f"data.views={s['protocol']}", f"data.views_per_item={s['views']}",
        *([f"data.view_size={min(s['render_size'], round(scale * s['size']))}"] if scale else []),
        "model.backbone=mobilenet_v2", f"model.pretrained={s['pretrained']}",
        f"model.freeze_stages={s['freeze_stages']}", f"input.size={s['size']}",
        f"train.epochs={s['epochs']}", f"train.warmup_epochs={s['warmup_epochs']}",
        f"train.batch_items={s['batch_items']}", f"train.images_per_item={s['images_per_item']}",
        "train.eval_every=0", "train.tensorboard=false", f"train.device={s['device']}",
        f"output_dir={out}", f"seed={seed}",
    ]


def run_trained(variant: str, seed: int, s: dict[str, Any], data_root: Path, work: Path, catalog: Any,
                progress: bool) -> dict[str, Any]:
    """Train one variant with one seed and evaluate it on the validation split (reusing a finished run)."""
    from mmfl.checkpoint import load_model
    from mmfl.config import config_to_dict
    from mmfl.train import train

    preset, extra = VARIANTS[variant]
    out = work / _runs_dir(s) / f"{variant.lstrip('+')}-s{seed}"
    cfg = load_config(preset, base_overrides(s, data_root, out, seed, variant) + extra)
    resolved = config_to_dict(cfg)
    cached = _cached_row(out, resolved, s["distractors"])
    if cached is not None:
        _log(f"[{variant} seed {seed}] reusing the finished run in {out}")
        # the config check proved it trained exactly this variant, whatever name it was saved under
        return {**cached, "variant": variant, "overrides": extra}
    if out.exists():  # an unfinished earlier run: start clean rather than append to its logs
        shutil.rmtree(out)
    _log(f"[{variant} seed {seed}] training -> {out}")
    t0 = time.perf_counter()
    result = train(cfg, progress=progress)
    train_s = time.perf_counter() - t0
    model = load_model(result.last_checkpoint, device=s["device"])
    t1 = time.perf_counter()
    scores = evaluate(model, catalog, s, progress)
    epochs = [h for h in result.history if h.get("kind") == "epoch"]
    row = {
        "variant": variant, "seed": seed, **scores,
        "train_minutes": round(train_s / 60, 3), "eval_minutes": round((time.perf_counter() - t1) / 60, 3),
        "epochs": result.epochs_run, "embed_dim": int(model.embed_dim),
        "train_images_per_s": round(sum(h["images_per_s"] for h in epochs) / max(1, len(epochs)), 1),
        "final_loss": round(float(epochs[-1]["loss"]), 4) if epochs else None,
        "overrides": extra,
    }
    atomic_write_text(out / "result.json", json.dumps({"config": resolved, "distractors": s["distractors"], "row": row},
                                                      indent=1) + "\n")
    return row


def _runs_dir(s: dict[str, Any]) -> str:
    """Run folders per protocol, so a hard run never replaces a standard one of the same name."""
    return "runs" if s["protocol"] == "standard" else f"runs-{s['protocol']}"


def evaluate(model: Any, catalog: Any, s: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Scores on the validation gallery and, with distractors, also on the gallery they widen.

    The top-level scores are always the plain gallery's (comparable with the runs without
    distractors); ``distractors`` holds the catalogue-sized gallery's. Both come from one
    embedding pass: the plain ranking re-ranks the same query and gallery features.
    """
    from mmfl.evaluate import run_evaluation

    if not s["distractors"]:
        return _scores(run_evaluation(model, catalog, split="val", size=s["size"], device=s["device"],
                                      num_workers=s["num_workers"], progress=progress).metrics)
    wide = run_evaluation(model, catalog, split="val", gallery_splits=["val", DISTRACTOR_SPLIT], size=s["size"],
                          device=s["device"], num_workers=s["num_workers"], progress=progress)
    return {**_scores(_plain_metrics(wide)), "distractors": _scores(wide.metrics)}


def _plain_metrics(wide: Any) -> dict[str, Any]:
    """The metrics of ``wide`` (an Evaluation) with the distractor shop images left out of the gallery."""
    import numpy as np

    from mmfl.metrics import KS, rank_queries, summarize as summarize_ranks

    keep = [i for i, r in enumerate(wide.gallery) if r.split != DISTRACTOR_SPLIT]
    gallery = wide.gallery_features.embeddings[keep]
    ranks = rank_queries(wide.query_features.embeddings @ gallery.T, [r.item_id for r in wide.queries],
                         [wide.gallery[i].item_id for i in keep])
    metrics = summarize_ranks(ranks, KS)
    cats = np.array([r.category or "" for r in wide.queries])
    if "per_category" in wide.metrics:
        metrics["per_category"] = {c: summarize_ranks(ranks, KS, mask=cats == c) for c in wide.metrics["per_category"]}
    return metrics


def run_imagenet_only(s: dict[str, Any], data_root: Path, work: Path, catalog: Any,
                      progress: bool) -> dict[str, Any]:
    """Pooled last-stage ImageNet features: the floor every trained variant must beat.

    Deterministic, so its row is stored like a trained run's and reused by a later invocation
    on the same data (a resumed or growing benchmark would otherwise re-embed every image).
    """
    import torch
    import torch.nn.functional as F

    from mmfl.config import config_to_dict
    from mmfl.models import build_model

    # last_stride=2: the backbone exactly as ImageNet trained it.
    cfg = load_config("global", [f"model.pretrained={s['pretrained']}", "model.backbone=mobilenet_v2",
                                 "model.last_stride=2", f"input.size={s['size']}", f"data.root={data_root}"])
    out = work / _runs_dir(s) / "imagenet-only"
    resolved = config_to_dict(cfg)
    cached = _cached_row(out, resolved, s["distractors"])
    if cached is not None:
        _log(f"[imagenet-only] reusing the finished evaluation in {out}")
        return cached
    net = build_model(cfg, num_items=1, num_attributes=0)

    class PooledBackbone(torch.nn.Module):
        """Normalise like MMFL-Net, run the backbone, average-pool level 5, L2-normalise."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.embed_dim = net.backbone.channels[5]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            level5 = self.net.backbone((x - self.net.mean) / self.net.std)[5]
            return F.normalize(level5.mean(dim=(2, 3)), dim=1)

    model = PooledBackbone().to(s["device"]).eval()
    t0 = time.perf_counter()
    scores = evaluate(model, catalog, s, progress)
    row = {"variant": "imagenet-only", "seed": None, **scores, "train_minutes": 0.0,
           "eval_minutes": round((time.perf_counter() - t0) / 60, 3), "epochs": 0, "embed_dim": model.embed_dim,
           "overrides": []}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "result.json", json.dumps({"config": resolved, "distractors": s["distractors"],
                                                       "row": row}, indent=1) + "\n")
    return row


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = {k: round(float(metrics[k]), 4) for k in (*METRICS, "top50")}
    keep.update(num_queries=int(metrics["num_queries"]), num_gallery=int(metrics["num_gallery"]))
    if "per_category" in metrics:
        keep["per_category_top1"] = {c: round(float(m["top1"]), 4) for c, m in metrics["per_category"].items()}
    return keep


def _cached_row(out: Path, resolved: dict[str, Any], distractors: int) -> dict[str, Any] | None:
    """A finished run's row, if it was trained with ``resolved`` and scored with ``distractors``."""
    path = out / "result.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _trains_as(saved.get("config") or {}) != _trains_as(resolved) or saved.get("distractors", 0) != distractors:
        return None
    return saved["row"]


def _trains_as(config: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's result: its config without the output folder (the run's own folder, named
    after the variant) and without settings that are inert in it (fusion levels and neck width with no
    neck, box-head settings with no box head), so a run saved before such a key existed or changed its
    default is still reused."""
    kept = copy.deepcopy(config)
    kept.pop("output_dir", None)
    model = kept.get("model", {})
    if model.get("fusion", "none") == "none":
        model.pop("fusion_levels", None)
        model.pop("neck_width", None)
    if not model.get("box_head", False):
        for key in [k for k in model if k.startswith("box_")]:
            del model[key]
        kept.pop("box", None)
    return kept


def summarize(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: mean, sample sd and spread (half the max-min range) over seeds of each metric.

    With distractors, ``distractors`` holds the same for the catalogue-sized gallery.
    """
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": len(mine), **_stats_of(mine, (*METRICS, "train_minutes"))}
        if all("distractors" in r for r in mine):
            entry["distractors"] = {"num_gallery": mine[0]["distractors"]["num_gallery"],
                                    **_stats_of([r["distractors"] for r in mine], METRICS)}
        out[v] = entry
    return out


def _stats_of(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows]
        mean = sum(vals) / len(vals)
        sd = (sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        out[k] = {"mean": round(mean, 4), "sd": round(sd, 4), "spread": round((max(vals) - min(vals)) / 2, 4)}
    return out


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired t tests of every ``COMPARISONS`` pair over the seeds both sides ran (at least 2).

    Differences are in percentage points; ``gallery`` is ``plain`` (validation photos) or
    ``distractors`` (the catalogue-sized gallery). A pair whose two variants trained the very
    same configuration (``same_as``) is skipped: their difference is zero by construction.
    """
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["seed"] is not None:
            by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    out = []
    for a, b in COMPARISONS:
        ra, rb = by_variant.get(a, {}), by_variant.get(b, {})
        seeds = sorted(set(ra) & set(rb))
        if len(seeds) < 2 or any(ra[x].get("same_as") == b or rb[x].get("same_as") == a for x in seeds):
            continue
        galleries = ["plain"] + (["distractors"] if all("distractors" in ra[x] and "distractors" in rb[x]
                                                         for x in seeds) else [])
        for gallery in galleries:
            for metric in PAIRED_METRICS:
                def value(r: dict[str, Any]) -> float:
                    return 100 * float((r if gallery == "plain" else r["distractors"])[metric])

                result = paired_t([value(ra[x]) for x in seeds], [value(rb[x]) for x in seeds])
                out.append({"a": a, "b": b, "gallery": gallery, "metric": metric, "seeds": seeds,
                            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.to_dict().items()}})
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: percentages, mean ± sd over seeds (and the distractor gallery's top-1 / mAP)."""
    wide = any("distractors" in e for e in summary.values())
    head = "| variant | seeds | top-1 | top-5 | top-10 | top-20 | mAP |"
    if wide:
        n = next(e["distractors"]["num_gallery"] for e in summary.values() if "distractors" in e)
        head += f" top-1, {n} gallery | mAP, {n} gallery |"
    head += " train min |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, e in summary.items():
        cells = [_cell(e[k]) for k in METRICS]
        if wide:
            cells += [_cell(e["distractors"][k]) if "distractors" in e else "" for k in ("top1", "mAP")]
        lines.append(f"| {v} | {e['seeds']} | " + " | ".join(cells) + f" | {e['train_minutes']['mean']:.1f} |")
    return "\n".join(lines)


def _cell(stat: dict[str, float]) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['sd']:.1f}"


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """A Markdown table of the paired tests; p < 0.05 in bold, the rest marked 'n.s.'."""
    lines = ["| a vs b | gallery | metric | n | mean diff (pts) | sd | wins | t | p | |", "|" + "---|" * 10]
    for c in comparisons:
        mark = "**p < 0.05**" if c["significant"] else "n.s."
        p = f"**{c['p']:.3g}**" if c["significant"] else f"{c['p']:.3g}"
        lines.append(f"| {c['a']} vs {c['b']} | {c['gallery']} | {c['metric']} | {c['n']} | {c['mean_diff']:+.2f} "
                     f"| {c['sd_diff']:.2f} | {c['wins']}/{c['n']} | {c['t']:.2f} | {p} | {mark} |")
    return "\n".join(lines)


def catalogue_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Catalogue-only training against its references: top-1 as a multiple of ``imagenet-only``'s, and
    the training rate of each loader (mean of the seeds' epoch rates; on-the-fly over pre-rendered)."""
    def mean(variant: str, key: str, gallery: str = "plain") -> float | None:
        scored = [r if gallery == "plain" else r.get("distractors") for r in rows if r["variant"] == variant]
        vals = [float(s[key]) for s in scored if s and s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Any] = {}
    base = {g: mean("imagenet-only", "top1", g) for g in ("plain", "distractors")}
    for variant in (*CATALOGUE_VARIANTS, "mmfl"):
        top1 = {g: mean(variant, "top1", g) for g in ("plain", "distractors")}
        out[variant] = {
            "top1": top1, "train_images_per_s": mean(variant, "train_images_per_s"),
            "top1_over_imagenet_only": {g: round(top1[g] / base[g], 2) for g in top1
                                        if top1[g] is not None and base[g]},
        }
    pre = out["mmfl"]["train_images_per_s"]
    for variant in CATALOGUE_VARIANTS:
        fly = out[variant]["train_images_per_s"]
        if pre and fly:
            out[variant]["train_rate_over_prerendered"] = round(fly / pre, 3)
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        s = settings_from(args)
    except MMFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    src = find_clothing_small(args.src)
    if src is None:
        if args.src:
            print(f"error: {args.src}: no clothing-small photos there (need train/ and validation/)", file=sys.stderr)
            return 2
        print("skipped: clothing-small not found (give --src DIR or set MMFL_SHARED)", file=sys.stderr)
        return 0
    work = Path(args.work).resolve()
    if work == REPO or REPO in work.parents:
        print(f"error: --work {work} is inside the repository; rendered photos must stay outside it", file=sys.stderr)
        return 2
    json_path = Path(args.json) if args.json else (work / "realphoto-smoke.json" if args.smoke
                                                   else REPO / "docs" / "results" / "realphoto.json")
    try:
        return _run(args, s, src, work, json_path)
    except MMFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, s: dict[str, Any], src: Path, work: Path, json_path: Path) -> int:
    import torch

    from mmfl.data.formats import read_dataset

    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise MMFLError("--device cuda: no CUDA device is available")
    progress = not args.quiet
    tag = (f"data-{s['render_size']}px-n{s['items'] or 'all'}-{s['val_items'] or 'all'}"
           f"-v{s['views']}-s{s['data_seed']}")
    if s["protocol"] != "standard":
        tag += f"-{s['protocol']}"
    if s["distractors"]:
        tag += f"-d{s['distractors']}"
    t0 = time.perf_counter()
    caps = {"train": s["items"], "validation": s["val_items"]}
    csv_path = build_realphoto(src, work / tag, views=s["views"], seed=s["data_seed"], size=s["render_size"],
                               max_items=caps, workers=max(1, min(8, os.cpu_count() or 1)),
                               protocol=s["protocol"], distractors=s["distractors"])
    data_root = csv_path.parent
    catalog = read_dataset(data_root, "csv")
    _log(f"data: {data_root} ({time.perf_counter() - t0:.0f} s)\n{catalog.summary()}")

    rows: list[dict[str, Any]] = []
    done: dict[str, str] = {}  # resolved training config (minus paths) -> first variant trained with it
    started = time.perf_counter()
    for variant in s["variants"]:
        if VARIANTS[variant][0] is None:
            rows.append(run_imagenet_only(s, data_root, work, catalog, progress))
        else:
            key = json.dumps(_effective(s, variant, data_root, bool(catalog.attribute_names)), sort_keys=True)
            if key in done:
                rows += [{**r, "variant": variant, "same_as": done[key], "overrides": VARIANTS[variant][1]}
                         for r in rows if r["variant"] == done[key]]
            else:
                done[key] = variant
                seeds = s["seeds"] if variant in PRESET_VARIANTS else s["ablation_seeds"]
                rows += [run_trained(variant, seed, s, data_root, work, catalog, progress) for seed in seeds]
        summary = summarize(rows, s["variants"])
        comparisons = compare(rows)
        _write(json_path, rows, s, summary, comparisons, args, time.perf_counter() - started)
    print(table(summary))
    if comparisons:
        print()
        print(comparison_table(comparisons))
    print(f"wrote {json_path}")
    return 0


def _effective(s: dict[str, Any], variant: str, data_root: Path, has_attributes: bool) -> dict[str, Any]:
    """The config a variant trains with, minus seed, output folder and inert switches (to spot duplicates):
    :func:`_trains_as`, plus a category head without weight and, on data without attribute labels, the
    attribute head counted as absent."""
    from mmfl.config import config_to_dict

    preset, extra = VARIANTS[variant]
    cfg = _trains_as(config_to_dict(load_config(preset, base_overrides(s, data_root, Path("runs"), 0, variant) + extra)))
    if not cfg["model"]["category_head"] or cfg["loss"]["category_weight"] == 0:
        cfg["model"]["category_head"], cfg["loss"]["category_weight"] = False, 0.0
    if not has_attributes:  # no attribute annotations: the attribute head and loss are never built
        cfg["model"]["attribute_head"], cfg["loss"]["attribute_weight"] = False, 0.0
    return cfg


def _write(path: Path, rows: list[dict[str, Any]], s: dict[str, Any], summary: dict[str, Any],
           comparisons: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "rows": rows,
        "summary": summary,
        "comparisons": comparisons,
        **({"catalogue_only": catalogue_summary(rows)} if any(r["variant"] in CATALOGUE_VARIANTS for r in rows) else {}),
        "settings": {**s, "command": " ".join(["python bench/realphoto.py", *args.argv]),
                     "spread": "half the max-min range over seeds; sd: sample standard deviation over seeds",
                     "comparisons": "paired t test over shared seeds of a - b, in percentage points, two-sided p; "
                                    "significant = p < 0.05",
                     "total_minutes": round(seconds / 60, 1)},
        "machine": machine(s["device"]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "measures": f"instance retrieval on real photos (clothing-small validation split) with synthetic "
                    f"consumer-style views ({s['protocol']} protocol) as queries and the clean photos as gallery"
                    + (f" (also with {s['distractors']} distractor shop photos)" if s["distractors"] else "")
                    + "; not the real consumer-to-shop gap",
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
