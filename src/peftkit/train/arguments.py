"""How to train: `TrainingArguments` (one model, peftkit.train.loop) and `CotrainArguments` (one
LoRA adapter per task in one run, peftkit.train.cotrain). Each validates itself and names the first
field that cannot work.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.train import tracking
from peftkit.train.schedule import SCHEDULERS

PRECISIONS = ("no", "bf16", "fp16")


def check_whole_number(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    """Refuse `value` for field `owner.name` unless it is an int >= 1 (or None where allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftkitError(f"{owner}.{name} must be a whole number >= 1, got {value!r}")


@dataclass
class TrainingArguments:
    """How to train. Batch sizes are per process; a step sees ``batch_size * processes * accumulation``."""

    output_dir: str
    epochs: float = 3
    max_steps: int | None = None  # optimizer steps; overrides epochs
    # A time budget: stop after the optimizer step that brings this invocation's training time (steps
    # only, evaluation and saving excluded) to max_time_s, then evaluate and save as at a normal end.
    # The learning-rate schedule still spans epochs / max_steps, so a cut run ends before its decay does.
    max_time_s: float | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.0  # AdamW decay, on parameters with 2+ dimensions (not biases, norms)
    warmup_ratio: float = 0.06  # share of the steps with linear warmup
    lr_scheduler: str = "linear"  # linear | cosine | constant (after warmup)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate's autocast)
    seed: int = 0
    eval_every_epoch: bool = True
    eval_steps: int | None = None  # also evaluate every N optimizer steps
    save_steps: int | None = None  # checkpoint every N optimizer steps (and always at epoch ends)
    keep_checkpoints: int = 2
    metric_for_best: str = "accuracy"  # a key of the eval metrics: "accuracy" or "loss"
    greater_is_better: bool = True
    resume: bool | str = False  # True: newest checkpoint in output_dir/checkpoints; or a path
    progress: bool = True
    # Recompute each layer's activations in the backward pass instead of keeping them: less memory,
    # about a third more compute. Needs a transformers model that supports it (the base of a PeftModel).
    gradient_checkpointing: bool = False
    # Experiment tracking through Accelerate: "none", "tensorboard", "mlflow", "wandb" or several,
    # comma-separated. Logs go under output_dir (peftkit.train.tracking says where).
    report_to: str | list[str] = "none"

    def validate(self) -> None:
        """Raise PeftkitError naming the first field that cannot work."""

        positive_int = functools.partial(check_whole_number, "TrainingArguments")
        if not self.output_dir:
            raise PeftkitError("TrainingArguments.output_dir is empty; name a folder for checkpoints and metrics")
        if self.max_steps is None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise PeftkitError(f"TrainingArguments.epochs must be > 0 (or set max_steps), got {self.epochs!r}")
        positive_int("max_steps", self.max_steps, allow_none=True)
        if self.max_time_s is not None and (isinstance(self.max_time_s, bool) or not self.max_time_s > 0):
            raise PeftkitError(f"TrainingArguments.max_time_s must be > 0 seconds (or None: no time budget), got {self.max_time_s!r}")
        positive_int("batch_size", self.batch_size)
        positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        positive_int("eval_steps", self.eval_steps, allow_none=True)
        positive_int("save_steps", self.save_steps, allow_none=True)
        positive_int("keep_checkpoints", self.keep_checkpoints)
        if not self.learning_rate > 0:
            raise PeftkitError(f"TrainingArguments.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise PeftkitError(f"TrainingArguments.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise PeftkitError(f"TrainingArguments.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise PeftkitError(
                f"TrainingArguments.lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}"
            )
        if self.mixed_precision not in PRECISIONS:
            raise PeftkitError(
                f"TrainingArguments.mixed_precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.mixed_precision!r}"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise PeftkitError(
                f"TrainingArguments.gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}"
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PeftkitError(
                f"TrainingArguments.max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}"
            )
        tracking.check_installed(tracking.trackers_of(self.report_to))


@dataclass
class CotrainArguments:
    """How to co-train. Batch sizes are per task: a forward pass holds up to batch_size rows of each task."""

    output_dir: str
    epochs: float = 2  # passes over each task's data
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float | Mapping[str, float] = 1e-3  # one for all tasks, or {task: rate}
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"  # linear | cosine | constant (after warmup)
    max_grad_norm: float | None = 1.0  # per adapter
    evals_per_epoch: int = 1
    # Early stopping: a task stops after `patience` evaluations in a row without an accuracy gain above
    # min_delta (None: never); one number for all tasks, or {task: patience}.
    patience: int | Mapping[str, int | None] | None = None
    min_delta: float = 0.0
    save_steps: int | None = 100  # also checkpoint every N forward passes (always after evaluations); None: not
    resume: bool = False
    seed: int = 0
    progress: bool = True
    # Experiment tracking through Accelerate, as TrainingArguments.report_to: each task's metrics are
    # logged under its name ("sst2/train/loss" at that adapter's step), the run's under "train/".
    report_to: str | list[str] = "none"

    def validate(self, tasks: Sequence[str]) -> None:
        positive_int = functools.partial(check_whole_number, "CotrainArguments")
        if not self.output_dir:
            raise PeftkitError("CotrainArguments.output_dir is empty; name a folder for the adapters and metrics")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not self.epochs > 0:
            raise PeftkitError(f"CotrainArguments.epochs must be > 0, got {self.epochs!r}")
        positive_int("batch_size", self.batch_size)
        positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("evals_per_epoch", self.evals_per_epoch)
        positive_int("save_steps", self.save_steps, allow_none=True)
        for task, rate in self._per_task(self.learning_rate, tasks, "learning_rate").items():
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
                raise PeftkitError(f"CotrainArguments.learning_rate for {task!r} must be > 0, got {rate!r}")
        for task, patience in self._per_task(self.patience, tasks, "patience").items():
            if patience is not None:
                positive_int(f"patience ({task})", patience)
        if self.weight_decay < 0:
            raise PeftkitError(f"CotrainArguments.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise PeftkitError(f"CotrainArguments.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise PeftkitError(f"CotrainArguments.lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise PeftkitError(f"CotrainArguments.max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if self.min_delta < 0:
            raise PeftkitError(f"CotrainArguments.min_delta must be >= 0, got {self.min_delta!r}")
        tracking.check_installed(tracking.trackers_of(self.report_to))

    @staticmethod
    def _per_task(value, tasks: Sequence[str], field: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            return {task: value for task in tasks}
        unknown = sorted(set(value) - set(tasks))
        if unknown:
            raise PeftkitError(f"CotrainArguments.{field} names {unknown}, which are not among the tasks ({', '.join(tasks)})")
        missing = sorted(set(tasks) - set(value))
        if field == "learning_rate" and missing:
            raise PeftkitError(f"CotrainArguments.learning_rate gives no rate for {missing}; give one for every task")
        return {task: value.get(task) for task in tasks}

    def for_task(self, field: str, task: str, tasks: Sequence[str]):
        return self._per_task(getattr(self, field), tasks, field)[task]
