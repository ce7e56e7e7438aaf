"""Center loss with learnable class centers (Bag-of-Tricks semantics).

The loss pulls each feature towards its item's center, tightening every item's cluster, which
the triplet loss (relative distances only) does not do. The centers are parameters of this
module but are *not* trained by the model's optimizer: they get their own plain SGD (lr 0.5 in
BoT), and because the loss enters the total multiplied by a tiny weight (5e-4), their gradients
are rescaled by ``1/weight`` before that step, so the weight only damps the pull on the
features, not the speed at which the centers follow them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfl.losses.precision import autocast_off


class CenterLoss(nn.Module):
    """``mean_i ||x_i - c_{y_i}||^2`` over the batch, with one learnable center per item."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"CenterLoss: need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        with autocast_off(features):
            diff = features.float() - self.centers[labels]
            return diff.pow(2).sum(dim=1).mean()


def rescale_center_grads(centers: nn.Parameter, weight: float) -> None:
    """Multiply the centers' gradient by ``1/weight`` in place (call before the center optimizer step).

    The total loss contains ``weight * center_loss``, so the centers' raw gradient is ``weight``
    times too small for a learning rate chosen for the unweighted loss; this undoes it.
    """
    if weight <= 0:
        raise ValueError(f"rescale_center_grads: weight must be positive, got {weight}")
    if centers.grad is not None:
        centers.grad.mul_(1.0 / weight)
