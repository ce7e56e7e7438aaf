"""Where the losses leave autocast: distances, softmaxes and centers are computed in float32."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import Tensor


def autocast_off(like: Tensor) -> ContextManager[None]:
    """Autocast disabled on ``like``'s device; nothing to disable on a device without autocast.

    Such devices exist: ``meta`` runs the whole training step without data, which is how
    :func:`mmfl.train.cuda_graph.capture_hazard` looks for host synchronisations.
    """
    if torch.amp.is_autocast_available(like.device.type):
        return torch.autocast(device_type=like.device.type, enabled=False)
    return contextlib.nullcontext()
