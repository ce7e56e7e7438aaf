"""The training objective: every loss term of MMFL-Net, weighted and summed in one module.

It reads the model's ``TrainOutput`` by attribute only (``features``, ``logits``,
``global_feature``, ``attribute_logits``, ``category_logits``), so the model and the losses
only share those field names. A term whose weight is 0 is not computed at all, and neither is
one whose inputs are absent (no attribute head, or a dataset without attributes), so the same
criterion serves every ablation.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmfl.losses.center import CenterLoss, rescale_center_grads
from mmfl.losses.classification import attribute_bce, category_cross_entropy, id_cross_entropy
from mmfl.losses.triplet import batch_hard_triplet, improved_trihard

TripletKind = Literal["none", "batch_hard", "improved"]


class MultiTaskLoss(nn.Module):
    """``total = w_id*id + w_tri*triplet + w_center*center + w_attr*attr + w_cat*cat``.

    * ``id``: label-smoothed cross-entropy, averaged over every embedding's ID logits (each
      branch and part gets its own classifier, as in MGN).
    * ``triplet``: batch-hard or improved trihard, averaged over every pre-BN embedding.
    * ``center``: center loss on the pre-BN global feature (one center per training item).
    * ``attr``: attribute BCE with unknown (0) labels masked out.
    * ``cat``: category cross-entropy, -1 = unknown.

    ``forward`` returns the total and a dict of the *unweighted* terms plus ``total`` as floats
    for logging (one host sync for all of them).
    """

    def __init__(
        self,
        num_items: int,
        global_dim: int,
        id_weight: float = 1.0,
        label_smoothing: float = 0.1,
        triplet: TripletKind = "improved",
        triplet_weight: float = 1.0,
        margin: float = 0.3,
        hardness_temperature: float = 0.1,
        center_weight: float = 5e-4,
        attribute_weight: float = 1.0,
        category_weight: float = 0.0,
    ):
        super().__init__()
        if triplet not in ("none", "batch_hard", "improved"):
            raise ValueError(f"MultiTaskLoss: unknown triplet kind {triplet!r}")
        self.id_weight = id_weight
        self.label_smoothing = label_smoothing
        self.triplet = triplet if triplet_weight > 0 else "none"
        self.triplet_weight = triplet_weight
        self.margin = margin
        self.hardness_temperature = hardness_temperature
        self.center_weight = center_weight
        self.attribute_weight = attribute_weight
        self.category_weight = category_weight
        self.center = CenterLoss(num_items, global_dim) if center_weight > 0 else None

    def center_parameters(self) -> list[nn.Parameter]:
        """The centers, for their own optimizer (SGD, lr = ``loss.center_lr``); empty when disabled."""
        return [self.center.centers] if self.center is not None else []

    def rescale_center_grads(self) -> None:
        """Undo the center weight on the centers' gradient; call before the center optimizer step."""
        if self.center is not None:
            rescale_center_grads(self.center.centers, self.center_weight)

    def forward(
        self,
        out: Any,
        labels: Tensor,
        attributes: Tensor | None = None,
        categories: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if self.id_weight > 0:
            terms["id"] = torch.stack(
                [id_cross_entropy(lg, labels, self.label_smoothing) for lg in out.logits]
            ).mean()
            weights["id"] = self.id_weight
        if self.triplet != "none":
            terms["triplet"] = torch.stack([self._triplet(f, labels) for f in out.features]).mean()
            weights["triplet"] = self.triplet_weight
        if self.center is not None:
            terms["center"] = self.center(out.global_feature, labels)
            weights["center"] = self.center_weight
        if self.attribute_weight > 0 and out.attribute_logits is not None and attributes is not None:
            terms["attr"] = attribute_bce(out.attribute_logits, attributes)
            weights["attr"] = self.attribute_weight
        if self.category_weight > 0 and out.category_logits is not None and categories is not None:
            terms["cat"] = category_cross_entropy(out.category_logits, categories)
            weights["cat"] = self.category_weight
        if not terms:
            raise ValueError("MultiTaskLoss: every loss term is disabled or has no input")
        total = torch.stack([weights[k] * v for k, v in terms.items()]).sum()
        values = torch.stack([v.detach() for v in terms.values()] + [total.detach()]).tolist()
        logged = dict(zip([*terms, "total"], values))
        return total, logged

    def _triplet(self, features: Tensor, labels: Tensor) -> Tensor:
        if self.triplet == "batch_hard":
            return batch_hard_triplet(features, labels, self.margin)
        return improved_trihard(features, labels, self.margin, self.hardness_temperature)
