"""Schedules: how many optimizer steps a run has (`StepPlan`), and the learning rate along them: warmup,
then linear decay, cosine decay or a constant rate.

Shared by the single-task trainer (one schedule) and co-training (one schedule per task).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftkit.train.arguments import TrainingArguments

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


@dataclass(frozen=True)
class StepPlan:
    """How many examples, batches and steps a run has; fixed by the data, the arguments and the process count."""

    global_batch: int  # examples of one global batch: batch_size x processes
    batches_per_epoch: int  # global batches
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    geometry: dict[str, int]  # what a resumed run must share with the run it continues

    @classmethod
    def of(cls, num_examples: int, args: TrainingArguments, world: int) -> StepPlan:
        global_batch = args.batch_size * world
        batches_per_epoch = math.ceil(num_examples / global_batch)
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_steps is not None:
            total_steps = args.max_steps
        else:
            total_steps = max(1, math.ceil(args.epochs * steps_per_epoch - 1e-9))
        geometry = {
            "examples_per_global_batch": global_batch,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_train_examples": num_examples,
        }
        return cls(global_batch, batches_per_epoch, steps_per_epoch, total_steps, geometry)
