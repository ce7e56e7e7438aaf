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
    * ``triplet``: batch-hard or improved trihard (which needs each image's domain), averaged
      over every pre-BN embedding.
    * ``center``: center loss on the pre-BN global feature (one center per training item).
    * ``attr``: attribute BCE with unknown (0) labels masked out.
    * ``cat``: category cross-entropy, -1 = unknown.

    ``forward`` returns the total and a dict of the *unweighted* terms plus ``total`` as detached
    0-d tensors: reading them is a device-to-host sync, so the trainer reads them one step late
    (:func:`terms_to_floats`) and the GPU never waits for the logger.
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
        cross_domain_weight: float = 0.5,
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
        self.cross_domain_weight = cross_domain_weight
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
        domains: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``domains``: 0 = consumer, 1 = shop per image (required by the improved trihard)."""
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if self.id_weight > 0:
            terms["id"] = self._id_mean(out.logits, labels)
            weights["id"] = self.id_weight
        if self.triplet != "none":
            if self.triplet == "improved" and domains is None:
                raise ValueError("MultiTaskLoss: the improved trihard needs each image's domain (domains=...)")
            terms["triplet"] = self._triplet_mean(out.features, labels, domains)
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
        logged = {k: v.detach() for k, v in terms.items()}
        logged["total"] = total.detach()
        return total, logged

    def _id_mean(self, logits: list[Tensor], labels: Tensor) -> Tensor:
        """Mean ID cross-entropy over every classifier; classifiers of one class count share one call."""
        groups = _by_last_dim(logits)
        summed = [len(g) * id_cross_entropy(torch.cat(g), labels.repeat(len(g)), self.label_smoothing)
                  for g in groups]
        return torch.stack(summed).sum() / len(logits)

    def _triplet_mean(self, features: list[Tensor], labels: Tensor, domains: Tensor | None) -> Tensor:
        """Mean triplet loss over every embedding; embeddings of one width go through one batched pass."""
        per_embedding = [self._triplet(torch.stack(g), labels, domains) for g in _by_last_dim(features)]
        return torch.cat(per_embedding).mean()

    def _triplet(self, features: Tensor, labels: Tensor, domains: Tensor | None) -> Tensor:
        if self.triplet == "batch_hard" or domains is None:
            return batch_hard_triplet(features, labels, self.margin)
        return improved_trihard(features, labels, domains, self.margin, self.cross_domain_weight)


def _by_last_dim(tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` grouped by their last dimension, in first-seen order (each group stacks or concatenates)."""
    groups: dict[int, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.shape[-1], []).append(t)
    return list(groups.values())


def terms_to_floats(terms: dict[str, Tensor]) -> dict[str, float]:
    """The logged loss terms as floats, in one device-to-host copy."""
    return dict(zip(terms, torch.stack(list(terms.values())).float().tolist()))
