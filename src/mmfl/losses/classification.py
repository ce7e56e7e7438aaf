"""Classification terms: product-ID cross-entropy, masked attribute BCE, category CE.

All three compute in float32 with autocast off: log-softmax over thousands of item classes
and sigmoid cross-entropy lose too much precision in bf16.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmfl.losses.precision import autocast_off


def id_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Cross-entropy over item IDs with label smoothing.

    The target puts ``1 - smoothing`` on the true item and spreads ``smoothing`` uniformly over
    all ``C`` classes, i.e. ``-(1 - e) log p_y - (e / C) sum_j log p_j``. Smoothing keeps the
    classifier from becoming over-confident on the few images each item has, which otherwise
    overfits the ID head and hurts the retrieval features behind it.
    """
    with autocast_off(logits):
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def attribute_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Multi-label BCE-with-logits over per-item attributes coded 1 (yes), -1 (no), 0 (unknown).

    Unknown entries are *masked out*, not read as "no": DeepFashion leaves most of its 303
    attributes unannotated for most items, and treating those as negatives would teach the head
    that attributes are almost never present. The mean is over the known entries of the batch;
    a batch with none known gives 0 (still in the graph).
    """
    with autocast_off(logits):
        x = logits.float()
        known = targets != 0
        per_entry = F.binary_cross_entropy_with_logits(x, (targets > 0).float(), reduction="none")
        per_entry = per_entry.masked_fill(~known, 0.0)
        return per_entry.sum() / known.sum().clamp(min=1)


def category_cross_entropy(logits: Tensor, categories: Tensor) -> Tensor:
    """Cross-entropy over categories; ``-1`` marks an unknown category and is ignored.

    A batch where every category is unknown gives 0 rather than PyTorch's NaN (sum over the
    known entries divided by their count, at least 1; no host sync needed).
    """
    with autocast_off(logits):
        total = F.cross_entropy(logits.float(), categories, ignore_index=-1, reduction="sum")
        return total / (categories >= 0).sum().clamp(min=1)
