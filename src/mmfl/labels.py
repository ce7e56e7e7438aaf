"""Turning the model's attribute/category probabilities into the names stored and shown with results.

An attribute is reported when its sigmoid probability reaches *its own* threshold, chosen after
training on the validation split (``attribute_thresholds`` in the checkpoint, see
:func:`mmfl.attribute_metrics.choose_thresholds`); one shared 0.5 reports rare attributes far too
seldom and common ones too often. A checkpoint without stored thresholds falls back to
:data:`DEFAULT_THRESHOLD` and :meth:`AttributeDecoder.describe` says so (the index manifest
records it). Then, in each group of mutually exclusive attributes (``attribute_groups``: sleeve
length, neckline, ...), only the most probable of the values that passed is kept, so a pair of
jeans is never sleeveless and long-sleeved at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

#: Threshold used for every attribute when the checkpoint stores none.
DEFAULT_THRESHOLD = 0.5
#: ``attribute_source`` of entries: the dataset's labels, or the model's decisions.
ANNOTATED, PREDICTED = "annotated", "predicted"


@dataclass(frozen=True)
class AttributeDecoder:
    """Per-attribute thresholds plus exclusive groups: probabilities in, attribute decisions out."""

    names: tuple[str, ...]
    thresholds: np.ndarray  # (A,) float
    groups: dict[str, tuple[int, ...]]  # group name -> column indices
    calibration: dict[str, Any] | None = None  # where the thresholds came from; None = default 0.5

    @classmethod
    def build(cls, names: Sequence[str], thresholds: Sequence[float] | None = None,
              groups: Mapping[str, Sequence[str]] | None = None,
              calibration: Mapping[str, Any] | None = None) -> "AttributeDecoder":
        """A decoder over ``names``; group members missing from ``names`` are ignored."""
        names = tuple(names)
        column = {n: i for i, n in enumerate(names)}
        if thresholds is None or len(thresholds) != len(names):
            values, calibration = np.full(len(names), DEFAULT_THRESHOLD, np.float32), None
        else:
            values = np.asarray(thresholds, np.float32)
        cols = {g: tuple(column[n] for n in members if n in column) for g, members in (groups or {}).items()}
        return cls(names, values, {g: c for g, c in cols.items() if len(c) > 1},
                   dict(calibration) if calibration is not None else None)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "AttributeDecoder":
        """The decoder a loaded model (``load_model(...).meta`` or an ONNX export's meta) carries."""
        return cls.build(meta.get("attribute_names") or (), meta.get("attribute_thresholds"),
                         meta.get("attribute_groups"), meta.get("attribute_calibration"))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N, A) or (A,) probabilities -> same-shaped bool: above threshold, one winner per group."""
        probs = np.asarray(probs, np.float32)
        on = probs >= self.thresholds
        for cols in self.groups.values():
            idx = np.asarray(cols)
            member = np.where(on[..., idx], probs[..., idx], -np.inf)
            winner = np.argmax(member, axis=-1)
            keep = np.zeros_like(on[..., idx])
            np.put_along_axis(keep, np.expand_dims(winner, -1), True, axis=-1)
            on[..., idx] = keep & on[..., idx]
        return on

    def attributes(self, probs: np.ndarray | None) -> tuple[str, ...]:
        """The decided names for one image's probabilities, most probable first (empty without a head)."""
        if probs is None or not self.names:
            return ()
        on = self.decide(probs)
        order = np.argsort(-np.asarray(probs), kind="stable")
        return tuple(self.names[i] for i in order if on[i])

    def describe(self) -> dict[str, Any]:
        """For the index manifest: where the thresholds came from, and the groups applied."""
        if self.calibration is None:
            thresholds: dict[str, Any] = {"source": "default", "value": DEFAULT_THRESHOLD,
                                          "note": "the checkpoint stores no thresholds; 0.5 for every attribute"}
        else:
            thresholds = {"source": "calibrated", **self.calibration}
        return {"thresholds": thresholds,
                "exclusive_groups": {g: [self.names[i] for i in cols] for g, cols in self.groups.items()}}


def predicted_category(probs: np.ndarray | None, names: Sequence[str]) -> str | None:
    """The most probable category's name, or None when the model has no category head."""
    if probs is None or not len(names):
        return None
    return names[int(np.argmax(probs))]
