"""Learning-rate schedules as per-step multipliers (LambdaLR), so resume restores them exactly."""
from __future__ import annotations

import math
from typing import Callable


def lr_multiplier(
    schedule: str,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: int,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Linear warmup from 10 % over ``warmup_epochs``, then cosine to 1 % or step decay at ``milestones``."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(steps_per_epoch * warmup_epochs, total - 1) if epochs > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in (milestones or []))

    return factor
