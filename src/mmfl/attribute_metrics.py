"""Attribute quality: per-attribute AP and F1 over known labels, thresholds chosen on a split, a prior baseline.

Labels follow the DeepFashion convention per image (the item's vector): 1 positive, -1
negative, 0 unknown. Unknown labels are left out of every count, as the training loss leaves
them out. Definitions:

* **AP** of one attribute: the area under its precision-recall curve over the known labels,
  ranked by score, with tied scores taken as one step (so a constant score, the prior's, gets
  AP = the share of positives, whatever the image order). Scored only when the attribute has at
  least one known positive and one known negative; **mAP** is the mean over those attributes.
* **F1** of one attribute at given decisions: ``2 TP / (2 TP + FP + FN)`` over the known labels;
  **mean F1** is the mean over the same attributes as mAP.
* **Thresholds** (:func:`choose_thresholds`): per attribute, the cut on the probability that
  maximises F1 on a split's known labels (after training: the validation split), placed half-way
  between the last score kept and the next one. An attribute without a known positive there
  keeps :data:`~mmfl.labels.DEFAULT_THRESHOLD`.
* **Prior baseline**: every image scored with the attribute's positive rate among the known
  labels of the training split's images; its thresholds are chosen on the validation split by
  the same rule and the same exclusive groups apply, so it predicts the most common value of each
  group (a model that does not beat it has learned nothing about attributes).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mmfl.data.records import Catalog, Record
from mmfl.labels import DEFAULT_THRESHOLD, AttributeDecoder


def _known_ranked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP at each distinct score (descending), and those scores, over known labels."""
    known = labels != 0
    s = np.asarray(scores, np.float64)[known]
    positive = labels[known] == 1
    order = np.argsort(-s, kind="stable")
    s, positive = s[order], positive[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True] if s.size else np.zeros(0, bool)
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(~positive)[last_of_tie]
    return tp, fp, s[last_of_tie]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AP of one attribute (see the module docstring); None without a known positive and negative."""
    labels = np.asarray(labels)
    num_pos, num_neg = int((labels == 1).sum()), int((labels == -1).sum())
    if not num_pos or not num_neg:
        return None
    tp, fp, _ = _known_ranked(scores, labels)
    recall_step = np.diff(np.r_[0, tp]) / num_pos
    return float(np.sum(recall_step * tp / (tp + fp)))


def f1_score(decisions: np.ndarray, labels: np.ndarray) -> float | None:
    """F1 of one attribute's bool decisions over its known labels; None when it has no known positive
    and nothing was predicted (no error to measure)."""
    labels = np.asarray(labels)
    decisions = np.asarray(decisions, bool)
    tp = int(np.sum(decisions & (labels == 1)))
    fp = int(np.sum(decisions & (labels == -1)))
    fn = int(np.sum(~decisions & (labels == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def choose_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(A,) thresholds maximising each attribute's F1 on (N, A) ``probs`` against (N, A) ``labels``.

    Of equally good cuts the highest wins (fewer claims for the same F1).
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    thresholds = np.full(labels.shape[1], DEFAULT_THRESHOLD, np.float32)
    for a in range(labels.shape[1]):
        num_pos = int((labels[:, a] == 1).sum())
        if not num_pos:
            continue
        tp, fp, cuts = _known_ranked(probs[:, a], labels[:, a])
        f1 = 2 * tp / (2 * tp + fp + (num_pos - tp))
        best = int(np.argmax(f1))
        thresholds[a] = (cuts[best] + cuts[best + 1]) / 2 if best + 1 < len(cuts) else cuts[best]
    return thresholds


def positive_rates(labels: np.ndarray) -> np.ndarray:
    """(A,) share of positives among each attribute's known labels (0 when it has none)."""
    labels = np.asarray(labels)
    pos = (labels == 1).sum(0)
    known = (labels != 0).sum(0)
    return np.where(known > 0, pos / np.maximum(known, 1), 0.0).astype(np.float32)


def conflicting_images(decisions: np.ndarray, groups: Mapping[str, Sequence[int]]) -> int:
    """Images whose (N, A) ``decisions`` claim two values of one group (a sleeveless long-sleeved
    garment): what exclusive groups prevent, counted to show what the 0.5 rule got wrong."""
    bad = np.zeros(len(decisions), bool)
    for cols in groups.values():
        bad |= decisions[:, list(cols)].sum(1) > 1
    return int(bad.sum())


def image_labels(catalog: Catalog, records: Sequence[Record]) -> np.ndarray:
    """(len(records), A) int8: each image carries its item's label vector."""
    return catalog.attribute_matrix([r.item_id for r in records])


def attribute_quality(names: Sequence[str], labels: np.ndarray, scores: Mapping[str, np.ndarray],
                      decisions: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """mAP of each entry of ``scores`` and mean F1 of each entry of ``decisions`` ((N, A) each),
    over the attributes with a known positive and negative, plus every such attribute's numbers."""
    labels = np.asarray(labels)
    per_attribute: dict[str, dict[str, Any]] = {}
    for a, name in enumerate(names):
        pos, neg = int((labels[:, a] == 1).sum()), int((labels[:, a] == -1).sum())
        if not pos or not neg:
            continue
        per_attribute[name] = {
            "positives": pos, "negatives": neg,
            "ap": {k: average_precision(v[:, a], labels[:, a]) for k, v in scores.items()},
            "f1": {k: f1_score(v[:, a], labels[:, a]) for k, v in decisions.items()},
        }

    def mean(kind: str, key: str) -> float | None:
        values = [row[kind][key] for row in per_attribute.values() if row[kind][key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "num_images": int(labels.shape[0]),
        "num_attributes": len(names),
        "num_scored": len(per_attribute),
        "mAP": {k: mean("ap", k) for k in scores},
        "mean_f1": {k: mean("f1", k) for k in decisions},
        "per_attribute": per_attribute,
    }


def evaluate_attributes(catalog: Catalog, records: Sequence[Record], probs: np.ndarray, decoder: AttributeDecoder,
                        train_split: str, val_split: str) -> dict[str, Any]:
    """Attribute quality of the model's ``probs`` for ``records`` against the prior baseline.

    ``model``: the checkpoint's thresholds and groups (what the index stores as predicted);
    ``model_at_0.5``: one 0.5 threshold and no groups (the rule before calibration);
    ``prior``: the training split's positive rates, thresholds chosen on ``val_split``.
    """
    labels = image_labels(catalog, records)
    prior = positive_rates(image_labels(catalog, catalog.split(train_split)))
    val = image_labels(catalog, catalog.split(val_split))
    prior_thresholds = choose_thresholds(np.broadcast_to(prior, val.shape), val) if len(val) else None
    prior_decoder = AttributeDecoder.build(decoder.names, prior_thresholds,
                                           {g: [decoder.names[i] for i in c] for g, c in decoder.groups.items()})
    prior_scores = np.broadcast_to(prior, labels.shape)
    decisions = {"model": decoder.decide(probs), "model_at_0.5": probs >= DEFAULT_THRESHOLD,
                 "prior": prior_decoder.decide(prior_scores)}
    result = attribute_quality(decoder.names, labels, scores={"model": probs, "prior": prior_scores},
                               decisions=decisions)
    result["images_with_conflicting_values"] = {k: conflicting_images(decisions[k], decoder.groups)
                                                for k in ("model", "model_at_0.5")}
    column = {name: a for a, name in enumerate(decoder.names)}
    for name, row in result["per_attribute"].items():
        row["threshold"] = round(float(decoder.thresholds[column[name]]), 4)
        row["prior"] = round(float(prior[column[name]]), 4)
    result["thresholds"] = decoder.describe()["thresholds"]
    result["exclusive_groups"] = sorted(decoder.groups)
    return result


def calibrate_thresholds(model: torch.nn.Module, catalog: Catalog, split: str, size: int, batch_size: int = 64,
                         device: str | torch.device = "cpu", num_workers: int = 0) -> dict[str, Any] | None:
    """Thresholds for ``model``'s attribute head chosen on all images of ``split`` (consumer and shop).

    Returns the checkpoint fields ``attribute_thresholds`` (one float per attribute) and
    ``attribute_calibration`` (split, images, how many attributes got a threshold of their own),
    or None when there is nothing to calibrate on (no attributes, no images, no known label).
    """
    from mmfl.extract import extract_features

    records = catalog.split(split)
    if not catalog.attribute_names or not records:
        return None
    labels = image_labels(catalog, records)
    if not labels.any():
        return None
    feats = extract_features(model, records, size, batch_size, device, num_workers=num_workers, progress=False,
                             predictions=True, desc=f"thresholds on {split}")
    if feats.attribute_probs is None:
        return None
    thresholds = choose_thresholds(feats.attribute_probs.numpy(), labels)
    own = int(((labels == 1).any(0)).sum())
    return {
        "attribute_thresholds": [round(float(t), 6) for t in thresholds],
        "attribute_calibration": {"split": split, "images": len(records), "rule": "max F1 on known labels",
                                  "attributes_calibrated": own,
                                  "attributes_at_default": len(catalog.attribute_names) - own},
    }
