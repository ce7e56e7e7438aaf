"""Training losses: (improved) trihard, center loss, ID / attribute / category classification."""
from __future__ import annotations

from typing import TYPE_CHECKING

from mmfl.losses.center import CenterLoss, rescale_center_grads
from mmfl.losses.classification import attribute_bce, category_cross_entropy, id_cross_entropy
from mmfl.losses.multitask import MultiTaskLoss, terms_to_floats
from mmfl.losses.triplet import batch_hard_triplet, improved_trihard, pairwise_distances

if TYPE_CHECKING:
    from mmfl.config import Config


def build_criterion(cfg: Config, num_items: int, global_dim: int) -> MultiTaskLoss:
    """The multi-task loss described by ``cfg.loss``; ``global_dim`` is the global feature's width."""
    lc = cfg.loss
    return MultiTaskLoss(
        num_items=num_items,
        global_dim=global_dim,
        id_weight=lc.id_weight,
        label_smoothing=lc.label_smoothing,
        triplet=lc.triplet,
        triplet_weight=lc.triplet_weight,
        margin=lc.margin,
        cross_domain_weight=lc.cross_domain_weight,
        center_weight=lc.center_weight,
        attribute_weight=lc.attribute_weight,
        category_weight=lc.category_weight,
    )


__all__ = [
    "CenterLoss",
    "MultiTaskLoss",
    "attribute_bce",
    "batch_hard_triplet",
    "build_criterion",
    "category_cross_entropy",
    "id_cross_entropy",
    "improved_trihard",
    "pairwise_distances",
    "rescale_center_grads",
    "terms_to_floats",
]
