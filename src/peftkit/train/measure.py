"""Memory measurements reported by the trainer and co-training."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Resident set size high-water mark of this process, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_cuda_memory_mb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated on ``device`` in MiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
