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

Stages. ``Trainer`` runs one training in named stages: ``plan`` (steps, schedule, geometry; the data
order of an epoch is ``epoch_order``), ``start`` (fresh or resumed position), ``build_optimizer``,
``step`` (forward, backward, optimizer), ``count_step``, ``evaluate``, ``record`` / ``keep_best``,
``save_checkpoint`` and ``finish``. Evaluation and the keep-best rule live in peftkit.train.evaluation,
and the checkpoint format in peftkit.train.checkpoint, which co-training shares. ``TrainingArguments``
lives in peftkit.train.arguments, ``StepPlan`` in peftkit.train.schedule and ``gradient_checkpointing``
in its own module; all three are importable from here too.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from peftkit.errors import PeftkitError
from peftkit.io import write_json, write_tensors
from peftkit.train import checkpoint as ckpt
from peftkit.train import tracking
from peftkit.train.arguments import TrainingArguments
from peftkit.train.evaluation import (
    EVAL_METRICS,
    close_history_window,
    collate_to_device,
    evaluate,
    keep_best,
    loss_of,
    sum_dtype,
)
from peftkit.train.gradient_checkpointing import gradient_checkpointing
from peftkit.train.measure import peak_cuda_memory_mb, peak_rss_mb
from peftkit.train.processes import make_accelerator, process_slice
from peftkit.train.schedule import StepPlan, lr_multiplier, warmup_steps

__all__ = ["BEST_DIRNAME", "METRICS_FILENAME", "StepPlan", "TrainResult", "Trainer", "TrainingArguments",
           "gradient_checkpointing", "train"]

BEST_DIRNAME = "best"
METRICS_FILENAME = "metrics.json"
_STATE_FORMAT = 1


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
    recomputes activations in the backward pass for this run (see ``gradient_checkpointing``).
    """
    args.validate()
    # `cleanup` ends the experiment trackers that the trainer starts, also when training fails.
    with contextlib.ExitStack() as cleanup, gradient_checkpointing(model, args.gradient_checkpointing):
        trainer = Trainer(model, train_data, eval_data, args, collate_fn, batch_order=batch_order,
                          on_save_best=on_save_best)
        return trainer.run(cleanup)


class Trainer:
    """One run of ``train``, stage by stage (see the module docstring). Use ``train``; this is its inside."""

    def __init__(self, model: torch.nn.Module, train_data: Sequence[Any], eval_data: Sequence[Any] | None,
                 args: TrainingArguments, collate_fn, *, batch_order=None, on_save_best=None):
        self.model, self.train_data, self.eval_data, self.args = model, train_data, eval_data, args
        self.collate_fn, self.batch_order, self.on_save_best = collate_fn, batch_order, on_save_best
        self.output_dir = Path(args.output_dir)
        self.checkpoint_root = ckpt.checkpoints_dir(self.output_dir)
        self.state = _Progress()
        self.resume_from: Path | None = None
        self.progress_bar = None
        # This invocation's clock: training time (steps only), step times, examples, the time limit.
        self.train_time = 0.0
        self.step_times: list[float] = []
        self.examples_this_run = 0
        self.out_of_time = False
        self.last_saved_step: int | None = None

    def run(self, cleanup: contextlib.ExitStack) -> TrainResult:
        """All stages in order; ``cleanup`` ends the trackers."""
        self.started = time.perf_counter()
        self.check_inputs()
        self.plan()
        self.start()
        run_config = {**asdict(self.args), "trainable_parameters": self.num_trainable,
                      "total_parameters": self.num_total, "num_processes": self.world,
                      "total_steps": self.steps.total_steps}
        cleanup.enter_context(tracking.tracked_run(self.accelerator, self.trackers, self.output_dir, run_config))
        self.build_optimizer()
        self.restore_process_state()
        if self.args.progress and self.accelerator.is_main_process:
            self.progress_bar = tqdm(total=self.steps.total_steps, initial=self.state.step, desc="train", unit="step",
                                     dynamic_ncols=True)
        self.last_saved_step = self.state.step if self.resume_from is not None else None
        self.train_epochs()
        return self.finish()

    # -- plan --------------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        if len(self.train_data) == 0:
            raise PeftkitError("train_data is empty; there is nothing to train on")
        self.has_eval = self.eval_data is not None and len(self.eval_data) > 0
        self.metric_key = self.args.metric_for_best.removeprefix("eval_")
        if self.metric_key not in EVAL_METRICS:
            raise PeftkitError(
                f"TrainingArguments.metric_for_best={self.args.metric_for_best!r} is not an eval metric; "
                f"use one of {', '.join(EVAL_METRICS)}"
            )
        if self.metric_key == "loss" and self.args.greater_is_better:
            raise PeftkitError("metric_for_best='loss' keeps the lowest loss: set greater_is_better=False")

    def plan(self) -> None:
        """The accelerator, the seed, the parameters to train and the step plan."""
        args = self.args
        self.trackers = tracking.trackers_of(args.report_to)
        self.accelerator = make_accelerator(args.mixed_precision,
                                            **tracking.accelerator_options(self.trackers, args.output_dir))
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        set_seed(args.seed, device_specific=True)  # process p gets seed + p; process 0 matches a 1-process run
        self.params = ckpt.trainable_parameters(self.model)
        if not self.params:
            raise PeftkitError(
                "the model has no trainable parameters (none with requires_grad=True); wrap it with an "
                "adapter (get_peft_model) or unfreeze the parameters to train"
            )
        self.num_trainable = sum(p.numel() for p in self.params.values())
        self.num_total = sum(p.numel() for p in self.model.parameters())
        self.steps = StepPlan.of(len(self.train_data), args, self.world)

    def epoch_order(self, epoch: int) -> list[int]:
        """The order of the training examples in ``epoch``: ``batch_order(epoch)`` or a (seed, epoch) permutation."""
        if self.batch_order is None:
            generator = torch.Generator().manual_seed((self.args.seed * 1_000_003 + epoch) % (2**63))
            return torch.randperm(len(self.train_data), generator=generator).tolist()
        order = [int(i) for i in self.batch_order(epoch)]
        if len(order) != len(self.train_data):
            raise PeftkitError(
                f"batch_order({epoch}) returned {len(order)} indices but train_data has {len(self.train_data)} "
                "examples; it must give one index per training example"
            )
        return order

    # -- start or resume ---------------------------------------------------------------------------
    def start(self) -> None:
        """Let the model prepare, then take the position (and weights) of a resumed checkpoint, if any."""
        # Methods that choose what to train from data (sparse fine-tuning) look at a few batches first;
        # before a resumed checkpoint is loaded, so they choose exactly as the interrupted run did.
        prepare_training = getattr(self.model, "prepare_training", None)
        if callable(prepare_training):
            prepare_training(_first_batches(self.train_data, self.args, self.collate_fn, self.accelerator))
        if self.args.resume:
            self.resume_position()
        elif ckpt.list_checkpoints(self.checkpoint_root):
            raise PeftkitError(
                f"{self.checkpoint_root} already holds checkpoints of an earlier run. Pass resume=True (peftkit train "
                "--resume) to continue it, or use another output_dir (or delete that folder) to start afresh."
            )
        if self.accelerator.is_main_process:
            ckpt.remove_temporary_folders(self.checkpoint_root)
            ckpt.remove_temporary_folders(self.output_dir / BEST_DIRNAME)

    def resume_position(self) -> None:
        args = self.args
        self.resume_from = resume_from = ckpt.resolve_resume_checkpoint(args.resume, self.output_dir)
        saved = ckpt.read_state(resume_from)
        _check_geometry(saved.get("geometry", {}), self.steps.geometry, resume_from)
        if saved.get("seed") != args.seed:
            warnings.warn(
                f"resuming {resume_from} (seed {saved.get('seed')}) with seed {args.seed}: the data order "
                "of later epochs follows the new seed",
                stacklevel=4,
            )
        self.state = _Progress(**saved["progress"])
        ckpt.load_trainable_into(self.model, resume_from / ckpt.TRAINABLE_FILENAME)
        self.accelerator.print(
            f"resumed from {resume_from} at step {self.state.step} of {self.steps.total_steps} "
            f"(epoch {self.state.epoch + 1}, batch {self.state.batch_in_epoch} of that epoch)", flush=True)

    def build_optimizer(self) -> None:
        """AdamW and its schedule (restored when resuming), and the model and optimizer prepared by Accelerate."""
        args, total_steps = self.args, self.steps.total_steps
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(self.params, args.weight_decay), lr=args.learning_rate, weight_decay=args.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(args.lr_scheduler, warmup_steps(args.warmup_ratio, total_steps), total_steps)
        )
        if self.resume_from is not None:
            self.optimizer.load_state_dict(ckpt.load_torch_file(self.resume_from / ckpt.OPTIMIZER_FILENAME))
            self.scheduler.load_state_dict(ckpt.load_torch_file(self.resume_from / ckpt.SCHEDULER_FILENAME))
        # The scheduler stays outside prepare(): Accelerate's scheduler wrapper steps it once per process.
        self.was_training = self.model.training
        self.prepared_model, self.prepared_optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model.train()

    def restore_process_state(self) -> None:
        """A resumed run's gradient scaler and this process's RNG state."""
        if self.resume_from is None:
            return
        scaler_file = self.resume_from / ckpt.SCALER_FILENAME
        if self.accelerator.scaler is not None and scaler_file.is_file():
            self.accelerator.scaler.load_state_dict(ckpt.load_torch_file(scaler_file))
        rng_file = self.resume_from / ckpt.rng_filename(self.rank)
        if rng_file.is_file():
            ckpt.restore_rng_state(ckpt.load_torch_file(rng_file))
        else:
            warnings.warn(
                f"{self.resume_from} has no RNG state for process {self.rank} (it was written by fewer processes); "
                "dropout masks after the resume will differ from an uninterrupted run",
                stacklevel=3,
            )

    # -- steps -------------------------------------------------------------------------------------
    def train_epochs(self) -> None:
        """Optimizer steps until the plan's last step (or the time limit), evaluating and saving on the way."""
        state, total_steps, accumulation = self.state, self.steps.total_steps, self.args.gradient_accumulation_steps
        while state.step < total_steps and not self.out_of_time:
            order = self.epoch_order(state.epoch)
            global_batch = self.steps.global_batch
            batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
            while state.batch_in_epoch < len(batches) and state.step < total_steps:
                step_started = time.perf_counter()
                group = batches[state.batch_in_epoch : state.batch_in_epoch + accumulation]
                loss_value, step_lr = self.step(group)
                self.count_step(group, loss_value, step_lr, step_started)
                epoch_done = state.batch_in_epoch >= len(batches)
                self.after_step(epoch_done)
                if epoch_done or self.out_of_time:
                    break  # the next epoch has its own order; out of time, the end of the run follows

    def step(self, group: list[list[int]]) -> tuple[float, float]:
        """One optimizer step over ``group`` (global batches); returns (the step's mean loss, its learning rate)."""
        accelerator, rank, world = self.accelerator, self.rank, self.world
        step_examples = sum(len(b) for b in group)
        step_loss = torch.zeros((), dtype=sum_dtype(accelerator.device), device=accelerator.device)
        for position, global_indices in enumerate(group):
            local = process_slice(global_indices, rank, world)
            # A process left without examples (a short last batch) runs one with weight 0, so
            # every process makes the same forward/backward calls that DDP expects.
            share = len(local) / step_examples
            examples = [self.train_data[i] for i in (local or global_indices[:1])]
            batch = collate_to_device(self.collate_fn, examples, accelerator.device)
            last_micro_batch = position == len(group) - 1
            with contextlib.nullcontext() if last_micro_batch else accelerator.no_sync(self.prepared_model):
                loss = loss_of(self.prepared_model(**batch))
                # DDP averages gradients over processes, hence the factor `world`.
                accelerator.backward(loss * (share * world))
            step_loss += loss.detach().to(step_loss.dtype) * share
        if self.args.max_grad_norm is not None:
            accelerator.clip_grad_norm_(list(self.params.values()), self.args.max_grad_norm)
        step_lr = self.scheduler.get_last_lr()[0]
        self.prepared_optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        step_hook = getattr(self.model, "on_optimizer_step", None)
        if callable(step_hook):  # adaptive-rank LoRA reads the gradients here, before they are cleared
            step_hook(self.state.step + 1, self.steps.total_steps)
        self.prepared_optimizer.zero_grad(set_to_none=True)
        if world > 1:
            step_loss = accelerator.reduce(step_loss, reduction="sum")
        return float(step_loss), step_lr

    def count_step(self, group: list[list[int]], loss_value: float, step_lr: float, step_started: float) -> None:
        """Move the position on by one step; log it to the trackers and the progress bar."""
        state = self.state
        step_examples = sum(len(b) for b in group)
        state.step += 1
        state.batch_in_epoch += len(group)
        state.examples_seen += step_examples
        state.loss_sum += loss_value
        state.window_loss_sum += loss_value
        state.window_steps += 1
        state.smoothed_loss = loss_value if state.smoothed_loss is None else 0.9 * state.smoothed_loss + 0.1 * loss_value
        self.examples_this_run += step_examples
        self.step_times.append(time.perf_counter() - step_started)
        self.train_time += self.step_times[-1]
        examples_per_second = self.examples_this_run / max(self.train_time, 1e-9)
        if self.trackers:
            logged = {
                "train/loss": loss_value,
                "train/learning_rate": step_lr,
                "train/examples_per_second": examples_per_second,  # as the progress bar
                "train/epoch": state.step / self.steps.steps_per_epoch,
                "train/peak_rss_mb": peak_rss_mb(),
            }
            cuda_memory = peak_cuda_memory_mb(self.accelerator.device)
            if cuda_memory is not None:
                logged["train/peak_cuda_memory_mb"] = cuda_memory
            self.accelerator.log(logged, step=state.step)
        if self.progress_bar is not None:
            self.progress_bar.set_postfix(loss=f"{state.smoothed_loss:.4f}", lr=f"{step_lr:.2e}",
                                          ex_s=f"{examples_per_second:.0f}", refresh=False)
            self.progress_bar.update(1)

    def after_step(self, epoch_done: bool) -> None:
        """Evaluate, end the epoch, checkpoint and check the time limit, as due after a step."""
        args, state = self.args, self.state
        eval_now = self.has_eval and (
            (args.eval_steps is not None and state.step % args.eval_steps == 0)
            or (epoch_done and args.eval_every_epoch)
        )
        if eval_now or epoch_done:
            self.record(self.evaluate() if eval_now else None)
        if epoch_done:
            state.epoch += 1
            state.batch_in_epoch = 0
        if epoch_done or (args.save_steps is not None and state.step % args.save_steps == 0):
            self.save_checkpoint()
            self.last_saved_step = state.step
        if args.max_time_s is not None and state.step < self.steps.total_steps:
            out_of_time = self.train_time >= args.max_time_s
            if self.world > 1:  # every process stops at the same step, or DDP would wait forever
                flag = torch.tensor([float(out_of_time)], device=self.accelerator.device)
                out_of_time = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
            self.out_of_time = out_of_time

    # -- evaluate and keep the best ----------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_data, self.args.eval_batch_size, self.collate_fn,
                        self.accelerator.device, accelerator=self.accelerator)

    def record(self, evaluation: dict[str, float] | None) -> None:
        """Append a history record; store the weights if the evaluation is the best so far."""
        state = self.state
        entry = close_history_window(state, state.step, round(state.step / self.steps.steps_per_epoch, 4), evaluation)
        if evaluation is None:
            return
        if self.trackers:
            self.accelerator.log({f"eval/{key}": value for key, value in evaluation.items()}, step=state.step)
        state.last_eval, state.last_eval_step = evaluation, state.step
        self.keep_best(evaluation)
        if self.progress_bar is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items())
            self.progress_bar.write(f"step {state.step} (epoch {entry['epoch']:g}): eval {shown}")

    def keep_best(self, evaluation: dict[str, float]) -> None:
        """Write best/ (and call on_save_best) when ``evaluation`` is the best so far."""
        if self.metric_key not in evaluation:
            raise PeftkitError(
                f"metric_for_best={self.args.metric_for_best!r} is not among the eval metrics "
                f"({', '.join(sorted(evaluation))}); pick one of those"
            )
        if not keep_best(self.state, self.state.step, evaluation, self.metric_key, self.args.greater_is_better):
            return
        if self.accelerator.is_main_process:
            best_dir = self.output_dir / BEST_DIRNAME
            write_tensors(best_dir / ckpt.TRAINABLE_FILENAME, ckpt.trainable_parameters(self.model))
            write_json(best_dir / "state.json", {"step": self.state.step, "metrics": evaluation})
            if self.on_save_best is not None:
                self.on_save_best(self.model)
        self.accelerator.wait_for_everyone()

    # -- checkpoint --------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Every process puts its RNG state into the folder; the main process adds the rest and renames it."""
        accelerator, state, root = self.accelerator, self.state, self.checkpoint_root
        temporary = ckpt.temporary_checkpoint_dir(root, state.step)
        if accelerator.is_main_process:
            ckpt.prepare_temporary_dir(root, state.step)
        accelerator.wait_for_everyone()
        ckpt.write_process_rng(temporary, self.rank)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.finish_checkpoint(
                temporary,
                step=state.step,
                trainable=ckpt.trainable_parameters(self.model),
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                state={
                    "format": _STATE_FORMAT,
                    "seed": self.args.seed,
                    "num_processes": self.world,
                    "total_steps": self.steps.total_steps,
                    "geometry": self.steps.geometry,
                    "progress": asdict(state),
                },
                keep=self.args.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    # -- finish ------------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """Evaluate and save the last step, load the best weights back, write metrics.json."""
        state = self.state
        # The run may stop mid-epoch (max_steps, fractional epochs): evaluate and save that last step too.
        recorded_at_end = True
        if self.has_eval and state.last_eval_step != state.step:
            self.record(self.evaluate())
        elif state.window_steps:
            self.record(None)
        else:
            recorded_at_end = False
        if recorded_at_end or self.last_saved_step != state.step:
            self.save_checkpoint()
        if self.progress_bar is not None:
            self.progress_bar.close()
        if state.best_step is not None:
            self.accelerator.wait_for_everyone()
            if state.best_step != state.step:
                ckpt.load_trainable_into(self.model, self.output_dir / BEST_DIRNAME / ckpt.TRAINABLE_FILENAME)
        self.accelerator.unwrap_model(self.prepared_model, keep_fp32_wrapper=False)  # undo the autocast forward patch
        self.model.train(self.was_training)
        result = self.result()
        if self.accelerator.is_main_process:
            write_json(self.output_dir / METRICS_FILENAME, result.to_dict())
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()
        return result

    def result(self) -> TrainResult:
        state, steps = self.state, self.steps
        return TrainResult(
            final_eval=state.last_eval,
            best_eval=state.best_eval,
            best_step=state.best_step,
            metric_for_best=self.metric_key,
            history=state.history,
            train_loss=state.loss_sum / state.step if state.step else None,
            final_train_loss=_last_train_loss(state.history),
            steps=state.step,
            epochs=round(state.step / steps.steps_per_epoch, 4),
            examples_seen=state.examples_seen,
            examples_per_second=self.examples_this_run / self.train_time if self.train_time > 0 else 0.0,
            wall_time_s=time.perf_counter() - self.started,
            peak_rss_mb=peak_rss_mb(),
            peak_cuda_memory_mb=peak_cuda_memory_mb(self.accelerator.device),
            trainable_parameters=self.num_trainable,
            total_parameters=self.num_total,
            num_processes=self.world,
            global_batch_size=steps.global_batch * self.args.gradient_accumulation_steps,
            resumed_from=str(self.resume_from) if self.resume_from is not None else None,
            output_dir=str(self.output_dir),
            median_step_time_s=statistics.median(self.step_times) if self.step_times else None,
            stopped_by_time_limit=self.out_of_time,
        )


# --------------------------------------------------------------------------- pieces


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


def _first_batches(train_data, args: TrainingArguments, collate_fn, accelerator: Accelerator):
    """Training batches in a seed-fixed order, the same on every process, made as they are read."""
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_data), generator=generator).tolist()
    for start in range(0, len(order), args.batch_size):
        examples = [train_data[i] for i in order[start:start + args.batch_size]]
        yield collate_to_device(collate_fn, examples, accelerator.device)


def _last_train_loss(history: list[dict[str, Any]]) -> float | None:
    for record in reversed(history):
        if record["train_loss"] is not None:
            return record["train_loss"]
    return None
