"""``mmfl eval``: score a checkpoint with the consumer-to-shop protocol; table, JSON and plots."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args, get_type_hints

from mmfl.commands.common import add_extraction_args, add_progress_arg, add_skip_args
from mmfl.config import DataConfig

FORMATS = list(get_args(get_type_hints(DataConfig)["format"]))
VIEW_PROTOCOLS = list(get_args(get_type_hints(DataConfig)["views"]))
#: Skip reasons printed before "... and N more" (all of them go to the JSON).
SHOWN_SKIPS = 5
#: Above this many categories the CMC plot shows the overall curve only (a legible legend).
MAX_CMC_CURVES = 12


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description="Evaluate a checkpoint: queries = consumer images of --split, gallery = shop images of "
                    "--gallery-splits; top-k is the hit rate (any image of the item in the first k), mAP is over "
                    "the full ranking.",
    )
    p.add_argument("checkpoint", help="checkpoint file (.pt) written by mmfl train")
    p.add_argument("--data", required=True, help="dataset root folder (or CSV file for --format csv)")
    p.add_argument("--format", choices=FORMATS, help="dataset format (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", help="query split (default: test)")
    p.add_argument("--gallery-splits", help="comma-separated gallery splits (default: the query split)")
    p.add_argument("--flip", action="store_true", help="flip test-time augmentation")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (memory ~ (queries+gallery)^2)")
    p.add_argument("--within-category", action="store_true",
                   help="search each query's own category only (the Street2Shop protocol)")
    p.add_argument("--views", choices=VIEW_PROTOCOLS,
                   help="a query split without consumer photos (a catalogue) is scored on generated views of its shop "
                        "photos, rendered once and cached (default: the checkpoint's data.views; none: refuse)")
    add_skip_args(p)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--plots", metavar="DIR", help="write cmc.png and ranked.png to DIR")
    add_extraction_args(p)
    add_progress_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfl.checkpoint import load_model
    from mmfl.commands.common import decode_device_for
    from mmfl.devices import resolve_device
    from mmfl.data.formats import read_dataset
    from mmfl.evaluate import run_evaluation

    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    fmt = args.format or model.meta["config"]["data"]["format"]
    catalog, generated = with_query_views(read_dataset(args.data, fmt, skip_bad=args.skip_bad, check_images=None),
                                          model.meta, args.split, args.views, args.workers)
    gallery_splits = [s for s in (args.gallery_splits or "").split(",") if s] or None
    ev = run_evaluation(
        model, catalog, split=args.split, gallery_splits=gallery_splits,
        size=int(model.meta["config"]["input"]["size"]), batch_size=args.batch_size, device=device,
        flip=args.flip, rerank=args.rerank, num_workers=args.workers, progress=not args.no_progress,
        within_category=args.within_category, decode_device=decode_device_for(args.decode, device),
    )
    result = {
        **ev.metrics,
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": model.meta["checkpoint_sha256"],
        "data": str(args.data),
        "format": fmt,
        "generated_queries": generated,
        "num_skipped": len(catalog.skipped),
        "skipped": list(catalog.skipped),
    }
    print(format_report(result))
    if catalog.skipped:
        print(format_skips(catalog.skipped), file=sys.stderr)
    if args.json:
        _write_json(result, Path(args.json))
        print(f"results: {args.json}")
    if args.plots:
        for path in write_plots(ev, Path(args.plots)):
            print(f"plot: {path}")
    return 0


def with_query_views(catalog: Any, meta: dict, split: str, views: str | None, workers: int) -> tuple[Any, dict | None]:
    """The catalogue with generated views as the queries of ``split`` when it has no consumer photo, and
    what they are (None when the data's own photos are the queries).

    The views are the checkpoint's kind (``data.views``, size, count and ``data.view_seed``), or
    ``views``; rendered once into the cache, so every evaluation of the folder scores the same queries.
    """
    from mmfl.config import config_from_dict
    from mmfl.data.consumer_views import RENDER_VERSIONS
    from mmfl.data.generated_views import plan_views, with_held_out_views

    cfg = config_from_dict(meta["config"])
    if views is not None:
        cfg.data.views = views
    plan = plan_views(cfg, catalog, for_training=False)
    with_views = catalog if plan is None else with_held_out_views(catalog, [split], plan, workers)
    if len(with_views.records) == len(catalog.records):  # the split has its own queries (or none to view)
        return catalog, None
    return with_views, {
        "protocol": plan.protocol, "render_version": RENDER_VERSIONS[plan.protocol], "per_item": plan.per_item,
        "size": plan.size, "seed": plan.held_out_seed}


def format_report(result: dict) -> str:
    """A header naming the protocol, then one table row for all queries and one per category."""
    extras = [name.replace("_", " ") for name in ("flip", "rerank", "within_category") if result.get(name)]
    ks = _ks(result)
    generated = result.get("generated_queries")
    queries = (f"{generated['per_item']} generated {generated['protocol']} views per item (seed {generated['seed']})"
               if generated else "consumer images")
    lines = [
        f"queries: {queries} of '{result['split']}'; gallery: shop images of "
        f"'{','.join(result['gallery_splits'])}'" + (f"; with {' + '.join(extras)}" if extras else ""),
        f"{result['num_queries']} queries with a match, {result['num_queries_without_match']} without "
        f"(not scored), {result['num_gallery']} gallery images",
        "",
        f"{'':<16}" + "".join(f"{'top' + str(k):>8}" for k in ks) + f"{'mAP':>8}{'queries':>9}",
        _row("all", result),
    ]
    for name, cat in result.get("per_category", {}).items():
        lines.append(_row(name, cat))
    lines.append("(top-k = % of queries with an image of their item in the first k; mAP in %)")
    if result.get("attributes"):
        lines += ["", *format_attributes(result["attributes"])]
    return "\n".join(lines)


def format_attributes(attrs: dict) -> list[str]:
    """The attribute block: mAP and mean F1 of the model against the predict-the-prior baseline."""
    def pct(value: float | None) -> str:
        return f"{100 * value:9.2f}" if value is not None else f"{'-':>9}"

    t = attrs["thresholds"]
    source = (f"thresholds chosen on '{t['split']}'" if t["source"] == "calibrated"
              else "no stored thresholds: 0.5 for every attribute")
    groups = f"; one value per group of {', '.join(attrs['exclusive_groups'])}" if attrs["exclusive_groups"] else ""
    # (row label, key in attrs["mAP"] or None when it equals the model's, key in attrs["mean_f1"])
    rows = (("model", "model", "model"), ("model, 0.5 no groups", None, "model_at_0.5"),
            ("prior (train rates)", "prior", "prior"))
    return [
        f"attributes: {attrs['num_images']} images of '{attrs['split']}', {attrs['num_scored']} of "
        f"{attrs['num_attributes']} attributes with a known positive and negative",
        f"({source}{groups})",
        f"{'':<22}{'mAP':>9}{'mean F1':>9}",
        *(f"{name:<22}" + (pct(attrs["mAP"][ap]) if ap else f"{'':>9}") + pct(attrs["mean_f1"][f1])
          for name, ap, f1 in rows),
        "(AP and F1 per attribute over its known labels, averaged over attributes; in %)",
        f"images with two values of one group: {attrs['images_with_conflicting_values']['model']} "
        f"(at 0.5 without groups: {attrs['images_with_conflicting_values']['model_at_0.5']})",
    ]


def _row(name: str, m: dict) -> str:
    def pct(value: float | None) -> str:
        return f"{100 * value:8.2f}" if value is not None else f"{'-':>8}"

    return f"{name[:16]:<16}" + "".join(pct(m[f"top{k}"]) for k in _ks(m)) + pct(m["mAP"]) + f"{m['num_queries']:>9}"


def _ks(metrics: dict) -> list[int]:
    """The k values present in a result (``top1``, ``top5``, ...), in order."""
    return sorted(int(key[3:]) for key in metrics if key.startswith("top") and key[3:].isdigit())


def format_skips(skipped: list[str]) -> str:
    shown = "\n".join(f"  {reason}" for reason in skipped[:SHOWN_SKIPS])
    more = f"\n  ... and {len(skipped) - SHOWN_SKIPS} more (all listed in the JSON)" if len(skipped) > SHOWN_SKIPS else ""
    return f"skipped {len(skipped)} records:\n{shown}{more}"


def write_plots(ev, folder: Path) -> list[Path]:
    """cmc.png (all queries, and each category when few) and ranked.png (sample queries with their top 10)."""
    from mmfl.plots import plot_cmc, plot_ranked_grid

    curves = ev.cmc_curves(max_rank=max(_ks(ev.metrics)))
    if len(curves) > MAX_CMC_CURVES + 1:
        curves = {"all": curves["all"]}
    cmc_path = plot_cmc(curves, folder / "cmc.png")
    rows = ev.sample_queries(8)
    ranked, hits = ev.top_ranked(rows, top=10)
    grid_path = plot_ranked_grid([ev.queries[r] for r in rows], ev.gallery, ranked, hits, folder / "ranked.png")
    return [cmc_path, grid_path]


def _write_json(result: dict, path: Path) -> None:
    """Atomic, so an interrupted run never leaves half a JSON."""
    from mmfl.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
