"""Which process this is, how many there are, and the Accelerator that runs them.

The three training jobs (classification, instruction, co-training) and the trainer read the process
layout from here, so they agree: ``torchrun`` / ``accelerate launch`` set WORLD_SIZE and RANK.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from peftkit.errors import PeftkitError


def process_count() -> int:
    """Processes of this run (WORLD_SIZE; 1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes the run's files."""
    return int(os.environ.get("RANK", "0")) == 0


def process_slice(global_indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    n = len(global_indices)
    return list(global_indices[rank * n // world : (rank + 1) * n // world])


def make_accelerator(mixed_precision: str, **options) -> Accelerator:
    """An Accelerator for one run; ``options`` go to it as they are (the trackers' log_with and project_dir)."""
    # Accumulation is done by the trainer (see peftkit.train.loop); num_steps=1 also keeps an
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS from the environment from scaling the loss.
    plugin = GradientAccumulationPlugin(num_steps=1)
    # Under torchrun (`accelerate launch --multi_gpu`) on a machine without an accelerator, Accelerate
    # treats every process as a lone one unless told cpu=True; `--cpu` itself starts one process only.
    cpu = process_count() > 1 and not has_accelerator_device()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, gradient_accumulation_plugin=plugin, **options)
    except ValueError as error:
        # Accelerate keeps process-wide state and refuses a second Accelerator with another
        # mixed_precision. In a single process that state can safely be started over.
        from accelerate.state import AcceleratorState, PartialState

        if "already been initialized" not in str(error) or PartialState().num_processes > 1:
            raise PeftkitError(
                f"Accelerate could not start with mixed_precision={mixed_precision!r}: {error}"
            ) from None
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, gradient_accumulation_plugin=plugin, **options)


def has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())
