"""The box head's loss: penalty-reduced focal loss on the centre heatmap, L1 on log size and
centre offset at the true centre cells, cross-entropy on the category there.

Why these: the heatmap is almost all background, and the focal form (positives weighted by
``(1 - p)^2``, negatives by ``p^2`` and by ``(1 - target)^4`` near a centre) keeps the few centre
cells from drowning; sizes are regressed in log cells so a 10 % error costs the same on a
small and a large garment. Every term is averaged over the boxes in the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfl.models.box_head import BoxMaps

#: Weights of the terms (the heatmap's is 1).
SIZE_WEIGHT = 1.0
OFFSET_WEIGHT = 1.0
CATEGORY_WEIGHT = 0.5


def heatmap_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Focal loss over (N, 1, h, w) logits against a Gaussian-peaked target, per box (target == 1 cells)."""
    logits, target = logits.float(), target.float()
    prob = torch.sigmoid(logits)
    pos = target.eq(1.0).float()
    pos_term = F.logsigmoid(logits) * (1 - prob) ** 2 * pos
    neg_term = F.logsigmoid(-logits) * prob**2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_term.sum() + neg_term.sum()) / pos.sum().clamp(min=1.0)


def _at_centres(fmap: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) values at cells ``index`` (N, M) -> (N, M, C)."""
    n, c = fmap.shape[:2]
    return fmap.float().flatten(2).gather(2, index.unsqueeze(1).expand(n, c, index.shape[1])).transpose(1, 2)


def box_loss(maps: BoxMaps, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss terms and their weighted ``total`` for one batch (``targets`` from
    :func:`mmfl.data.box_dataset.make_targets`, stacked)."""
    mask = targets["mask"].float()
    boxes = mask.sum().clamp(min=1.0)
    heat = heatmap_focal_loss(maps.objectness, targets["heatmap"])
    size = ((_at_centres(maps.size, targets["index"]) - targets["size"]).abs().sum(2) * mask).sum() / boxes
    offset = ((_at_centres(maps.offset, targets["index"]) - targets["offset"]).abs().sum(2) * mask).sum() / boxes
    terms = {"heatmap": heat, "size": size, "offset": offset}
    total = heat + SIZE_WEIGHT * size + OFFSET_WEIGHT * offset
    known = targets["category"] >= 0
    if maps.category is not None and bool(known.any()):
        logits = _at_centres(maps.category, targets["index"])[known]
        terms["category"] = F.cross_entropy(logits, targets["category"][known])
        total = total + CATEGORY_WEIGHT * terms["category"]
    terms["total"] = total
    return terms
