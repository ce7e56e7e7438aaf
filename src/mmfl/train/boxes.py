"""The box stage: train MMFL-Net's garment box head after retrieval training, on whole photos.

Why a separate stage with the features frozen (``box.freeze_features``, the default): the
retrieval embedding, and so every index built from the checkpoint, stays bit-identical (the
backbone runs in eval mode, so not even its batch-norm statistics move), and the stage costs a
fraction of retrieval training because only the head learns. ``box.freeze_features=false`` lets
the box loss fine-tune the backbone too; docs/RESULTS.md ("Finding the garment") measures both.

:func:`run_box_stage` is what the trainer calls: it trains the head from the same initial
weights for each checkpoint (last and best, whose features differ) and writes the head and its
validation scores (``box_metrics``) back into that checkpoint.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from mmfl.checkpoint import atomic_save, model_payload, read_checkpoint
from mmfl.config import Config
from mmfl.data.box_dataset import BoxDataset, BoxImage, box_images
from mmfl.data.records import Catalog
from mmfl.errors import MMFLError
from mmfl.losses.box import box_loss
from mmfl.progress import progress as make_progress

#: Gradient-norm clip for the head (its focal loss spikes on the first steps).
GRAD_CLIP = 10.0


def box_grid(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """(rows, cols) of the box head's map for a ``size`` x ``size`` input (one no-grad pass in eval mode)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        h, w = model.box_maps(torch.zeros(1, 3, size, size, device=device)).objectness.shape[-2:]
    model.train(was_training)
    return int(h), int(w)


def _trainable(model: torch.nn.Module, freeze_features: bool) -> list[torch.nn.Parameter]:
    """The parameters the stage updates (all others get ``requires_grad=False``), and the modes set."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    modules: list[torch.nn.Module] = [model.box_head]
    if not freeze_features:
        modules.append(model.backbone)
        if model.box_reads_fused:
            modules.append(model.neck)
    params = []
    for module in modules:
        module.train()
        params += list(module.parameters())
    if not freeze_features:  # stages the backbone keeps frozen (model.freeze_stages) stay so
        frozen = {id(p) for stage in model.backbone._stages[: model.backbone.frozen_stages] for p in stage.parameters()}
        params = [p for p in params if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    return params


def check_box_data(catalog: Catalog, cfg: Config) -> None:
    """Refuse, before any training, a ``model.box_head`` run whose training split has no box at all
    (the stage comes last, so finding out there would waste the whole retrieval run)."""
    if not any(r.box is not None for r in catalog.split(cfg.data.train_split)):
        raise MMFLError(f"{cfg.data.root}: model.box_head=true, but no photo of split '{cfg.data.train_split}' "
                        "has a box to train the box head from (set model.box_head=false)")


def train_box_head(model: torch.nn.Module, catalog: Catalog, cfg: Config, device: torch.device,
                   progress: bool = True) -> dict[str, Any]:
    """Train ``model.box_head`` (and, unfrozen, the backbone) on the boxes of the training split's photos.

    Returns what it did and how the top box scores on the validation split's photos (see
    :func:`evaluate_boxes`; absent when that split has no boxes). The model is left in eval mode.
    """
    b = cfg.box
    check_box_data(catalog, cfg)
    train_images = box_images(catalog.split(cfg.data.train_split), catalog.category_names)
    grid = box_grid(model, b.size)
    dataset = BoxDataset(train_images, b.size, grid, flip=True, seed=cfg.seed)
    params = _trainable(model, b.freeze_features)
    optimizer = torch.optim.AdamW(params, lr=b.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(dataset) / b.batch_size)
    if b.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, b.max_steps_per_epoch)
    total = max(1, steps_per_epoch * b.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
    losses: list[float] = []
    for epoch in range(b.epochs):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=b.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        bar = make_progress(steps_per_epoch, f"box epoch {epoch + 1}/{b.epochs}", progress, leave=False, unit="step")
        total_loss, steps = 0.0, 0
        for step, (images, targets, _, _) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            targets = {k: v.to(device) for k, v in targets.items()}
            terms = box_loss(model.box_maps(images.to(device)), targets)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            value = float(terms["total"].detach())
            if not math.isfinite(value):
                raise MMFLError(f"box stage: non-finite loss ({value}) at epoch {epoch + 1} step {step + 1}")
            total_loss, steps = total_loss + value, steps + 1
            if bar is not None:
                bar.update(1, loss=f"{value:.3f}")
        if bar is not None:
            bar.close()
        losses.append(total_loss / max(1, steps))
        if progress:
            _log(f"box epoch {epoch + 1}: loss {losses[-1]:.3f}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    metrics: dict[str, Any] = {"train_images": len(train_images), "size": b.size, "grid": list(grid),
                               "epochs": b.epochs, "freeze_features": b.freeze_features, "losses": losses}
    val_images = box_images(catalog.split(cfg.data.val_split), catalog.category_names)
    if val_images:
        scores = evaluate_boxes(model, val_images, b.size, device, b.batch_size, cfg.data.num_workers)
        metrics.update({"split": cfg.data.val_split, **scores,
                        "centred_baseline": centred_baseline(train_images, val_images)})
    return metrics


def _photo_sizes(images: Sequence[BoxImage]) -> list[tuple[int, int]]:
    """Upright (width, height) of each photo, from its header (EXIF orientations 5-8 turn it a quarter)."""
    sizes = []
    for item in images:
        with Image.open(item.path) as img:
            w, h = img.size
            sizes.append((h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h))
    return sizes


def evaluate_boxes(model: torch.nn.Module, images: Sequence[BoxImage], size: int, device: torch.device,
                   batch_size: int = 32, num_workers: int = 0) -> dict[str, Any]:
    """How well the top box of each photo matches its given box(es): mean IoU (with the best-matching
    given box) and the share of photos with IoU >= 0.5, over ``images``."""
    grid = box_grid(model, size)
    loader = DataLoader(BoxDataset(images, size, grid), batch_size=batch_size, num_workers=num_workers)
    ious: list[float] = []
    model.eval()
    with torch.inference_mode():
        for batch, _, full, index in loader:
            found = model.detect(batch.to(device), max_boxes=1).boxes[:, 0].float().cpu()  # (B, 4) input pixels
            scale = torch.cat([full, full], dim=1).float() / size  # (B, 4): x, y, x, y
            for box, i in zip(found * scale, index.tolist()):
                given = torch.tensor(images[i].boxes, dtype=torch.float32)
                ious.append(float(box_iou(box[None], given).max()))
    return _iou_summary(ious)


def centred_baseline(train_images: Sequence[BoxImage], images: Sequence[BoxImage]) -> dict[str, Any]:
    """The same scores for a box without looking: centred, with the training boxes' mean relative
    width and height (the best a fixed guess does on photos framed around their garment)."""
    rel_w, rel_h = [], []
    for item, (w, h) in zip(train_images, _photo_sizes(train_images)):
        for x1, y1, x2, y2 in item.boxes:
            rel_w.append((x2 - x1) / w)
            rel_h.append((y2 - y1) / h)
    fw, fh = sum(rel_w) / len(rel_w), sum(rel_h) / len(rel_h)
    ious = []
    for item, (w, h) in zip(images, _photo_sizes(images)):
        guess = torch.tensor([[w * (1 - fw) / 2, h * (1 - fh) / 2, w * (1 + fw) / 2, h * (1 + fh) / 2]])
        ious.append(float(box_iou(guess, torch.tensor(item.boxes, dtype=torch.float32)).max()))
    return {**_iou_summary(ious), "relative_width": fw, "relative_height": fh}


def _iou_summary(ious: list[float]) -> dict[str, Any]:
    return {"images": len(ious), "mean_iou": sum(ious) / max(1, len(ious)),
            "iou50": sum(v >= 0.5 for v in ious) / max(1, len(ious))}


def run_box_stage(model: torch.nn.Module, catalog: Catalog, cfg: Config, device: torch.device,
                  paths: Sequence[Path], progress: bool = True) -> None:
    """Train the box head for each existing checkpoint in ``paths`` and write it back into that file.

    Each checkpoint gets the head from the same initial weights and seed; the rest of the stored
    checkpoint (training state included, so ``--resume`` still works) is kept as it was.
    """
    initial = copy.deepcopy(model.box_head.state_dict())
    for path in (p for p in paths if p.is_file()):
        ckpt = read_checkpoint(path, map_location="cpu")
        model.load_state_dict(ckpt["model"])
        model.box_head.load_state_dict(initial)
        torch.manual_seed(cfg.seed)
        metrics = train_box_head(model, catalog, cfg, device, progress)
        atomic_save({**ckpt, "model": model_payload(model, {})["model"], "box_metrics": metrics}, path)
        if "mean_iou" in metrics:
            base = metrics["centred_baseline"]
            _log(f"box head for {path.name}: top box on {metrics['images']} '{metrics['split']}' photos: mean IoU "
                 f"{metrics['mean_iou']:.3f}, IoU>=0.5 {metrics['iou50']:.1%} (centred box: {base['mean_iou']:.3f}, "
                 f"{base['iou50']:.1%})")
        else:
            _log(f"box head for {path.name}: trained on {metrics['train_images']} photos (no boxes in split "
                 f"'{cfg.data.val_split}' to score it on)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
