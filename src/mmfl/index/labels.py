"""Turning the model's attribute/category probabilities into the names stored and shown with results."""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: An attribute is reported when its sigmoid probability reaches this.
ATTRIBUTE_THRESHOLD = 0.5


def predicted_attributes(probs: np.ndarray | None, names: Sequence[str]) -> tuple[str, ...]:
    """Names whose probability is at least :data:`ATTRIBUTE_THRESHOLD`, most confident first."""
    if probs is None or not len(names):
        return ()
    order = np.argsort(-probs, kind="stable")
    return tuple(names[i] for i in order if probs[i] >= ATTRIBUTE_THRESHOLD)


def predicted_category(probs: np.ndarray | None, names: Sequence[str]) -> str | None:
    """The most probable category's name, or None when the model has no category head."""
    if probs is None or not len(names):
        return None
    return names[int(np.argmax(probs))]
