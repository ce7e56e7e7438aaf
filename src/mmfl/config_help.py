"""One line of help for every config key, and the schema walk that lists the keys.

``mmfl config show`` and ``mmfl config keys`` print these next to the values, so a user can
read what a run did without opening ``config.py``. The schema in :mod:`mmfl.config` is the
source of truth for keys, types and defaults; this file only explains them, and
``tests/test_config_cmd.py`` fails when a key has no line here (or a line names no key), so a new
option cannot ship undocumented. Keys of a branch in ``model.branches`` are written
``model.branches[].name`` and so on.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

HELP: dict[str, str] = {
    # data
    "data.root": "dataset root folder (a CSV file for data.format=csv)",
    "data.format": "dataset layout read from data.root (docs/datasets.md)",
    "data.train_split": "split whose images train the model",
    "data.val_split": "split used for validation each epoch and for choosing attribute thresholds",
    "data.skip_bad": "unreadable images and bad annotation lines: true = count and skip, false = fail; auto = skip "
                     "for the folder formats, fail for annotated datasets",
    "data.num_workers": "image decoding processes of the training loader",
    "data.decode": "where training JPEGs are decoded: cpu workers, or batched on the GPU (falls back to cpu)",
    "data.views": "consumer-style views generated from shop photos (docs/datasets.md): hard, standard, or none",
    "data.view_mix": "share of the training consumer images that are generated views, 0..1; auto = 1 when the "
                     "dataset has no consumer photo (a catalogue), else 0",
    "data.views_per_item": "generated views per item: its consumer side each epoch, and its cached held-out views",
    "data.view_size": "canvas of a generated view in pixels; 0 = twice input.size, at most 384",
    "data.view_seed": "seed of the held-out views that validation and eval score on (fixed across runs)",
    "data.view_cache": "folder caching held-out views; empty = $MMFL_CACHE or ~/.cache/mmfl, under views/",
    # input
    "input.size": "square input side in pixels; every image is resized to it (also for eval, index, search)",
    "input.flip": "random horizontal flips while training",
    "input.crop_scale_min": "smallest area share of the random training crop (1.0 = no random crop)",
    "input.color_jitter": "strength of the random brightness/contrast/saturation/hue change while training (0 = off)",
    "input.random_erasing": "probability of erasing a random rectangle of a training image (0 = off)",
    # model
    "model.backbone": "torchvision CNN returning the feature pyramid",
    "model.pretrained": "backbone start: imagenet, none (random), or a path to a state dict",
    "model.last_stride": "stride of the backbone's last stage (1 keeps a finer last map, as in re-ID)",
    "model.freeze_stages": "backbone stages (0..4) kept frozen during training",
    "model.backbone_norm": "bn: batch norm trained; frozen: ImageNet statistics and affine kept fixed",
    "model.fusion": "semantic-spatial fusion neck: none, topdown (FPN) or bidirectional (top-down + bottom-up)",
    "model.fusion_levels": "pyramid levels (2..5 = stride 4..32) the fusion neck combines",
    "model.neck_width": "channels of every fused map",
    "model.branches": "retrieval branches, each an embedding described as data (keys model.branches[].*)",
    "model.branches[].name": "branch name, unique; names its embeddings in logs",
    "model.branches[].level": "pyramid level the branch reads (2..5 = stride 4..32)",
    "model.branches[].source": "fused: the fusion neck's map at that level; backbone: the backbone stage itself",
    "model.branches[].partition": "whole, stripes:N (horizontal parts) or grid:RxC (local patches)",
    "model.branches[].pooling": "how each part is pooled: avg, max or gem (learnable generalised mean)",
    "model.branches[].dim": "embedding width of each part of the branch",
    "model.branches[].with_whole": "also embed the whole map in a partitioned branch (as MGN's part branches)",
    "model.attribute_head": "predict the dataset's attributes (multi-label) from the embedding",
    "model.category_head": "predict the category from the embedding",
    "model.box_head": "add a garment box head (trained after retrieval by the box stage)",
    "model.box_level": "pyramid level the box head reads (3..5 = stride 8..32)",
    "model.box_source": "box head input: backbone (only the stages up to box_level run) or fused (the neck's map)",
    "model.box_width": "channels of the box head's two 3x3 convolutions",
    # loss
    "loss.id_weight": "weight of the product-ID cross-entropy on every branch",
    "loss.label_smoothing": "label smoothing of the product-ID cross-entropy",
    "loss.triplet": "metric loss: none, batch_hard (plain trihard) or improved (adds a cross-domain term)",
    "loss.triplet_weight": "weight of the triplet loss",
    "loss.margin": "triplet margin (on pre-BN features)",
    "loss.cross_domain_weight": "improved trihard: share (0..1) of the consumer<->shop-only term",
    "loss.center_weight": "weight of the center loss (0 = off)",
    "loss.center_lr": "learning rate of the center loss's own optimizer",
    "loss.attribute_weight": "weight of the attribute BCE, unknown labels masked (0 = off)",
    "loss.category_weight": "weight of the category cross-entropy (0 = off)",
    # train
    "train.epochs": "training epochs (0 writes the untrained checkpoint)",
    "train.batch_items": "items per batch (P of the P x K sampler)",
    "train.images_per_item": "images per item in a batch (K of the P x K sampler), both domains where possible",
    "train.optimizer": "adamw or sgd",
    "train.lr": "peak learning rate",
    "train.weight_decay": "weight decay of the optimizer",
    "train.momentum": "SGD momentum (unused by adamw)",
    "train.warmup_epochs": "epochs of linear learning-rate warm-up",
    "train.schedule": "learning-rate schedule after warm-up: cosine or step",
    "train.step_milestones": "step schedule: epochs at which the learning rate is multiplied by step_gamma",
    "train.step_gamma": "step schedule: factor applied at each milestone",
    "train.grad_clip": "gradient norm clipping threshold (0 = off)",
    "train.amp": "bf16 autocast on the GPU (ignored on the CPU)",
    "train.channels_last": "channels_last memory format for the model and batches",
    "train.compile": "torch.compile the model",
    "train.compile_mode": "torch.compile mode when train.compile is on",
    "train.cuda_graph": "replay the whole step as one CUDA graph (one GPU, adamw; ignored on the CPU)",
    "train.device": "auto, cpu, cuda or cuda:N",
    "train.deterministic": "deterministic algorithms (slower; for reproducing a run exactly)",
    "train.eval_every": "epochs between validation runs (0 = no validation)",
    "train.max_steps_per_epoch": "cap on steps per epoch (0 = a full pass over the items)",
    "train.tensorboard": "write TensorBoard scalars beside metrics.jsonl",
    # eval
    "eval.batch_size": "images per forward pass when embedding for evaluation",
    "eval.flip": "flip test-time augmentation (embeddings of image and mirror summed)",
    "eval.rerank": "k-reciprocal re-ranking of the ranking",
    "eval.gallery_splits": "extra splits whose shop images join the gallery (empty = the query split only)",
    # box stage
    "box.size": "square detection input side in pixels (the whole photo is resized to it)",
    "box.epochs": "epochs of the box stage",
    "box.batch_size": "photos per batch in the box stage",
    "box.lr": "learning rate of the box stage",
    "box.max_steps_per_epoch": "cap on box-stage steps per epoch (0 = a full pass over the training photos)",
    "box.freeze_features": "train only the box head, so the retrieval embedding stays bit-identical",
    "box.max_boxes": "boxes decoded per photo (top-k centre peaks)",
    "box.min_score": "boxes scoring below it are not reported (the whole photo is searched instead)",
    # top level
    "output_dir": "folder for checkpoints, config.yaml, metrics.jsonl and TensorBoard logs",
    "seed": "random seed of weights, sampling and augmentation",
}


@dataclass(frozen=True)
class KeyInfo:
    """One key of the schema: its dotted name, type in words and default value."""

    key: str
    kind: str
    default: Any


def schema_keys(cls: type | None = None, prefix: str = "") -> list[KeyInfo]:
    """Every key of the config schema in declaration order, walked from the dataclasses.

    A list of dataclasses (``model.branches``) is one key plus the keys of one element
    (``model.branches[].name``, ...), whose defaults are the element class's.
    """
    from mmfl.config import Config

    cls = cls or Config
    hints = get_type_hints(cls)
    instance = cls()
    keys = []
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        default = getattr(instance, f.name)
        if dataclasses.is_dataclass(hint):
            keys.extend(schema_keys(hint, key + "."))
            continue
        keys.append(KeyInfo(key, describe_type(hint), default))
        if get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
            keys.extend(schema_keys(get_args(hint)[0], key + "[]."))
    return keys


def describe_type(hint: Any) -> str:
    """A type as the user writes values of it: ``int``, ``one of a|b``, ``list of int``."""
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + "|".join(str(v).lower() if isinstance(v, bool) else str(v) for v in get_args(hint))
    if origin is list:
        (item,) = get_args(hint)
        return "list of " + ("mappings" if dataclasses.is_dataclass(item) else describe_type(item))
    return getattr(hint, "__name__", str(hint))


def help_for(key: str) -> str:
    """The help line of ``key``; an element key such as ``model.branches[2].dim`` reads ``model.branches[].dim``."""
    return HELP.get(re.sub(r"\[\d+\]", "[]", key), "")
