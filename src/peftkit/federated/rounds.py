"""The server's record of a federation: what each round did, and the global adapter checkpointed after it.

The output folder holds `checkpoint/round-NNNN.safetensors` (the whole global adapter after round N) and
`checkpoint/federation.json` (the last finished round, the file holding its adapter, the history so far
and the settings). Each file is written atomically and the JSON last, so after a kill the JSON always
names a complete tensor file; `--resume` starts from that round. No Flower here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftkit import io
from peftkit.errors import PeftkitError

CHECKPOINT_DIRNAME = "checkpoint"
STATE_NAME = "federation.json"
REPORT_NAME = "federation.json"


@dataclass
class RoundRecord:
    """One round as the server saw it."""

    round: int
    sampled: int = 0  # clients asked to train
    trained: int = 0  # clients whose update was aggregated
    failures: int = 0  # clients that raised, or did not answer within the round's timeout
    failure_reasons: list[str] = field(default_factory=list)
    bytes_down: int = 0  # adapter bytes sent to the training clients
    bytes_up: int = 0  # adapter bytes received from them
    bytes_eval: int = 0  # adapter bytes sent to the evaluating clients
    train_loss: float | None = None
    factorization_error: float | None = None  # delta: the largest relative SVD error over the modules
    client_accuracy: float | None = None  # mean of the clients' held-out accuracies, weighted by their sizes
    client_accuracies: dict[str, float] = field(default_factory=dict)  # client id -> accuracy on its held-out part
    server_accuracy: float | None = None  # the task's validation examples, where the server scores them
    aggregated: bool = False  # False: too few updates arrived, the global adapter stayed as it was
    dp_noise_multiplier: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIRNAME


def write_checkpoint(output_dir: str | os.PathLike, round_number: int, adapter: dict[str, torch.Tensor],
                     history: list[RoundRecord], settings: dict[str, Any]) -> Path:
    """Write the global adapter after `round_number` and the history; drop older round files."""
    folder = checkpoint_dir(output_dir)
    tensors = folder / f"round-{round_number:04d}.safetensors"
    io.write_tensors(tensors, adapter, metadata={"round": str(round_number)})
    io.write_json(folder / STATE_NAME, {"round": round_number, "adapter_file": tensors.name,
                                        "history": [r.to_dict() for r in history], "settings": settings})
    for old in folder.glob("round-*.safetensors"):
        if old.name != tensors.name:
            old.unlink(missing_ok=True)
    return tensors


def read_checkpoint(output_dir: str | os.PathLike) -> tuple[int, dict[str, torch.Tensor], list[RoundRecord], dict[str, Any]] | None:
    """(round, global adapter, history, settings) of the last finished round, or None where there is none."""
    folder = checkpoint_dir(output_dir)
    path = folder / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PeftkitError(f"{path} is not valid JSON ({error}); start afresh in another --output-dir") from None
    adapter = io.read_tensors(folder / state["adapter_file"])
    history = [RoundRecord(**record) for record in state["history"]]
    return int(state["round"]), adapter, history, state.get("settings", {})


def check_resumable(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resumed federation must have the settings that shape its adapter and data as the saved one."""
    for key in ("model", "task", "method", "method_options", "clients", "partition", "aggregate", "seed"):
        if key in saved and saved[key] != current.get(key):
            raise PeftkitError(f"cannot resume {where}: it ran with {key}={saved[key]!r}, this run has "
                               f"{current.get(key)!r}; use the same settings, or another --output-dir")
