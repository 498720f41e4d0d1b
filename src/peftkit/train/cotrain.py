"""Co-training: one run trains a LoRA adapter per task, every batch mixing the tasks' examples.

All adapters live as slots of one `MixedLoraModel` over the frozen base classifier, each with its own
stacked classification head; every example of a batch runs with its own task's adapter, so a forward
and backward pass over a mixed batch trains several adapters at once. Each adapter keeps what a
separate run would have: its own optimizer state (`SlotAdamW`, one AdamW per slot on the stacked
tensors), learning-rate schedule over its own number of steps, evaluation on its own validation split,
best checkpoint, early stopping and gradient clipping.

Batches ("task batches, length-matched"). Each task cuts its training data into the very batches its
single-task run (`peftkit train --task T`, same seed and batch size) would use: `length_grouped_order`
of its examples for that epoch. So each adapter takes the same number of optimizer steps, on batches
of the same size, under the same schedule as its separate run. A forward pass holds at most one batch
per task (one optimizer step per adapter per pass), and batches of the same padded length share a
pass, so no row is padded beyond what its own batch needs: co-training trains exactly the tokens of
the separate runs, in fewer and larger passes. The passes of an epoch are shuffled, so a task's
batches come in a random order, as in its separate run (only another shuffle). A task that stops
early leaves the passes (saving its compute) and its slot is no longer updated.

Files under `output_dir`: `<task>/` per task (its best adapter in the peft layout plus
`peftkit_run.json`, so `peftkit eval <output_dir>/<task>` and `peftkit predict` use it as they use the
adapter of a single-task run), `metrics.json` (per-task history, steps, wall time) and
`checkpoints/step-<passes>/`, in the single-task trainer's format and written by the same functions
(peftkit.train.checkpoint): the stacked slot tensors, SlotAdamW's state, the RNG state, and the position
and per-task state in state.json, to resume an interrupted run exactly where it stopped.

Where things live: SlotAdamW and clip_slot_gradients in peftkit.train.slot_optimizer, plan_epoch and
task_epoch_batches in peftkit.train.batching, CotrainArguments in peftkit.train.arguments (all
importable from here too).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import PartialState
from tqdm.auto import tqdm

from peftkit import io, zoo
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.mixed import MixedLoraModel
from peftkit.targeting import CLASSIFIER_HEAD_NAMES
from peftkit.train import checkpoint as ckpt
from peftkit.train import tracking
from peftkit.train.arguments import CotrainArguments
from peftkit.train.batching import PaddingCollator, length_grouped_order, plan_epoch, task_epoch_batches, tokenize_examples
from peftkit.train.data import DEFAULT_VALIDATION_FRACTION
from peftkit.train.evaluation import close_history_window, evaluate, keep_best
from peftkit.train.job import RUN_INFO_NAME, default_learning_rate, load_task_with_validation, method_config, model_reference
from peftkit.train.measure import peak_rss_mb
from peftkit.train.processes import make_accelerator, process_count
from peftkit.train.schedule import lr_multiplier, warmup_steps
from peftkit.train.slot_optimizer import SlotAdamW, clip_slot_gradients

__all__ = ["CotrainArguments", "CotrainResult", "SlotAdamW", "TaskResult", "clip_slot_gradients", "cotrain_classifiers",
           "describe", "length_grouped_order", "plan_epoch", "task_epoch_batches", "task_name", "tokenize_examples"]

METRICS_FILENAME = "metrics.json"
CHECKPOINT_DIRNAME = ckpt.CHECKPOINTS_DIRNAME  # checkpoints/step-<passes>/, the single-task trainer's format
# Where peftkit before the shared format kept co-training's checkpoint (state.json + state-E-P.safetensors);
# such a folder is refused with a clear message rather than read (see _check_resume).
LEGACY_CHECKPOINT_DIRNAME = "checkpoint"
_STATE_FORMAT = 2  # format 1: the legacy layout above
_STATE_KIND = "cotrain"


# --------------------------------------------------------------------------- arguments and results


@dataclasses.dataclass
class TaskResult:
    """One task of a co-training run."""

    name: str
    task: str  # as given (a built-in name or a path)
    validation_accuracy: float | None  # at the best evaluation (the saved adapter)
    best_step: int | None
    steps: int  # optimizer steps this adapter took
    total_steps: int  # steps its schedule spans (epochs x its batches per epoch)
    stopped_early: bool
    train_examples: int
    eval_examples: int
    num_labels: int
    trainable_parameters: int  # this adapter's LoRA factors and head
    adapter_dir: str
    history: list[dict[str, Any]]


@dataclasses.dataclass
class CotrainResult:
    """What a co-training run measured; metrics.json holds the same fields."""

    model: str
    method: str
    tasks: dict[str, TaskResult]
    forward_passes: int  # this invocation
    wall_time_s: float  # this invocation, loading included
    train_time_s: float  # this invocation: forward, backward, optimizer (no evaluation, saving, loading)
    examples_per_second: float
    median_pass_time_s: float | None
    padded_tokens: int  # rows x padded length summed over this invocation's passes
    peak_rss_mb: float
    resumed_from: str | None
    output_dir: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _TaskState:
    """Where one task stands; saved in the checkpoint's state.json."""

    steps: int = 0
    examples_seen: int = 0
    loss_sum: float = 0.0  # over all steps, of each step's mean loss
    window_loss_sum: float = 0.0
    window_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_eval: dict[str, float] | None = None
    patience_reference: float | None = None  # best accuracy that reset the patience count
    evaluations_without_gain: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    finished: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def training(self) -> bool:
        return not (self.stopped_early or self.finished)


@dataclasses.dataclass
class _Task:
    name: str
    spec: str
    label_names: list[str]
    train: list[dict]
    evaluation: list[dict] | None
    lengths: list[int]
    slot: int = 0
    total_steps: int = 0
    batches_per_epoch: int = 0


# --------------------------------------------------------------------------- the job


def task_name(spec: str) -> str:
    """The name a task gets in a co-training run (its folder and adapter name): a built-in task's name,
    or a file's / folder's name without its data suffix."""
    spec = str(spec)
    if spec in zoo.list_tasks():
        return spec
    name = Path(spec).name
    for suffix in (".jsonl", ".json", ".csv", ".tsv"):
        name = name.removesuffix(suffix)
    return name


def cotrain_classifiers(
    model: str = "minilm",
    tasks: Sequence[str] = ("sst2", "trec", "cr", "mr"),
    output_dir: str | os.PathLike = "runs/cotrain",
    *,
    config: LoraConfig | None = None,
    method_options: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    max_length: int = 128,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    validation_fraction: float | None = DEFAULT_VALIDATION_FRACTION,
    log=None,
) -> CotrainResult:
    """Train one LoRA adapter per task in a single run over mixed batches; save each task's best adapter.

    tasks: built-in task names or data paths (as `peftkit train --task`); config / method_options: the
    LoRA config of every adapter (default: the single-task job's, `method_config("lora")`); training:
    CotrainArguments fields (epochs, batch_size, learning_rate, patience, ...). Returns a CotrainResult;
    `<output_dir>/<task name>/` holds each task's adapter, loadable as a single-task run's adapter.
    A task without a validation split gets one held out of its train split, as in train_classifier.
    """
    started = time.perf_counter()
    if process_count() > 1:
        raise PeftkitError("co-training runs in one process; start it without accelerate launch / torchrun")
    specs = [str(t) for t in tasks]
    names = _task_names(specs)
    lora_config = config or method_config("lora", **dict(method_options or {}))
    if not isinstance(lora_config, LoraConfig) or lora_config.use_dora:
        raise PeftkitError("co-training trains LoRA adapters only (mixed batches hold plain LoRA); use --method lora")
    arguments = _cotrain_arguments(output_dir, names, training, seed)
    output_dir = Path(output_dir)
    _check_resume(output_dir, arguments.resume)

    loaded, holdouts = [], []
    for spec in specs:
        data, holdout = load_task_with_validation(spec, text_column, label_column, validation_fraction, log)
        loaded.append(data)
        holdouts.append(holdout)
    base, tokenizer = zoo.load_classifier(model, num_labels=2, seed=seed)
    mixed = _mixed_model(base, lora_config, len(specs), max(len(d.label_names) for d in loaded))
    task_list: list[_Task] = []
    for name, spec, data in zip(names, specs, loaded):
        train_examples = data.train[:max_train_examples] if max_train_examples else data.train
        evaluation = data.validation or data.test
        eval_examples = (evaluation[:max_eval_examples] if max_eval_examples else evaluation) if evaluation else None
        features = tokenize_examples(train_examples, tokenizer, max_length=max_length)
        task = _Task(name=name, spec=spec, label_names=data.label_names, train=features,
                     evaluation=tokenize_examples(eval_examples, tokenizer, max_length=max_length) if eval_examples else None,
                     lengths=[len(f["input_ids"]) for f in features])
        # Each adapter starts as its single-task run's would: drawn from a random state seeded with `seed`.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            task.slot = mixed.add_adapter(name, lora_config, num_labels=len(data.label_names))
        task.batches_per_epoch = math.ceil(len(features) / arguments.batch_size)
        task.total_steps = max(1, math.ceil(arguments.epochs * task.batches_per_epoch - 1e-9))
        task_list.append(task)

    run_info = {t.name: {"model": model_reference(model),
                         "task": t.spec if t.spec in zoo.list_tasks() else str(Path(t.spec).resolve()),
                         "method": "lora", "label_names": t.label_names, "max_length": max_length,
                         "text_column": text_column, "label_column": label_column, "full_finetune": False,
                         "cotrained_with": [u.name for u in task_list if u is not t],
                         "validation_holdout": holdout}
                for t, holdout in zip(task_list, holdouts)}
    trainer = _Cotrainer(mixed, task_list, arguments, PaddingCollator(tokenizer), output_dir, run_info)
    return trainer.run(started, model=str(model))


def _task_names(specs: list[str]) -> list[str]:
    """Each task's name (its folder and adapter name); refuses fewer than two tasks, repeats and reserved names."""
    if len(specs) < 2:
        raise PeftkitError(f"co-training needs two or more tasks, got {specs}; train one task with train_classifier")
    names = [task_name(s) for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PeftkitError(f"tasks {repeated} appear twice (tasks are named by file or folder name: {names}); give each task "
                           "once, and rename files or folders that share a name")
    for name in names:
        io.check_adapter_name(name)
        if name in (CHECKPOINT_DIRNAME, LEGACY_CHECKPOINT_DIRNAME, METRICS_FILENAME):
            raise PeftkitError(f"a task may not be named {name!r}: that name is taken by the run's own files; rename it")
    return names


def _cotrain_arguments(output_dir, names: list[str], training: Mapping[str, Any] | None, seed: int) -> CotrainArguments:
    """CotrainArguments from the caller's fields over the defaults, validated; unknown fields are named."""
    fields = {f.name for f in dataclasses.fields(CotrainArguments)} - {"output_dir"}
    unknown = sorted(set(training or {}) - fields)
    if unknown:
        raise PeftkitError(f"co-training has no option {', '.join(unknown)}; its options: {', '.join(sorted(fields))}")
    arguments = CotrainArguments(output_dir=str(output_dir), **{"learning_rate": default_learning_rate("lora"), "seed": seed,
                                                                **dict(training or {})})
    arguments.validate(names)
    return arguments


def _check_resume(output_dir: Path, resume: bool) -> None:
    """A checkpoint is there exactly when resuming; one in the legacy layout is named and refused."""
    legacy = output_dir / LEGACY_CHECKPOINT_DIRNAME
    if (legacy / ckpt.STATE_FILENAME).is_file():
        raise PeftkitError(f"{legacy} holds a co-training checkpoint in the layout of an earlier peftkit version, which this "
                           f"version cannot resume (it now writes {CHECKPOINT_DIRNAME}/step-N/, as single-task training does). "
                           "Finish that run with the version that started it, or start afresh in another output directory "
                           "(or delete that folder).")
    checkpoints = ckpt.checkpoints_dir(output_dir)
    found = ckpt.latest_checkpoint(checkpoints)
    if not resume and found is not None:
        raise PeftkitError(f"{checkpoints} holds the checkpoint of an earlier run. Pass resume=True (peftkit train --resume) "
                           "to continue it, or use another output directory (or delete that folder) to start afresh.")
    if resume and found is None:
        raise PeftkitError(f"nothing to resume: {checkpoints} holds no checkpoint; start without --resume")


def _mixed_model(base: torch.nn.Module, lora_config: LoraConfig, capacity: int, max_labels: int) -> MixedLoraModel:
    """The MixedLoraModel over `base` (moved to Accelerate's device), with one stacked head slot per task."""
    base.to(PartialState().device)  # the accelerator Accelerate would pick (CPU here; the GPU path is untested)
    head = next((n for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(base, n, None), torch.nn.Linear)), None)
    if head is None:
        raise PeftkitError(f"{type(base).__name__} has no linear classification head ({' or '.join(CLASSIFIER_HEAD_NAMES)}); "
                           "co-training stacks one head per task")
    return MixedLoraModel(base, lora_config.target_modules, capacity=capacity, max_rank=lora_config.r, head=head,
                          max_labels=max_labels)


class _Cotrainer:
    """The training loop of one co-training run (state, steps, evaluation, saving, resume)."""

    def __init__(self, mixed: MixedLoraModel, tasks: list[_Task], args: CotrainArguments, collate: PaddingCollator,
                 output_dir: Path, run_info: dict[str, dict]):
        self.mixed, self.tasks, self.args, self.collate = mixed, tasks, args, collate
        self.output_dir, self.run_info = output_dir, run_info
        self.names = [t.name for t in tasks]
        self.device = mixed.device
        self.params = mixed.slot_parameters()
        self.optimizer = SlotAdamW(self.params, weight_decay=args.weight_decay)
        self.states = {t.name: _TaskState() for t in tasks}
        self.epoch, self.pass_in_epoch = 0, 0
        self.epochs = math.ceil(args.epochs - 1e-9)
        self.schedules = {}
        for t in tasks:
            warmup = warmup_steps(args.warmup_ratio, t.total_steps)
            self.schedules[t.name] = lr_multiplier(args.lr_scheduler, warmup, t.total_steps)
        self.base_rates = {t.name: float(args.for_task("learning_rate", t.name, self.names)) for t in tasks}
        self.patience = {t.name: args.for_task("patience", t.name, self.names) for t in tasks}
        self.trackers = tracking.trackers_of(args.report_to)
        self.accelerator = None

    # -- the run ---------------------------------------------------------------------------------
    def run(self, started: float, model: str) -> CotrainResult:
        """The run, with Accelerate's experiment trackers started around it when report_to names any."""
        if self.trackers:  # an Accelerator only to track: the model, optimizer and batches stay as they are
            self.accelerator = make_accelerator("no", **tracking.accelerator_options(self.trackers, self.output_dir))
        config = {**dataclasses.asdict(self.args), "model": model, "tasks": ",".join(self.names)}
        with tracking.tracked_run(self.accelerator, self.trackers, self.output_dir, config):
            return self._run(started, model)

    def _run(self, started: float, model: str) -> CotrainResult:
        args = self.args
        resumed_from = None
        if args.resume:
            resumed_from = str(self._load_checkpoint())
        else:
            torch.manual_seed(args.seed)  # dropout in the base model, as the single-task loop seeds it
        self.mixed.train()
        plans = [self._plan(e) for e in range(self.epochs)]
        self.plan_lengths = [len(p) for p in plans]
        total_passes = sum(len(p) for p in plans)
        done_passes = sum(len(p) for p in plans[:self.epoch]) + self.pass_in_epoch
        if resumed_from is not None:
            print(f"resumed from {resumed_from} at pass {done_passes} of {total_passes} (epoch {self.epoch + 1})", flush=True)
        bar = tqdm(total=total_passes, initial=done_passes, desc="co-train", unit="pass", dynamic_ncols=True) if args.progress else None
        self._bar = bar
        pass_times: list[float] = []
        train_time, rows_seen, padded_tokens = 0.0, 0, 0
        while self.epoch < self.epochs:
            plan = plans[self.epoch]
            evaluation_points = {round(k * len(plan) / args.evals_per_epoch) for k in range(1, args.evals_per_epoch + 1)}
            while self.pass_in_epoch < len(plan):
                batches = {name: b for name, b in plan[self.pass_in_epoch].items() if self.states[name].training}
                self.pass_in_epoch += 1
                if batches:
                    pass_started = time.perf_counter()
                    rows, tokens = self._train_step(batches)
                    pass_times.append(time.perf_counter() - pass_started)
                    train_time += pass_times[-1]
                    rows_seen += rows
                    padded_tokens += tokens
                    if self.accelerator is not None:
                        self.accelerator.log({"train/examples_per_second": rows_seen / max(train_time, 1e-9),
                                              "train/peak_rss_mb": peak_rss_mb()}, step=done_passes + len(pass_times))
                finishing = [n for n in batches if self.states[n].steps >= self._task(n).total_steps]
                if bar is not None:
                    bar.set_postfix(loss=" ".join(f"{n}:{self._recent_loss(n):.3f}" for n in self.names
                                                  if self.states[n].training and self.states[n].window_steps),
                                    ex_s=f"{rows_seen / max(train_time, 1e-9):.0f}", refresh=False)
                    bar.update(1)
                evaluate_all = self.pass_in_epoch in evaluation_points
                due = [n for n in self.names if (self.states[n].training and evaluate_all) or n in finishing]
                for name in finishing:
                    self.states[name].finished = True
                for name in due:
                    if self.states[name].last_eval_step != self.states[name].steps:
                        self._evaluate_and_record(name)
                if due or (args.save_steps and self.pass_in_epoch % args.save_steps == 0):
                    self._save_checkpoint()
                if not any(s.training for s in self.states.values()):
                    break
            if not any(s.training for s in self.states.values()):
                break
            self.epoch += 1
            self.pass_in_epoch = 0
            self._save_checkpoint()
        if bar is not None:
            bar.close()
        # A task with no evaluation split keeps its final weights.
        for task in self.tasks:
            if task.evaluation is None:
                self._save_adapter(task.name)
        self._save_checkpoint()

        results = {t.name: self._task_result(t) for t in self.tasks}
        result = CotrainResult(
            model=model, method="lora", tasks=results, forward_passes=len(pass_times),
            wall_time_s=time.perf_counter() - started, train_time_s=train_time,
            examples_per_second=rows_seen / train_time if train_time > 0 else 0.0,
            median_pass_time_s=statistics.median(pass_times) if pass_times else None, padded_tokens=padded_tokens,
            peak_rss_mb=peak_rss_mb(),
            resumed_from=resumed_from, output_dir=str(self.output_dir), seed=self.args.seed,
        )
        io.write_json(self.output_dir / METRICS_FILENAME, result.to_dict())
        return result

    def _plan(self, epoch: int) -> list[dict[str, list[int]]]:
        batches, lengths = {}, {}
        for t in self.tasks:
            batches[t.name] = task_epoch_batches(t.lengths, self.args.batch_size, self.args.seed, epoch)
            lengths[t.name] = [max(t.lengths[i] for i in b) for b in batches[t.name]]
        return plan_epoch(batches, lengths, self.args.seed, epoch)

    def _task(self, name: str) -> _Task:
        return self.tasks[self.names.index(name)]

    def _recent_loss(self, name: str) -> float:
        state = self.states[name]
        return state.window_loss_sum / state.window_steps if state.window_steps else float("nan")

    def _train_step(self, batches: dict[str, list[int]]) -> tuple[int, int]:
        """One forward / backward pass over the tasks' batches and one optimizer step per task in it.
        Returns (rows, padded tokens)."""
        features, slots, row_task = [], [], []
        for position, (name, indices) in enumerate(batches.items()):
            task = self._task(name)
            features += [task.train[i] for i in indices]
            slots += [task.slot] * len(indices)
            row_task += [position] * len(indices)
        batch = {k: v.to(self.device) for k, v in self.collate(features).items()}
        labels = batch.pop("labels")
        adapter_ids = torch.tensor(slots, device=self.device)
        logits = self.mixed(**batch, adapter_ids=adapter_ids).logits
        row_loss = F.cross_entropy(logits.float(), labels, reduction="none")
        # Sum over tasks of each task's mean loss: each adapter gets the gradient of its own batch's mean.
        row_task = torch.tensor(row_task, device=self.device)
        counts = torch.bincount(row_task, minlength=len(batches)).to(row_loss.dtype)
        (row_loss / counts[row_task]).sum().backward()
        task_losses = torch.zeros(len(batches), dtype=torch.float64).index_add_(0, row_task.cpu(), row_loss.detach().double().cpu())
        task_losses = (task_losses / counts.double().cpu()).tolist()

        active = torch.zeros(self.optimizer.num_slots, dtype=torch.bool)
        rates = [0.0] * self.optimizer.num_slots
        for name in batches:
            task, state = self._task(name), self.states[name]
            active[task.slot] = True
            rates[task.slot] = self.base_rates[name] * self.schedules[name](state.steps)
        if self.args.max_grad_norm is not None:
            clip_slot_gradients(self.params, self.args.max_grad_norm)
        self.optimizer.step(rates, active)
        self.optimizer.zero_grad()
        for (name, indices), loss in zip(batches.items(), task_losses):
            state = self.states[name]
            state.steps += 1
            state.examples_seen += len(indices)
            state.loss_sum += loss
            state.window_loss_sum += loss
            state.window_steps += 1
            if self.accelerator is not None:
                self.accelerator.log({f"{name}/train/loss": loss, f"{name}/train/learning_rate": rates[self._task(name).slot]},
                                     step=state.steps)
        return len(features), int(batch["input_ids"].numel())

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, name: str) -> dict[str, float]:
        """Loss and accuracy of task `name`'s adapter on its evaluation split (the single-task loop's evaluate)."""
        task = self._task(name)
        return evaluate(self.mixed, task.evaluation, self.args.eval_batch_size, self.collate, self.device,
                        forward=functools.partial(self._forward_slot, task.slot))

    def _forward_slot(self, slot: int, batch: dict[str, torch.Tensor]) -> SimpleNamespace:
        """Every row of `batch` through adapter `slot`; the loss is cross-entropy on float32 logits, as in training."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        ids = torch.full((len(batch["labels"]),), slot, dtype=torch.long, device=self.device)
        logits = self.mixed(**inputs, adapter_ids=ids).logits.float()
        return SimpleNamespace(loss=F.cross_entropy(logits, batch["labels"]), logits=logits)

    def _evaluate_and_record(self, name: str) -> None:
        task, state = self._task(name), self.states[name]
        evaluation = self.evaluate(name) if task.evaluation else None
        entry = close_history_window(state, state.steps, round(state.steps / task.batches_per_epoch, 4), evaluation)
        state.last_eval_step = state.steps
        if evaluation is None:
            return
        if self.accelerator is not None:
            self.accelerator.log({f"{name}/eval/{key}": value for key, value in evaluation.items()}, step=state.steps)
        if keep_best(state, state.steps, evaluation, "accuracy"):
            self._save_adapter(name)
        value = evaluation["accuracy"]
        if state.patience_reference is None or value > state.patience_reference + self.args.min_delta:
            state.patience_reference, state.evaluations_without_gain = value, 0
        else:
            state.evaluations_without_gain += 1
        patience = self.patience[name]
        stopping = patience is not None and state.evaluations_without_gain >= patience and not state.finished
        if stopping:
            state.stopped_early = True
            entry["stopped_early"] = True
        if self._bar is not None:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items())
            note = f"; stopped ({state.evaluations_without_gain} evaluations without gain)" if stopping else ""
            self._bar.write(f"{name} step {state.steps} (epoch {entry['epoch']:g}): eval {shown}{note}")

    # -- files -----------------------------------------------------------------------------------
    def _save_adapter(self, name: str) -> None:
        folder = self.output_dir / name
        self.mixed.save_adapter(name, folder)
        io.write_json(folder / RUN_INFO_NAME, self.run_info[name])

    def _named_slot_tensors(self) -> dict[str, torch.Tensor]:
        names = {id(p): n for n, p in self.mixed.named_parameters()}
        return {names[id(p)]: p for p in self.params}

    def _geometry(self) -> dict[str, Any]:
        return {"tasks": self.names, "train_examples": [len(t.train) for t in self.tasks],
                "batch_size": self.args.batch_size, "seed": self.args.seed, "epochs": self.args.epochs}

    def _save_checkpoint(self) -> None:
        """A checkpoint in the trainer's format (peftkit.train.checkpoint), at step = forward passes done:
        the stacked slot tensors as the trainable tensors, SlotAdamW's moments and step counts as the
        optimizer state, the RNG state, and the position and per-task state in state.json."""
        root = ckpt.checkpoints_dir(self.output_dir)
        passes = sum(self.plan_lengths[:self.epoch]) + self.pass_in_epoch
        temporary = ckpt.prepare_temporary_dir(root, passes)
        ckpt.write_process_rng(temporary, rank=0)
        ckpt.finish_checkpoint(
            temporary, step=passes, trainable=self._named_slot_tensors(), optimizer_state=self.optimizer.state_tensors(),
            scheduler_state=None, scaler_state=None, keep=1,
            state={"format": _STATE_FORMAT, "kind": _STATE_KIND, "geometry": self._geometry(), "passes_done": passes,
                   "epoch": self.epoch, "pass_in_epoch": self.pass_in_epoch,
                   "tasks": {n: dataclasses.asdict(s) for n, s in self.states.items()}},
        )

    def _load_checkpoint(self) -> Path:
        root = ckpt.checkpoints_dir(self.output_dir)
        ckpt.remove_temporary_folders(root)
        folder = ckpt.resolve_resume_checkpoint(True, self.output_dir)
        saved = ckpt.read_state(folder)
        if saved.get("kind") != _STATE_KIND or saved.get("format") != _STATE_FORMAT:
            raise PeftkitError(f"{folder} is not a checkpoint of this version's co-training (kind {saved.get('kind')!r}, format "
                               f"{saved.get('format')}); resume it with the command that wrote it, or start afresh")
        for key, value in self._geometry().items():
            if saved["geometry"].get(key) != value:
                raise PeftkitError(f"cannot resume {folder}: it was trained with {key}={saved['geometry'].get(key)}, this run has "
                                   f"{value}; resume with the same tasks, data, batch size, epochs and seed")
        ckpt.load_tensors_into(self._named_slot_tensors(), folder / ckpt.TRAINABLE_FILENAME)
        self.optimizer.load_state_tensors(ckpt.load_torch_file(folder / ckpt.OPTIMIZER_FILENAME), str(folder))
        ckpt.restore_rng_state(ckpt.load_torch_file(folder / ckpt.rng_filename(0)))
        self.states = {n: _TaskState(**s) for n, s in saved["tasks"].items()}
        self.epoch, self.pass_in_epoch = saved["epoch"], saved["pass_in_epoch"]
        return folder

    # -- results ---------------------------------------------------------------------------------
    def _task_result(self, task: _Task) -> TaskResult:
        state = self.states[task.name]
        return TaskResult(
            name=task.name, task=task.spec, validation_accuracy=(state.best_eval or {}).get("accuracy"),
            best_step=state.best_step, steps=state.steps, total_steps=task.total_steps, stopped_early=state.stopped_early,
            train_examples=len(task.train), eval_examples=len(task.evaluation or []), num_labels=len(task.label_names),
            trainable_parameters=self._trainable_parameters(task), adapter_dir=str(self.output_dir / task.name), history=state.history,
        )

    def _trainable_parameters(self, task: _Task) -> int:
        total = sum(int(layer.ranks[task.slot]) * (layer.in_features + layer.out_features) for layer in self.mixed.layers.values())
        return total + len(task.label_names) * (self.mixed.head.in_features + 1)


def describe(result: CotrainResult) -> list[tuple[str, str]]:
    """Rows for the command line: one per task, then the run's totals."""
    rows = []
    for name, task in result.tasks.items():
        accuracy = "n/a (no validation split)" if task.validation_accuracy is None else f"{100 * task.validation_accuracy:.2f}%"
        stop = f", stopped early at step {task.steps}" if task.stopped_early else ""
        rows.append((name, f"{accuracy} (best at step {task.best_step} of {task.total_steps}{stop}) -> {task.adapter_dir}"))
    rows.append(("forward passes", f"{result.forward_passes} ({result.examples_per_second:.1f} examples/s)"))
    rows.append(("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s)"))
    rows.append(("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MiB"))
    return rows
