"""Batch-hard triplet loss ("trihard") and our improved variant.

Both losses mine triplets inside a P x K batch: every sample is an anchor, its positives are the
other samples of the same item, its negatives the samples of other items. Distances are
Euclidean on the (pre-BN) features, computed in float32 with autocast off, so a bf16 forward
pass does not quantise the distances the margin is compared against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Squared distances are clamped to this before the square root: the derivative of sqrt is
# infinite at 0, and two identical features (the same image twice, a collapsed embedding) are
# common early in training. Below the clamp the gradient is exactly 0, never NaN.
_MIN_SQUARED_DISTANCE = 1e-12


def pairwise_distances(features: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances, float32, with finite gradients everywhere."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = features.float()
        sq = x.pow(2).sum(dim=1)
        d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())
        return d2.clamp(min=_MIN_SQUARED_DISTANCE).sqrt()


def _pair_masks(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Positive mask (same label, not self), negative mask, and the anchors having both."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(dim=1) & neg.any(dim=1)
    return pos, neg, valid


def _mean_over(per_anchor: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid anchors; 0 (still in the graph) when there are none.

    Masking instead of boolean indexing avoids a device-to-host sync on every step.
    """
    kept = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
    return kept.sum() / valid.sum().clamp(min=1)


def batch_hard_triplet(features: Tensor, labels: Tensor, margin: float, soft_margin: bool = False) -> Tensor:
    """Batch-hard triplet loss: for each anchor, its farthest positive against its nearest negative.

    ``mean_a relu(max_p d(a, p) - min_n d(a, n) + margin)``, or ``softplus(...)`` when
    ``soft_margin`` is set. Anchors without a positive or without a negative in the batch are
    left out of the mean (a P x K batch with K >= 2 and P >= 2 has none).
    """
    dist = pairwise_distances(features)
    pos, neg, valid = _pair_masks(labels)
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(dim=1)
    # An anchor without a positive or a negative gets a gap of -inf, i.e. a loss of exactly 0.
    gap = hardest_pos - hardest_neg + margin
    return _mean_over(F.softplus(gap) if soft_margin else F.relu(gap), valid)


def improved_trihard(features: Tensor, labels: Tensor, margin: float, temperature: float) -> Tensor:
    """Improved trihard: soft margin plus hardness-weighted positives and negatives.

    For anchor ``a`` with positive distances ``d_p`` and negative distances ``d_n``::

        pos_a = sum_p softmax_p( d_p / (T * s)) * d_p      # a soft "farthest positive"
        neg_a = sum_n softmax_n(-d_n / (T * s)) * d_n      # a soft "nearest negative"
        loss  = mean_a softplus(pos_a - neg_a + margin)

    where ``T`` is ``temperature`` and ``s`` the batch's mean off-diagonal distance (no gradient).

    What is improved over :func:`batch_hard_triplet`, and why:

    1. **Soft margin.** The hinge gives zero gradient once an anchor clears the margin, so easy
       anchors stop shaping the space and the loss jumps between "on" and "off" as the hardest
       pair changes. ``softplus`` is a smooth upper bound on the hinge that keeps a small,
       decaying pull on satisfied triplets.
    2. **Hardness-weighted positives/negatives.** Batch-hard sends each anchor's whole gradient to
       one positive and one negative. In consumer-to-shop data the single hardest pair is often an
       outlier (a bad crop, an occluded street photo), so the gradient is noisy and every other
       hard pair gets nothing. A softmax over distances spreads the gradient over all positives
       and negatives, most of it still to the hardest ones; ``temperature`` sets how sharply.
       The weights are detached: they choose *which* pairs to learn from, they are not themselves
       a quantity to optimise, so the gradient is exactly the weighted mean of pair gradients.
    3. **Scale-free temperature.** Distances are divided by their batch mean before the softmax,
       so the same ``temperature`` means the same sharpness whatever the feature norm (pre-BN
       features grow during training and differ between backbones).

    As ``temperature -> 0`` the weights become one-hot on the hardest pair and the loss equals
    ``batch_hard_triplet(..., soft_margin=True)``; a large temperature averages all pairs.
    """
    if temperature <= 0:
        raise ValueError(f"improved_trihard: temperature must be positive, got {temperature}")
    dist = pairwise_distances(features)
    pos, neg, valid = _pair_masks(labels)
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    mean_dist = dist.detach().masked_fill(eye, 0.0).sum() / max(n * (n - 1), 1)
    logits = dist.detach() / (temperature * mean_dist.clamp(min=_MIN_SQUARED_DISTANCE**0.5))
    w_pos = torch.softmax(logits.masked_fill(~pos, float("-inf")), dim=1)
    w_neg = torch.softmax((-logits).masked_fill(~neg, float("-inf")), dim=1)
    # A row without any positive (or negative) is all -inf, and its softmax NaN; that anchor is
    # dropped by ``valid``, but NaN would still leak through the sums, so zero those weights.
    w_pos = torch.nan_to_num(w_pos, nan=0.0)
    w_neg = torch.nan_to_num(w_neg, nan=0.0)
    soft_pos = (w_pos * dist).sum(dim=1)
    soft_neg = (w_neg * dist).sum(dim=1)
    return _mean_over(F.softplus(soft_pos - soft_neg + margin), valid)
