"""The training loop: AdamW on the trainable parameters, on Hugging Face Accelerate.

One code path serves one process and data-parallel runs (``accelerate launch --num_processes N``).
The model is any ``torch.nn.Module`` whose trainable parameters are those with ``requires_grad``;
it is called as ``model(**batch)`` and returns an object with ``.loss`` and ``.logits``.

Batches. Each epoch has an example order (``batch_order(epoch)``, or a permutation drawn from a
``torch.Generator`` seeded by (seed, epoch), never from the global RNG). The order is cut into
*global batches* of ``batch_size * num_processes`` examples, and process ``p`` takes the ``p``-th
contiguous slice of each. ``gradient_accumulation_steps`` global batches make one optimizer step.
So a step sees the same examples whatever the process count: two processes with ``batch_size=8``
take the same steps as one process with ``batch_size=16``.

Loss weighting. The gradient of a step is the gradient of the mean loss over the step's examples:
each micro-batch's (mean) loss is weighted by its share of the step's examples. Accelerate's own
``accumulate()`` divides every micro-batch by a fixed count instead, which over-weights a short last
micro-batch and needs Accelerate's DataLoader wrapper to notice the end of an epoch; hence the
accumulation here is explicit (``accelerator.no_sync`` on all but the last micro-batch).

Resume. A checkpoint stores the position (epoch, global batches done in it), trainable parameters,
optimizer, scheduler and every process's RNG state; the order of an epoch is a function of
(seed, epoch). A run killed and resumed therefore ends with the same weights as one that was not.
Evaluation runs under a forked RNG, so it never shifts the dropout masks of training.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, send_to_device, set_seed
from tqdm.auto import tqdm

from peftkit.errors import PeftkitError
from peftkit.io import write_json, write_tensors
from peftkit.train import checkpoint as ckpt
from peftkit.train import tracking

BEST_DIRNAME = "best"
METRICS_FILENAME = "metrics.json"
EVAL_METRICS = ("accuracy", "loss")
_SCHEDULERS = ("linear", "cosine", "constant")
_PRECISIONS = ("no", "bf16", "fp16")
_STATE_FORMAT = 1


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

        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PeftkitError(f"TrainingArguments.{name} must be a whole number >= 1, got {value!r}")

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
        if self.lr_scheduler not in _SCHEDULERS:
            raise PeftkitError(
                f"TrainingArguments.lr_scheduler must be one of {', '.join(_SCHEDULERS)}, got {self.lr_scheduler!r}"
            )
        if self.mixed_precision not in _PRECISIONS:
            raise PeftkitError(
                f"TrainingArguments.mixed_precision must be one of {', '.join(_PRECISIONS)}, "
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
class TrainResult:
    """What ``train`` returns; ``metrics.json`` holds the same fields (``to_dict()``)."""

    final_eval: dict[str, float] | None  # eval metrics of the last step, e.g. {"loss": .., "accuracy": ..}
    best_eval: dict[str, float] | None  # eval metrics at the best step (its weights are in the model)
    best_step: int | None
    metric_for_best: str
    history: list[dict[str, Any]]  # one record per epoch end and per evaluation
    train_loss: float | None  # mean loss over all optimizer steps of the run
    final_train_loss: float | None  # mean loss since the previous history record
    steps: int
    epochs: float
    examples_seen: int
    examples_per_second: float  # this invocation: examples / training time (eval and saving excluded)
    wall_time_s: float  # this invocation
    peak_rss_mb: float  # resident set size high-water mark of the main process
    peak_cuda_memory_mb: float | None  # torch.cuda.max_memory_allocated, where CUDA is used
    trainable_parameters: int
    total_parameters: int
    num_processes: int
    global_batch_size: int  # examples per optimizer step
    resumed_from: str | None
    output_dir: str
    # This invocation: median seconds of an optimizer step (batches, forward, backward, optimizer; no evaluation).
    median_step_time_s: float | None = None
    stopped_by_time_limit: bool = False  # max_time_s ended the run before epochs / max_steps did

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Progress:
    """Everything about where the run stands; saved as state.json in each checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already trained on
    examples_seen: int = 0
    loss_sum: float = 0.0  # sum over steps of the step's mean loss
    window_loss_sum: float = 0.0  # the same since the last history record
    window_steps: int = 0
    smoothed_loss: float | None = None
    best_metric: float | None = None
    best_step: int | None = None
    best_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    model: torch.nn.Module,
    train_data: Sequence[Any],
    eval_data: Sequence[Any] | None,
    args: TrainingArguments,
    collate_fn: Callable[[list[Any]], Mapping[str, torch.Tensor]],
    *,
    batch_order: Callable[[int], Sequence[int]] | None = None,
    on_save_best: Callable[[torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad; return the metrics.

    ``train_data``/``eval_data`` are sequences of examples; ``collate_fn(list_of_examples)`` makes a
    batch dict of tensors including ``labels``. ``batch_order(epoch)`` may give the order of the
    training examples for an epoch (one index per example); its global batches are consecutive runs of
    ``batch_size * num_processes`` indices. ``on_save_best(model)`` runs on the main process whenever a
    new best evaluation is stored. When there was any evaluation, the best trainable weights are loaded
    back into ``model`` at the end. Writes checkpoints, ``best/`` and ``metrics.json`` under
    ``args.output_dir``. With ``args.gradient_checkpointing`` the transformers model inside ``model``
    recomputes activations in the backward pass for this run (see ``_gradient_checkpointing``).
    """
    args.validate()
    # `cleanup` ends the experiment trackers that _train starts, also when training fails.
    with contextlib.ExitStack() as cleanup, _gradient_checkpointing(model, args.gradient_checkpointing):
        return _train(model, train_data, eval_data, args, collate_fn, batch_order=batch_order, on_save_best=on_save_best,
                      cleanup=cleanup)


def _train(model, train_data, eval_data, args: TrainingArguments, collate_fn, *, batch_order, on_save_best,
           cleanup: contextlib.ExitStack) -> TrainResult:
    started = time.perf_counter()
    if len(train_data) == 0:
        raise PeftkitError("train_data is empty; there is nothing to train on")
    has_eval = eval_data is not None and len(eval_data) > 0
    metric_key = args.metric_for_best.removeprefix("eval_")
    if metric_key not in EVAL_METRICS:
        raise PeftkitError(
            f"TrainingArguments.metric_for_best={args.metric_for_best!r} is not an eval metric; "
            f"use one of {', '.join(EVAL_METRICS)}"
        )
    if metric_key == "loss" and args.greater_is_better:
        raise PeftkitError("metric_for_best='loss' keeps the lowest loss: set greater_is_better=False")

    trackers = tracking.trackers_of(args.report_to)
    accelerator = _make_accelerator(args.mixed_precision, **tracking.accelerator_options(trackers, args.output_dir))
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(args.seed, device_specific=True)  # process p gets seed + p; process 0 matches a 1-process run

    params = ckpt.trainable_parameters(model)
    if not params:
        raise PeftkitError(
            "the model has no trainable parameters (none with requires_grad=True); wrap it with an "
            "adapter (get_peft_model) or unfreeze the parameters to train"
        )
    num_trainable = sum(p.numel() for p in params.values())
    num_total = sum(p.numel() for p in model.parameters())

    output_dir = Path(args.output_dir)
    checkpoint_root = ckpt.checkpoints_dir(output_dir)
    global_batch = args.batch_size * world
    batches_per_epoch = math.ceil(len(train_data) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_steps is not None:
        total_steps = args.max_steps
    else:
        total_steps = max(1, math.ceil(args.epochs * steps_per_epoch - 1e-9))
    geometry = {
        "examples_per_global_batch": global_batch,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_train_examples": len(train_data),
    }

    # Methods that choose what to train from data (sparse fine-tuning) look at a few batches first;
    # before a resumed checkpoint is loaded, so they choose exactly as the interrupted run did.
    prepare_training = getattr(model, "prepare_training", None)
    if callable(prepare_training):
        prepare_training(_first_batches(train_data, args, collate_fn, accelerator))
    step_hook = getattr(model, "on_optimizer_step", None)

    resume_from: Path | None = None
    state = _Progress()
    if args.resume:
        resume_from = ckpt.resolve_resume_checkpoint(args.resume, output_dir)
        saved = ckpt.read_state(resume_from)
        _check_geometry(saved.get("geometry", {}), geometry, resume_from)
        if saved.get("seed") != args.seed:
            warnings.warn(
                f"resuming {resume_from} (seed {saved.get('seed')}) with seed {args.seed}: the data order "
                "of later epochs follows the new seed",
                stacklevel=2,
            )
        state = _Progress(**saved["progress"])
        ckpt.load_trainable_into(model, resume_from / ckpt.TRAINABLE_FILENAME)
        accelerator.print(f"resumed from {resume_from} at step {state.step} of {total_steps} (epoch {state.epoch + 1}, "
                          f"batch {state.batch_in_epoch} of that epoch)", flush=True)
    elif ckpt.list_checkpoints(checkpoint_root):
        raise PeftkitError(
            f"{checkpoint_root} already holds checkpoints of an earlier run. Pass resume=True (peftkit train --resume) to continue "
            "it, or use another output_dir (or delete that folder) to start afresh."
        )
    if accelerator.is_main_process:
        ckpt.remove_temporary_folders(checkpoint_root)
        ckpt.remove_temporary_folders(output_dir / BEST_DIRNAME)
    run_config = {**asdict(args), "trainable_parameters": num_trainable, "total_parameters": num_total,
                  "num_processes": world, "total_steps": total_steps}
    cleanup.enter_context(tracking.tracked_run(accelerator, trackers, output_dir, run_config))
    on_cuda = accelerator.device.type == "cuda"

    optimizer = torch.optim.AdamW(
        _parameter_groups(params, args.weight_decay), lr=args.learning_rate, weight_decay=args.weight_decay
    )
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_multiplier(args.lr_scheduler, warmup_steps, total_steps)
    )
    if resume_from is not None:
        optimizer.load_state_dict(ckpt.load_torch_file(resume_from / ckpt.OPTIMIZER_FILENAME))
        scheduler.load_state_dict(ckpt.load_torch_file(resume_from / ckpt.SCHEDULER_FILENAME))

    # The scheduler stays outside prepare(): Accelerate's scheduler wrapper steps it once per process.
    was_training = model.training
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    model.train()

    if resume_from is not None:
        scaler_file = resume_from / ckpt.SCALER_FILENAME
        if accelerator.scaler is not None and scaler_file.is_file():
            accelerator.scaler.load_state_dict(ckpt.load_torch_file(scaler_file))
        rng_file = resume_from / ckpt.rng_filename(rank)
        if rng_file.is_file():
            ckpt.restore_rng_state(ckpt.load_torch_file(rng_file))
        else:
            warnings.warn(
                f"{resume_from} has no RNG state for process {rank} (it was written by fewer processes); "
                "dropout masks after the resume will differ from an uninterrupted run",
                stacklevel=2,
            )

    def epoch_order(epoch: int) -> list[int]:
        if batch_order is None:
            generator = torch.Generator().manual_seed((args.seed * 1_000_003 + epoch) % (2**63))
            return torch.randperm(len(train_data), generator=generator).tolist()
        order = [int(i) for i in batch_order(epoch)]
        if len(order) != len(train_data):
            raise PeftkitError(
                f"batch_order({epoch}) returned {len(order)} indices but train_data has {len(train_data)} "
                "examples; it must give one index per training example"
            )
        return order

    def evaluate() -> dict[str, float]:
        return _evaluate(model, eval_data, args.eval_batch_size, collate_fn, accelerator)

    def save_checkpoint() -> None:
        # Every process puts its RNG state into the folder; the main process adds the rest and renames it.
        temporary = ckpt.temporary_checkpoint_dir(checkpoint_root, state.step)
        if accelerator.is_main_process:
            ckpt.prepare_temporary_dir(checkpoint_root, state.step)
        accelerator.wait_for_everyone()
        ckpt.write_process_rng(temporary, rank)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.finish_checkpoint(
                temporary,
                step=state.step,
                trainable=ckpt.trainable_parameters(model),
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                state={
                    "format": _STATE_FORMAT,
                    "seed": args.seed,
                    "num_processes": world,
                    "total_steps": total_steps,
                    "geometry": geometry,
                    "progress": asdict(state),
                },
                keep=args.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    def record(evaluation: dict[str, float] | None) -> None:
        """Append a history record; store the weights if the evaluation is the best so far."""
        entry = {
            "epoch": round(state.step / steps_per_epoch, 4),
            "step": state.step,
            "train_loss": state.window_loss_sum / state.window_steps if state.window_steps else None,
            "eval": evaluation,
        }
        state.history.append(entry)
        state.window_loss_sum, state.window_steps = 0.0, 0
        if evaluation is None:
            return
        if trackers:
            accelerator.log({f"eval/{key}": value for key, value in evaluation.items()}, step=state.step)
        state.last_eval, state.last_eval_step = evaluation, state.step
        if metric_key not in evaluation:
            raise PeftkitError(
                f"metric_for_best={args.metric_for_best!r} is not among the eval metrics "
                f"({', '.join(sorted(evaluation))}); pick one of those"
            )
        value = evaluation[metric_key]
        improved = state.best_metric is None or (
            value > state.best_metric if args.greater_is_better else value < state.best_metric
        )
        if improved:
            state.best_metric, state.best_step, state.best_eval = value, state.step, evaluation
            if accelerator.is_main_process:
                best_dir = output_dir / BEST_DIRNAME
                write_tensors(best_dir / ckpt.TRAINABLE_FILENAME, ckpt.trainable_parameters(model))
                write_json(best_dir / "state.json", {"step": state.step, "metrics": evaluation})
                if on_save_best is not None:
                    on_save_best(model)
            accelerator.wait_for_everyone()
        if progress_bar is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items())
            progress_bar.write(f"step {state.step} (epoch {entry['epoch']:g}): eval {shown}")

    trainable_list = list(params.values())
    show_progress = args.progress and accelerator.is_main_process
    progress_bar = (
        tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
        if show_progress
        else None
    )
    train_time = 0.0
    step_times: list[float] = []
    out_of_time = False
    examples_this_run = 0
    last_saved_step = state.step if resume_from is not None else None

    while state.step < total_steps and not out_of_time:
        order = epoch_order(state.epoch)
        batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
        while state.batch_in_epoch < len(batches) and state.step < total_steps:
            step_started = time.perf_counter()
            group = batches[state.batch_in_epoch : state.batch_in_epoch + args.gradient_accumulation_steps]
            step_examples = sum(len(b) for b in group)
            step_loss = torch.zeros((), dtype=_sum_dtype(accelerator.device), device=accelerator.device)
            for position, global_indices in enumerate(group):
                local = _process_slice(global_indices, rank, world)
                # A process left without examples (a short last batch) runs one with weight 0, so
                # every process makes the same forward/backward calls that DDP expects.
                share = len(local) / step_examples
                batch = _collate(collate_fn, [train_data[i] for i in (local or global_indices[:1])], accelerator)
                last_micro_batch = position == len(group) - 1
                with contextlib.nullcontext() if last_micro_batch else accelerator.no_sync(prepared_model):
                    loss = _loss_of(prepared_model(**batch))
                    # DDP averages gradients over processes, hence the factor `world`.
                    accelerator.backward(loss * (share * world))
                step_loss += loss.detach().to(step_loss.dtype) * share
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable_list, args.max_grad_norm)
            step_lr = scheduler.get_last_lr()[0]
            prepared_optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            if callable(step_hook):  # adaptive-rank LoRA reads the gradients here, before they are cleared
                step_hook(state.step + 1, total_steps)
            prepared_optimizer.zero_grad(set_to_none=True)
            if world > 1:
                step_loss = accelerator.reduce(step_loss, reduction="sum")
            loss_value = float(step_loss)

            state.step += 1
            state.batch_in_epoch += len(group)
            state.examples_seen += step_examples
            state.loss_sum += loss_value
            state.window_loss_sum += loss_value
            state.window_steps += 1
            state.smoothed_loss = (
                loss_value if state.smoothed_loss is None else 0.9 * state.smoothed_loss + 0.1 * loss_value
            )
            examples_this_run += step_examples
            step_times.append(time.perf_counter() - step_started)
            train_time += step_times[-1]
            if trackers:
                logged = {
                    "train/loss": loss_value,
                    "train/learning_rate": step_lr,
                    "train/examples_per_second": examples_this_run / max(train_time, 1e-9),  # as the progress bar
                    "train/epoch": state.step / steps_per_epoch,
                    "train/peak_rss_mb": _peak_rss_mb(),
                }
                if on_cuda:
                    logged["train/peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
                accelerator.log(logged, step=state.step)
            if progress_bar is not None:
                progress_bar.set_postfix(
                    loss=f"{state.smoothed_loss:.4f}",
                    lr=f"{step_lr:.2e}",
                    ex_s=f"{examples_this_run / max(train_time, 1e-9):.0f}",
                    refresh=False,
                )
                progress_bar.update(1)

            epoch_done = state.batch_in_epoch >= len(batches)
            eval_now = has_eval and (
                (args.eval_steps is not None and state.step % args.eval_steps == 0)
                or (epoch_done and args.eval_every_epoch)
            )
            if eval_now or epoch_done:
                record(evaluate() if eval_now else None)
            if epoch_done:
                state.epoch += 1
                state.batch_in_epoch = 0
            if epoch_done or (args.save_steps is not None and state.step % args.save_steps == 0):
                save_checkpoint()
                last_saved_step = state.step
            if args.max_time_s is not None and state.step < total_steps:
                out_of_time = train_time >= args.max_time_s
                if world > 1:  # every process stops at the same step, or DDP would wait forever
                    flag = torch.tensor([float(out_of_time)], device=accelerator.device)
                    out_of_time = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if epoch_done or out_of_time:
                break  # the next epoch has its own order; out of time, the end of the run follows

    # The run may stop mid-epoch (max_steps, fractional epochs): evaluate and save that last step too.
    recorded_at_end = True
    if has_eval and state.last_eval_step != state.step:
        record(evaluate())
    elif state.window_steps:
        record(None)
    else:
        recorded_at_end = False
    if recorded_at_end or last_saved_step != state.step:
        save_checkpoint()
    if progress_bar is not None:
        progress_bar.close()

    best_file = output_dir / BEST_DIRNAME / ckpt.TRAINABLE_FILENAME
    if state.best_step is not None:
        accelerator.wait_for_everyone()
        if state.best_step != state.step:
            ckpt.load_trainable_into(model, best_file)
    accelerator.unwrap_model(prepared_model, keep_fp32_wrapper=False)  # undo the autocast forward patch
    model.train(was_training)

    result = TrainResult(
        final_eval=state.last_eval,
        best_eval=state.best_eval,
        best_step=state.best_step,
        metric_for_best=metric_key,
        history=state.history,
        train_loss=state.loss_sum / state.step if state.step else None,
        final_train_loss=_last_train_loss(state.history),
        steps=state.step,
        epochs=round(state.step / steps_per_epoch, 4),
        examples_seen=state.examples_seen,
        examples_per_second=examples_this_run / train_time if train_time > 0 else 0.0,
        wall_time_s=time.perf_counter() - started,
        peak_rss_mb=_peak_rss_mb(),
        peak_cuda_memory_mb=(
            torch.cuda.max_memory_allocated(accelerator.device) / 2**20 if accelerator.device.type == "cuda" else None
        ),
        trainable_parameters=num_trainable,
        total_parameters=num_total,
        num_processes=world,
        global_batch_size=global_batch * args.gradient_accumulation_steps,
        resumed_from=str(resume_from) if resume_from is not None else None,
        output_dir=str(output_dir),
        median_step_time_s=statistics.median(step_times) if step_times else None,
        stopped_by_time_limit=out_of_time,
    )
    if accelerator.is_main_process:
        write_json(output_dir / METRICS_FILENAME, result.to_dict())
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return result


# --------------------------------------------------------------------------- pieces


@contextlib.contextmanager
def _gradient_checkpointing(model: torch.nn.Module, enabled: bool):
    """Gradient checkpointing on the transformers model in ``model`` (itself, or a PeftModel's base) while inside.

    Checkpointing is switched on with ``use_reentrant=False``: the reentrant form computes no
    gradient through a checkpointed block whose inputs do not require grad, which is every block of
    a frozen base ("element 0 of tensors does not require grad", or LoRA weights that silently never
    train). ``config.use_cache`` is off meanwhile, as a key/value cache is useless in training and
    transformers would switch it off with a warning. Both are restored on the way out.
    """
    if not enabled:
        yield
        return
    from transformers import PreTrainedModel

    target = model
    for _ in range(4):  # a PeftModel, possibly inside another wrapper, keeps the base as .base_model
        inner = getattr(target, "base_model", None)
        if isinstance(target, PreTrainedModel) or not isinstance(inner, torch.nn.Module) or inner is target:
            break
        target = inner
    if not isinstance(target, PreTrainedModel):
        raise PeftkitError(
            f"gradient_checkpointing=True needs a Hugging Face transformers model, but {type(target).__name__} "
            "is not one; train without gradient checkpointing"
        )
    if not target.supports_gradient_checkpointing:
        raise PeftkitError(
            f"{type(target).__name__} does not support gradient checkpointing (transformers does not implement it "
            "for this architecture); train without it"
        )
    # transformers 5 renamed gradient_* to activation_checkpointing_*, keeping the old names with a warning.
    new_names = hasattr(target, "activation_checkpointing_enable")
    enable = target.activation_checkpointing_enable if new_names else target.gradient_checkpointing_enable
    disable = target.activation_checkpointing_disable if new_names else target.gradient_checkpointing_disable
    was_on = target.is_activation_checkpointing if new_names else target.is_gradient_checkpointing
    had_input_grad_hook = bool(getattr(target, "_require_grads_hook", None))
    config = getattr(target, "config", None)
    use_cache = getattr(config, "use_cache", None)

    enable({"use_reentrant": False})
    # transformers also hooks the input embeddings to make their output require grad, which only the
    # reentrant form needs; it would make every backward pass run down to the embeddings, even when
    # only the top layers are adapted, and it would outlive the run.
    if not had_input_grad_hook and getattr(target, "_require_grads_hook", None) is not None:
        target.disable_input_require_grads()
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if not was_on:
            disable()
        if use_cache is not None:
            config.use_cache = use_cache


def _make_accelerator(mixed_precision: str, **options) -> Accelerator:
    """An Accelerator for one run; ``options`` go to it as they are (the trackers' log_with and project_dir)."""
    # Accumulation is done here (see the module docstring); num_steps=1 also keeps an
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS from the environment from scaling the loss.
    plugin = GradientAccumulationPlugin(num_steps=1)
    # Under torchrun (`accelerate launch --multi_gpu`) on a machine without an accelerator, Accelerate
    # treats every process as a lone one unless told cpu=True; `--cpu` itself starts one process only.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator_device()
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


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _check_geometry(saved: Mapping[str, int], current: Mapping[str, int], where: Path) -> None:
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise PeftkitError(
                f"cannot resume {where}: it was trained with {key}={saved[key]}, this run has {value}. "
                "The position in the epoch counts global batches, so resume with the same train data, "
                "batch_size x num_processes and gradient_accumulation_steps."
            )


def _parameter_groups(params: Mapping[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    # Biases and norm scales (1-D) are not decayed, as is usual for transformers.
    decayed = [p for p in params.values() if p.ndim >= 2]
    not_decayed = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _lr_multiplier(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
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


def _process_slice(global_indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    n = len(global_indices)
    return list(global_indices[rank * n // world : (rank + 1) * n // world])


def _first_batches(train_data, args: TrainingArguments, collate_fn, accelerator: Accelerator):
    """Training batches in a seed-fixed order, the same on every process, made as they are read."""
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_data), generator=generator).tolist()
    for start in range(0, len(order), args.batch_size):
        yield _collate(collate_fn, [train_data[i] for i in order[start:start + args.batch_size]], accelerator)


def _collate(collate_fn, examples: list, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    batch = collate_fn(examples)
    if not isinstance(batch, Mapping):
        raise PeftkitError(f"collate_fn must return a dict of tensors (model(**batch)), got {type(batch).__name__}")
    return send_to_device(dict(batch), accelerator.device)


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise PeftkitError(
            "the model returned no loss: it must return an object with .loss when the batch holds "
            "'labels' (check that collate_fn puts the labels under the key 'labels')"
        )
    return loss


@torch.no_grad()
def _evaluate(model, eval_data, batch_size: int, collate_fn, accelerator: Accelerator) -> dict[str, float]:
    """Loss and accuracy over ``eval_data``; every process takes a contiguous share, sums are reduced.

    loss: mean of the model's batch losses weighted by batch size. accuracy: argmax of the logits
    against ``labels``, ignoring positions labelled -100 (for a causal LM, the next token's label:
    token accuracy on the labelled tokens). The unwrapped model is used, so processes
    need not run the same number of batches; the RNG is forked so evaluation draws no training
    randomness.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = _process_slice(range(len(eval_data)), rank, world)
    shifted = _predicts_next_token(model)
    loss_sum, examples, correct, labelled = 0.0, 0, 0, 0
    devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=devices):
        for start in range(0, len(shard), batch_size):
            indices = shard[start : start + batch_size]
            batch = _collate(collate_fn, [eval_data[i] for i in indices], accelerator)
            output = model(**batch)
            loss_sum += float(_loss_of(output)) * len(indices)
            examples += len(indices)
            logits = getattr(output, "logits", None)
            labels = batch.get("labels")
            if logits is not None and labels is not None:
                predictions = logits.argmax(dim=-1)
                if predictions.dim() == 2 and labels.dim() == 2 and predictions.shape[1] > labels.shape[1]:
                    # Prompt tuning on a causal LM returns logits for its virtual tokens first; peft does the same.
                    predictions = predictions[:, -labels.shape[1]:]
                if shifted:
                    # A causal LM's logits at position t predict token t + 1 (its loss shifts the same way).
                    predictions, labels = predictions[:, :-1], labels[:, 1:]
                if predictions.shape != labels.shape:
                    raise PeftkitError(
                        f"cannot compute accuracy: argmax of the logits has shape {tuple(predictions.shape)} "
                        f"but labels have shape {tuple(labels.shape)}"
                    )
                counted = labels != -100
                correct += int((predictions == labels)[counted].sum())
                labelled += int(counted.sum())
    model.train(was_training)
    if world > 1:
        sums = torch.tensor(
            [loss_sum, examples, correct, labelled], dtype=_sum_dtype(accelerator.device), device=accelerator.device
        )
        loss_sum, examples, correct, labelled = accelerator.reduce(sums, reduction="sum").tolist()
    metrics = {"loss": loss_sum / examples if examples else float("nan")}
    if labelled:
        metrics["accuracy"] = correct / labelled
    return metrics


def _predicts_next_token(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the transformers model it wraps) is a causal LM, whose labels are shifted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    inner = getattr(model, "base_model", None)
    return any(type(m).__name__ in causal_names for m in (model, inner) if m is not None)


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _last_train_loss(history: list[dict[str, Any]]) -> float | None:
    for record in reversed(history):
        if record["train_loss"] is not None:
            return record["train_loss"]
    return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
