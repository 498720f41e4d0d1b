"""Learning-rate schedules: warmup, then linear decay, cosine decay or a constant rate.

Shared by the single-task trainer (one schedule) and co-training (one schedule per task).
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULERS = ("linear", "cosine", "constant")


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Steps of linear warmup: the share ``warmup_ratio`` of ``total_steps``, rounded up."""
    return math.ceil(warmup_ratio * total_steps)


def lr_multiplier(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor for optimizer step ``step`` (0-based): warmup, then the chosen shape.

    Warmup reaches the full rate at step ``warmup_steps``; decay ends just above 0 at the last step,
    so no step is spent with a zero learning rate.
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        remaining = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / remaining)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
