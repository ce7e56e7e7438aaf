"""The training loop: P x K batches, multi-task losses, AMP, DDP, atomic checkpoints, exact resume.

One function, :func:`train`, runs a whole job from a :class:`~mmfl.config.Config`. Resume
happens at epoch boundaries: ``last.pt`` holds everything that determines the next epoch
(weights, both optimizers, scheduler, sampler, RNG states), and per-epoch data-loader seeds
are derived from ``seed + epoch``, so a resumed run repeats the uninterrupted one exactly in
deterministic CPU mode.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmfl.atomic import atomic_write_text
from mmfl.checkpoint import atomic_save, model_payload, read_checkpoint
from mmfl.config import Config, config_from_dict, config_to_dict, dump_config
from mmfl.data.dataset import EncodedRecordDataset, RecordDataset
from mmfl.data.formats import read_dataset, skips_bad
from mmfl.data.generated_views import (
    ViewMaker, ViewPlan, check_view_sources, plan_views, training_records, with_held_out_views,
)
from mmfl.data.gpu_decode import DeviceBatches, TrainAugment, collate_encoded, pick_decode_device
from mmfl.data.records import Catalog, Record
from mmfl.data.sampler import PKSampler
from mmfl.data.transforms import train_source_size, train_transform
from mmfl.errors import MMFLError
from mmfl.progress import progress as make_progress
from mmfl.train.distributed import DistInfo, barrier, init_distributed, shutdown
from mmfl.train.schedule import lr_multiplier
from mmfl.train.step import Batch, TrainStep


#: Differences a refused ``--resume`` lists before "and N more".
RESUME_DIFFS_SHOWN = 6


class TrainingError(MMFLError):
    """Training cannot go on (non-finite loss, nothing to resume from, ...)."""


@dataclass
class TrainResult:
    output_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainData:
    """Everything the loop needs from the dataset, derived once."""

    catalog: Catalog
    records: list[Record]
    labels: dict[str, int]
    attributes: torch.Tensor  # (num_items, A) int8 in {1,-1,0}
    record_categories: torch.Tensor  # (N,) long, -1 unknown
    record_domains: torch.Tensor  # (N,) long, 0 = consumer, 1 = shop
    views: ViewPlan | None = None  # generated consumer views (None: the data's own photos only)

    @property
    def num_items(self) -> int:
        return len(self.labels)


def prepare_data(cfg: Config) -> TrainData:
    """Read the dataset and index the training split (labels in first-seen item order), with the virtual
    records of generated consumer views where the data has no consumer photos (:func:`plan_views`)."""
    if not cfg.data.root:
        raise TrainingError("data.root is not set (give data.root=DIR)")
    # Skipping bad images decodes every one up front: a truncated JPEG is then a counted skip, not a
    # crash hours into the run (its header alone reads fine).
    skip_bad = skips_bad(cfg.data.skip_bad, cfg.data.format)
    catalog = read_dataset(cfg.data.root, cfg.data.format, skip_bad=skip_bad, check_images=None)
    records = catalog.split(cfg.data.train_split)
    if not records:
        raise TrainingError(f"{cfg.data.root}: no records in split '{cfg.data.train_split}'")
    plan = plan_views(cfg, catalog)
    if plan is not None:
        records, too_small = check_view_sources(training_records(records, plan), skip_bad)
        catalog.skipped.extend(too_small)
    items = catalog.items(records)
    if len(items) < 2:
        raise TrainingError(f"{cfg.data.root}: split '{cfg.data.train_split}' has {len(items)} item(s); telling "
                            "products apart needs at least 2")
    labels = {item: i for i, item in enumerate(items)}
    attributes = torch.from_numpy(catalog.attribute_matrix(items))
    cat_index = {name: i for i, name in enumerate(catalog.category_names)}
    record_categories = torch.tensor([cat_index.get(r.category or "", -1) for r in records], dtype=torch.long)
    record_domains = torch.tensor([int(r.domain == "shop") for r in records], dtype=torch.long)
    return TrainData(catalog, records, labels, attributes, record_categories, record_domains, plan)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run a training job as configured; returns where its checkpoints are."""
    info, device = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, progress, info, device)
    finally:
        shutdown(info)


def _train(cfg: Config, resume: bool, progress: bool, info: DistInfo, device: torch.device) -> TrainResult:
    from mmfl.losses import build_criterion, terms_to_floats
    from mmfl.models import build_model

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    _seed_everything(cfg.seed, cfg.train.deterministic)

    data = prepare_data(cfg)
    if cfg.model.box_head and data.views is None:  # generated views bring their boxes
        from mmfl.train.boxes import check_box_data

        check_box_data(data.catalog, cfg)
    meta = {
        "config": config_to_dict(cfg),
        "num_items": data.num_items,
        "num_attributes": len(data.catalog.attribute_names),
        "num_categories": _num_categories(cfg, data),
        "attribute_names": list(data.catalog.attribute_names),
        "category_names": list(data.catalog.category_names),
        "attribute_groups": dict(data.catalog.attribute_groups),
        # one per category channel of the box head (empty: boxes without a category, or no head)
        "box_category_names": list(data.catalog.category_names) if cfg.model.box_head else [],
    }
    # Every refusal comes before the first write: a --resume that does not fit, or ImageNet weights
    # that cannot be had offline, must leave the output folder exactly as it was.
    ckpt = _resumable_checkpoint(last_path, cfg, meta) if resume else None
    cuda_graph = cfg.train.cuda_graph and device.type == "cuda"
    if cuda_graph and info.enabled:
        raise TrainingError(f"train.cuda_graph: runs in one process, not with {info.world_size} (DDP's "
                            "all-reduce is not captured); set train.cuda_graph=false")
    # A resumed model gets its weights from the checkpoint: no pretrained file is needed (or read).
    build_cfg = cfg if ckpt is None else replace(cfg, model=replace(cfg.model, pretrained="none"))
    model = build_model(build_cfg, data.num_items, meta["num_attributes"], meta["num_categories"],
                        len(meta["box_category_names"]))
    if model.box_head is not None:  # trained by the box stage after retrieval (mmfl.train.boxes), not here
        model.box_head.requires_grad_(False)
    criterion = build_criterion(cfg, data.num_items, cfg.model.branches[0].dim)
    model.to(device)
    criterion.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)

    sampler = PKSampler(
        [r.item_id for r in data.records], [r.domain for r in data.records],
        cfg.train.batch_items, cfg.train.images_per_item, seed=cfg.seed,
        rank=info.rank, world_size=info.world_size,
    )
    steps_per_epoch = len(sampler)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)

    if info.is_main:  # the first write
        _remove_torn_saves(ckpt_dir)
        dump_config(cfg, out / "config.yaml")
        for reason in data.catalog.skipped:
            _log(f"skipped: {reason}")
        _log(f"data: {cfg.data.root} ({cfg.data.format})\n" + data.catalog.summary())
        if data.views is not None:
            data.catalog = with_held_out_views(data.catalog, [cfg.data.val_split], data.views, cfg.data.num_workers)
            _log(_views_summary(data, cfg.data.val_split))
        if ckpt is None and cfg.model.pretrained in ("", "none"):
            _log("warning: model.pretrained=none: the backbone starts from random weights, so retrieval stays "
                 "poor unless trained long; model.pretrained=imagenet (the default) starts from ImageNet")

    optimizer = build_optimizer(cfg, model, device)
    center_params = criterion.center_parameters()
    center_opt = torch.optim.SGD(center_params, lr=cfg.loss.center_lr) if center_params else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_multiplier(cfg.train.schedule, steps_per_epoch, cfg.train.epochs, cfg.train.warmup_epochs,
                      cfg.train.step_milestones, cfg.train.step_gamma),
    )

    start_epoch, best, history = 0, [-1.0, -1.0], []  # best (val top-20, val mAP)
    if ckpt is not None:
        state = ckpt["train_state"]
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # step the way this run was built (a GPU graph run resumed on CPU)
            group.update({k: optimizer.defaults[k] for k in ("fused", "capturable") if k in optimizer.defaults})
        if center_opt is not None:
            center_opt.load_state_dict(state["center_optimizer"])
            criterion.load_state_dict(state["criterion"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        start_epoch, best, history = state["epoch"], list(state["best"]), state["history"]
        if info.is_main:
            _log(f"resuming from {last_path} at epoch {start_epoch + 1}/{cfg.train.epochs}")

    train_model: torch.nn.Module = model
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False,
        )
    train_step = TrainStep(
        model, criterion, optimizer, center_opt, device=device, amp=cfg.train.amp, grad_clip=cfg.train.grad_clip,
        forward_module=train_model, compile_mode=cfg.train.compile_mode if cfg.train.compile else None,
        dist_info=info, cuda_graph=cuda_graph,
    )

    if info.is_main:
        # A run killed after logging an epoch but before saving last.pt would log that epoch twice;
        # the checkpoint's history is the truth, so the log restarts from it.
        _rewrite_jsonl(out / "metrics.jsonl", history)
    writer = _tensorboard(cfg, out) if info.is_main else None
    decode_device = pick_decode_device(cfg.data.decode, device)
    dataset = train_dataset(cfg, data, decode_device)
    global_step = start_epoch * steps_per_epoch

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {
            **model_payload(model, meta),
            "train_state": {
                "epoch": epoch,
                "best": best,
                "history": history,
                "optimizer": optimizer.state_dict(),
                "center_optimizer": center_opt.state_dict() if center_opt is not None else None,
                "criterion": criterion.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": _get_rng_state(),
            },
        }

    if cfg.train.epochs == 0 and info.is_main:
        atomic_save(checkpoint_state(0), last_path)
        _log(f"train.epochs=0: wrote the untrained checkpoint {last_path}")

    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        loader = train_batches(cfg, dataset, sampler, device, epoch, decode_device)
        train_model.train()
        sums: dict[str, float] = {}
        seen, t0 = 0, time.perf_counter()
        bar = make_progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}", progress and info.is_main,
                            leave=False, unit="step")
        pending: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, its loss terms, not yet read)

        def account(step: int, terms_on_device: dict[str, torch.Tensor]) -> None:
            """Read one step's loss terms (a host sync), stop on a non-finite loss, log them."""
            terms = terms_to_floats(terms_on_device)
            step_no = epoch * steps_per_epoch + step + 1
            if not math.isfinite(terms["total"]):
                raise TrainingError(
                    f"non-finite loss ({terms['total']}) at epoch {epoch + 1} step {step + 1} "
                    f"(global step {step_no}); {last_path} keeps the last good state"
                )
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            lr = optimizer.param_groups[0]["lr"]
            if bar is not None:
                rate = seen * info.world_size / max(1e-9, time.perf_counter() - t0)
                bar.update(1, loss=f"{terms['total']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            if writer is not None:
                for k, v in terms.items():
                    writer.add_scalar("train/loss" if k == "total" else f"train/{k}", v, step_no)
                writer.add_scalar("train/lr", lr, step_no)

        for step, (images, labels, index) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            # Look-ups on the host (labels and indices arrive there), then one copy each.
            attrs = data.attributes[labels] if data.attributes.shape[1] else None
            cats = data.record_categories[index] if meta["num_categories"] else None
            batch = Batch(images, labels, data.record_domains[index], attrs, cats).to(device, cfg.train.channels_last)
            terms_now = train_step(batch)
            scheduler.step()
            global_step += 1
            seen += images.shape[0]
            # This step's kernels are queued; reading the previous step's loss now costs no GPU idle time.
            if pending is not None:
                account(*pending)
            pending = (step, terms_now)
        if pending is not None:
            account(*pending)
        if bar is not None:
            bar.close()
        if train_step.graph is not None and epoch == start_epoch and info.is_main:
            graph = train_step.graph
            _log("train.cuda_graph: " + ("the step is captured and replayed as one CUDA graph" if graph.captured else
                                         f"not captured ({graph.failed or 'fewer steps than the warm-up'}); "
                                         "the step ran eagerly"))
        steps_done = max(1, min(steps_per_epoch, len(sampler)))
        row: dict[str, Any] = {
            "kind": "epoch", "epoch": epoch + 1, "step": global_step,
            **{f"loss_{k}" if k != "total" else "loss": v / steps_done for k, v in sums.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen * info.world_size / max(1e-9, time.perf_counter() - t0),
        }
        history.append(row)
        if info.is_main:
            _append_jsonl(out / "metrics.jsonl", row)
            _log(f"epoch {epoch + 1}: loss {row.get('loss', math.nan):.3f} ({row['images_per_s']:.0f} img/s)")
        if info.is_main and cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0:
            val = validate(model, data.catalog, cfg, device, decode_device, progress)
            if val is not None:
                model.train()
                val_row = {"kind": "eval", "epoch": epoch + 1, "split": cfg.data.val_split, **val}
                history.append(val_row)
                _append_jsonl(out / "metrics.jsonl", val_row)
                if writer is not None:
                    for k in ("top1", "top20", "mAP"):
                        writer.add_scalar(f"val/{k}", val[k], global_step)
                _log(f"epoch {epoch + 1}: val top1 {val['top1']:.3f} top20 {val['top20']:.3f} mAP {val['mAP']:.3f}")
                # top-20 saturates on small sets, so mAP breaks ties between epochs.
                if [val["top20"], val["mAP"]] > best:
                    best = [val["top20"], val["mAP"]]
                    atomic_save(model_payload(model, meta), best_path)
        if info.is_main:
            atomic_save(checkpoint_state(epoch + 1), last_path)
        barrier(info)
    if info.is_main:
        _store_attribute_thresholds(model, data.catalog, cfg, device, [last_path, best_path])
        if model.box_head is not None:
            from mmfl.train.boxes import run_box_stage

            box_catalog = data.catalog if data.views is None else with_held_out_views(
                data.catalog, [cfg.data.train_split], data.views, cfg.data.num_workers)
            run_box_stage(model, box_catalog, cfg, device, [last_path, best_path], progress)
    barrier(info)
    if writer is not None:
        writer.close()
    return TrainResult(out, last_path, best_path if best_path.exists() else None,
                       cfg.train.epochs - start_epoch, history)


def _store_attribute_thresholds(model: torch.nn.Module, catalog: Catalog, cfg: Config, device: torch.device,
                                paths: list[Path]) -> None:
    """Write per-attribute thresholds, chosen on the val split with each checkpoint's own weights, into it.

    Index, search and serve decide attributes with them; a checkpoint without them falls back to
    0.5 (and the index manifest says so). The checkpoint is rewritten as read plus these fields, so
    its training state, and a resume from it, are untouched; a resume redoes this harmlessly.
    """
    from mmfl.attribute_metrics import calibrate_thresholds

    for path in (p for p in paths if p.is_file()):
        ckpt = read_checkpoint(path, map_location="cpu")
        model.load_state_dict(ckpt["model"])
        fields = calibrate_thresholds(model, catalog, cfg.data.val_split, cfg.input.size, cfg.eval.batch_size,
                                      device, cfg.data.num_workers)
        if fields is None:
            if catalog.attribute_names:
                _log(f"attribute thresholds: split '{cfg.data.val_split}' has no labelled images; "
                     "attributes will be decided at 0.5")
            return
        atomic_save({**ckpt, **fields}, path)
        info = fields["attribute_calibration"]
        _log(f"attribute thresholds for {path.name}: chosen on {info['images']} '{info['split']}' images "
             f"({info['attributes_calibrated']} of {len(catalog.attribute_names)} attributes have a known positive there)")


def validate(model: torch.nn.Module, catalog: Catalog, cfg: Config, device: torch.device,
             decode_device: torch.device | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Top-k/mAP on the validation split (None when the split has no queries or gallery); ``decode_device``
    as in :func:`mmfl.extract.extract_features`; ``progress`` False keeps the embedding passes quiet
    (``mmfl train --no-progress`` means no bars at all)."""
    from mmfl.evaluate import run_evaluation

    queries, gallery = catalog.split(cfg.data.val_split, "consumer"), catalog.split(cfg.data.val_split, "shop")
    if not {r.item_id for r in queries} & {r.item_id for r in gallery}:
        return None
    result = run_evaluation(model.eval(), catalog, split=cfg.data.val_split, size=cfg.input.size,
                            batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.data.num_workers,
                            decode_device=decode_device, progress=progress).metrics
    return {k: result[k] for k in ("top1", "top5", "top10", "top20", "top50", "mAP", "num_queries", "num_gallery")}


def train_dataset(cfg: Config, data: TrainData, decode_device: torch.device | None) -> Dataset:
    """The training records as a Dataset: decoded and augmented by the CPU workers, or with a
    ``decode_device`` (``data.decode=gpu``) only read there, for :func:`train_batches` to decode on the device."""
    min_size = train_source_size(cfg.input.size, cfg.input.crop_scale_min)
    views = ViewMaker.for_records(data.views, data.records) if data.views is not None else None
    if decode_device is not None:
        return EncodedRecordDataset(data.records, data.labels, min_size=min_size, views=views)
    inp = cfg.input
    transform = train_transform(inp.size, inp.flip, inp.crop_scale_min, inp.color_jitter, inp.random_erasing)
    return RecordDataset(data.records, transform, data.labels, min_size=min_size, views=views)


def train_batches(cfg: Config, dataset: Dataset, sampler: PKSampler, device: torch.device, epoch: int,
                  decode_device: torch.device | None) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch's ``(uint8 images, labels, record indices)`` from :func:`train_dataset`'s ``dataset``.

    The images arrive pinned on the host (CPU decode), or already on ``decode_device``, decoded
    and augmented there (:class:`mmfl.data.gpu_decode.DeviceBatches`); the seed is the epoch's
    either way, so a resumed run repeats its epochs.
    """
    seed = cfg.seed * 1000 + epoch
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda" and decode_device is None, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker, persistent_workers=False,
        collate_fn=None if decode_device is None else collate_encoded,
    )
    if decode_device is None:
        return loader
    inp = cfg.input
    return DeviceBatches(loader, decode_device,
                         TrainAugment(inp.size, inp.flip, inp.crop_scale_min, inp.color_jitter, inp.random_erasing), seed)


def _views_summary(data: TrainData, val_split: str) -> str:
    """One line on the generated views: what the training split gets, and what validation scores on."""
    plan = data.views
    virtual = sum(1 for r in data.records if r.view)
    held = sum(1 for r in data.catalog.split(val_split, "consumer") if r.source.startswith("held-out"))
    line = (f"generated views: {plan.protocol}, {plan.size} px canvas; training: {virtual} per epoch "
            f"({plan.per_item} per catalogue-only item)")
    if plan.mix < 1 and any(r.domain == "consumer" and not r.view for r in data.records):
        line += f", and {plan.mix:.0%} of the real consumer photos replaced by views"
    return line + (f"; validation: {held} held-out views of '{val_split}' (seed {plan.held_out_seed}, cached in "
                   f"{plan.cache})" if held else "")


def _resumable_checkpoint(last_path: Path, cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """``last.pt`` when it can continue this run; else one line naming what differs, and nothing touched.

    Resuming loads the stored weights, optimizer and center-loss states into a model built from
    ``cfg`` and the data, so every setting that shapes them must match: the whole ``model`` section
    (its ``pretrained`` aside, the checkpoint holds the weights), the optimizer, whether the center
    loss is on, and the data-derived head sizes.
    """
    if not last_path.is_file():
        raise TrainingError(f"{last_path}: nothing to resume from (no last checkpoint)")
    ckpt = read_checkpoint(last_path, map_location="cpu")
    if ckpt.get("train_state") is None:
        raise TrainingError(f"{last_path}: checkpoint has no training state to resume")
    try:
        stored = config_to_dict(config_from_dict(ckpt["config"]))
    except (KeyError, MMFLError) as exc:
        raise TrainingError(f"{last_path}: its stored config is unusable ({exc})") from None
    now = config_to_dict(cfg)
    old_flat, new_flat = _flatten(stored["model"], "model"), _flatten(now["model"], "model")
    differ = [(k, old_flat.get(k, "(none)"), new_flat.get(k, "(none)"))
              for k in dict.fromkeys([*old_flat, *new_flat])
              if k != "model.pretrained" and old_flat.get(k) != new_flat.get(k)]
    if stored["train"]["optimizer"] != now["train"]["optimizer"]:
        differ.append(("train.optimizer", stored["train"]["optimizer"], now["train"]["optimizer"]))
    if (stored["loss"]["center_weight"] > 0) != (now["loss"]["center_weight"] > 0):  # center loss on/off
        differ.append(("loss.center_weight", stored["loss"]["center_weight"], now["loss"]["center_weight"]))
    for key in ("num_items", "num_attributes", "num_categories"):
        if ckpt.get(key, 0) != meta[key]:
            differ.append((f"{key} (from the data)", ckpt.get(key, 0), meta[key]))
    if differ:
        shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in differ[:RESUME_DIFFS_SHOWN])
        more = f"; and {len(differ) - RESUME_DIFFS_SHOWN} more" if len(differ) > RESUME_DIFFS_SHOWN else ""
        raise TrainingError(f"--resume: {last_path} was trained with a different setup ({shown}{more}); "
                            f"resume with its values or train into a new output_dir")
    return ckpt


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": [{"c": 2}], "d": [3, 4]}}`` -> ``{"a.b[0].c": 2, "a.d": [3, 4]}``: keys as a user writes them."""
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flatten(sub, f"{prefix}.{name}").items()}
    if isinstance(value, list) and any(isinstance(sub, dict) for sub in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flatten(sub, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _num_categories(cfg: Config, data: TrainData) -> int:
    use = cfg.model.category_head and cfg.loss.category_weight > 0
    return len(data.catalog.category_names) if use else 0


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """No weight decay on norms and biases (1-D tensors); fused AdamW on CUDA."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=device.type == "cuda")


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy/random seeded from the per-epoch torch seed (deterministic)."""
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def _get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": _python_state_to_tensors(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(_python_state_from_tensors(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# RNG states are stored as tensors/ints so checkpoints load with weights_only=True.
def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_tensors(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensors(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def _tensorboard(cfg: Config, out: Path) -> Any:
    if not cfg.train.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")


def _remove_torn_saves(folder: Path) -> None:
    """Delete temp files of checkpoint saves cut short by a kill (``.last.pt.tmp-<pid>``).

    They are never read (the rename never happened) but each holds a checkpoint's worth of disk,
    and a job that keeps being preempted would pile them up.
    """
    for tmp in folder.glob(".*.pt.tmp-*"):
        tmp.unlink(missing_ok=True)


def _rewrite_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows`` atomically (a kill leaves the old or the new log)."""
    atomic_write_text(path, "".join(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n" for row in rows))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
