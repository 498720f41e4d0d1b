"""A whole classification job: model + task + method in, trained adapter and a report out.

This is what `peftkit train` runs; the library user can call `train_classifier` directly. The run
folder holds `adapter/` (peft layout, plus `peftkit_run.json` naming the base model, task and labels
so that `peftkit eval` / `predict` / `merge` need nothing else), `checkpoints/`, `best/` and
`metrics.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from peftkit import io, zoo
from peftkit import quantize as quantization
from peftkit.config import PeftConfig, load_config
from peftkit.errors import PeftkitError
from peftkit.model import PeftModel, get_peft_model
from peftkit.registry import (  # noqa: F401  (list_methods, method_config, ... are used from here too)
    METHODS,
    default_epochs,
    default_learning_rate,
    list_methods,
    method_config,
)
from peftkit.train.data import (
    DEFAULT_VALIDATION_FRACTION,
    PaddingCollator,
    describe_holdout,
    hold_out_validation,
    length_grouped_order,
    tokenize_examples,
    with_validation,
)
from peftkit.train.loop import TrainingArguments, train
from peftkit.train.processes import is_main_process, process_count

RUN_INFO_NAME = "peftkit_run.json"

# The methods as `peftkit train --method` knows them: declared in each method file, collected by
# peftkit.registry. METHOD_DEFAULTS is the same as (config class, defaults, learning rate), by name.
METHOD_DEFAULTS: dict[str, tuple[type[PeftConfig], dict[str, Any], float]] = {
    name: (declared.config, dict(declared.defaults), declared.learning_rate) for name, declared in METHODS.items()
}


@dataclasses.dataclass
class JobResult:
    """What a classification job measured; `peftkit train` prints it and writes it to metrics.json."""

    model: str
    task: str
    method: str
    validation_accuracy: float | None
    trainable_parameters: int
    total_parameters: int
    trainable_share: float
    adapter_bytes: int
    wall_time_s: float
    train_time_s: float
    peak_rss_mb: float
    examples_per_second: float
    steps: int
    output_dir: str
    adapter_dir: str
    quantize: str | None = None  # the frozen base's linear weights: None (float), "nf4" or "int8"
    # Where the task had no validation split: the part of its train split held out for one
    # ({"fraction", "seed", "examples"}), recorded in the run so that `peftkit eval` rebuilds it.
    validation_holdout: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_classifier(
    model: str = "minilm",
    task: str = "sst2",
    method: str = "lora",
    output_dir: str | os.PathLike = "runs/default",
    *,
    config: PeftConfig | None = None,
    method_options: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    max_length: int = 128,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    quantize: str | None = None,
    validation_fraction: float | None = DEFAULT_VALIDATION_FRACTION,
    log=None,
) -> JobResult:
    """Train `method` on `task` with base `model`; save the best adapter to `output_dir/adapter`.

    `training` holds TrainingArguments fields (epochs, batch_size, learning_rate, ...). Returns the
    measured result (validation accuracy, trainable share, adapter size, time, peak memory).
    `quantize` ("nf4" or "int8") stores the frozen base's linear weights quantized (peftkit.quantize).
    A task without a validation split (a single data file) gets one: `validation_fraction` of its
    training examples, stratified and seeded (0 or None: none, and the test split is scored if any).
    `log`, if given, is called with lines worth showing the user (the held-out split).
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    peft_config = config or method_config(method, **(method_options or {}))  # bad options fail before any loading
    given = {k: v for k, v in (training or {}).items() if not (k == "epochs" and v is None)}
    defaults = {"learning_rate": default_learning_rate(method), "epochs": default_epochs(method), "seed": seed}
    arguments = training_arguments(output_dir, defaults, given)  # so do bad training options
    check_quantize(method, quantize)
    data, holdout = load_task_with_validation(task, text_column, label_column, validation_fraction, log)
    base, tokenizer = zoo.load_classifier(model, num_labels=len(data.label_names), id2label=data.label_names, seed=seed)
    quantized = quantization.quantize_model(base, quantize, task_type="SEQ_CLS").settings() if quantize else None
    wrapped = wrap_with_adapter(base, peft_config, seed)
    train_features, eval_features = _classification_features(data, tokenizer, max_length, max_train_examples,
                                                             max_eval_examples)
    order = length_grouped_batch_order([len(f["input_ids"]) for f in train_features], arguments)
    result = train(wrapped, train_features, eval_features, arguments, PaddingCollator(tokenizer), batch_order=order)

    adapter_dir = output_dir / "adapter"
    task_id = str(task) if str(task) in zoo.list_tasks() else str(Path(task).resolve())
    if is_main_process():
        save_run(wrapped, tokenizer, adapter_dir, model=model_reference(model), task=task_id, method=method,
                 label_names=data.label_names, max_length=max_length, text_column=text_column,
                 label_column=label_column, quantize=quantized, validation_holdout=holdout)
    report = wrapped.trainable_parameters_report()
    best = result.best_eval or result.final_eval or {}
    job = JobResult(
        model=str(model), task=str(task), method=method,
        validation_accuracy=best.get("accuracy"),
        trainable_parameters=report.trainable, total_parameters=report.total, trainable_share=report.share,
        adapter_bytes=folder_bytes(adapter_dir), wall_time_s=time.perf_counter() - started,
        train_time_s=result.wall_time_s, peak_rss_mb=result.peak_rss_mb,
        examples_per_second=result.examples_per_second, steps=result.steps,
        output_dir=str(output_dir), adapter_dir=str(adapter_dir), quantize=quantize, validation_holdout=holdout,
    )
    if is_main_process():
        io.write_json(output_dir / "job.json", job.to_dict())
        if not wrapped.is_full_finetune and not quantize:
            write_routing(wrapped, tokenizer, [e.text for e in data.train], adapter_dir, model, task_id, max_length, seed)
    return job


def write_routing(wrapped: PeftModel, tokenizer, texts: list[str], folder: Path, model, task: str, max_length: int,
                  seed: int, max_texts: int = 512) -> None:
    """Write the adapter's routing data (peftkit.serve.routing): base-model embeddings of a sample of its
    training inputs, computed with the adapter switched off, so that `peftkit serve` can route to it."""
    from peftkit.serve.routing import embed_texts, model_reference, routing_data_from, sample_texts, write_routing_data

    was_training = wrapped.training
    wrapped.eval()
    with wrapped.disable_adapter():
        embeddings = embed_texts(wrapped, tokenizer, sample_texts(texts, max_texts, seed), max_length)
    wrapped.train(was_training)
    write_routing_data(folder, routing_data_from(embeddings, model_reference(model), task=task, seed=seed))


# --------------------------------------------------------------------------- pieces the jobs share


def training_arguments(output_dir: Path, defaults: dict[str, Any], given: dict[str, Any] | None) -> TrainingArguments:
    """TrainingArguments from a job's defaults and the caller's fields, validated before anything is loaded."""
    arguments = TrainingArguments(output_dir=str(output_dir), **{**defaults, **(given or {})})
    arguments.validate()  # a tracker that is not installed, ... fails here, not after loading the model
    return arguments


def check_quantize(method: str, quantize: str | None) -> None:
    """Fail early when `quantize` cannot work with `method`."""
    if quantize is not None:
        quantization.check_method(method)
        quantization.check_scheme(quantize, 64)


def wrap_with_adapter(base: torch.nn.Module, peft_config: PeftConfig, seed: int) -> PeftModel:
    """get_peft_model with the adapter's initialization drawn from a torch RNG seeded with `seed`.

    The adapter's initialization (LoRA's A) draws from the global torch RNG: seeding it makes a job
    repeatable given `seed`, and the fork leaves the caller's RNG state as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, peft_config)


def length_grouped_batch_order(lengths: list[int], arguments: TrainingArguments):
    """`batch_order` for train(): examples of similar length together, grouped by the global batch.

    The trainer cuts each epoch's order into global batches (batch_size x processes), so the groups must
    have that size too, or a process count other than 1 would mix lengths within a batch.
    """
    return functools.partial(length_grouped_order, lengths, arguments.batch_size * process_count(), arguments.seed)


def model_reference(model: str | os.PathLike) -> str:
    """How a run records its base model: a built-in name, or a folder as an absolute path (usable from anywhere)."""
    return str(model) if str(model) in zoo.list_models() else str(zoo.resolve_model(model).resolve())


def load_task_with_validation(task, text_column: str, label_column: str, validation_fraction, log):
    """The task's data, with a validation split held out of train where it has none: (data, holdout)."""
    data = zoo.load_task(task, text_column=text_column, label_column=label_column)
    if not data.train:
        raise PeftkitError(f"task {task!r} has no training examples")
    data, holdout = with_validation(data, validation_fraction)
    if holdout and log is not None:
        log(describe_holdout(task, holdout))
    return data, holdout


def _classification_features(data, tokenizer, max_length: int, max_train_examples, max_eval_examples):
    """Tokenized (train features, eval features or None); eval is the validation split, else the test split."""
    evaluation = data.validation or data.test
    train_examples = data.train[:max_train_examples] if max_train_examples else data.train
    eval_examples = (evaluation[:max_eval_examples] if max_eval_examples else evaluation) if evaluation else None
    train_features = tokenize_examples(train_examples, tokenizer, max_length=max_length)
    eval_features = tokenize_examples(eval_examples, tokenizer, max_length=max_length) if eval_examples else None
    return train_features, eval_features


def save_run(peft_model: PeftModel, tokenizer, folder: str | os.PathLike, **info) -> None:
    """Save the adapter (or the whole model for full fine-tuning) plus what is needed to use it."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    if peft_model.is_full_finetune:
        tokenizer.save_pretrained(folder)
    io.write_json(folder / RUN_INFO_NAME, {**info, "full_finetune": peft_model.is_full_finetune})


def read_run_info(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / RUN_INFO_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PeftkitError(f"{path} is not valid JSON ({error})") from None


def load_run(folder: str | os.PathLike, model: str | None = None):
    """Load a saved classification run: (model ready for inference, tokenizer, run info)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftkitError(f"{folder} is not a folder; give the adapter folder written by `peftkit train` (runs/NAME/adapter)")
    info = read_run_info(folder)
    if info.get("full_finetune"):
        classifier, tokenizer = zoo.load_classifier(folder, num_labels=len(info["label_names"]), id2label=info["label_names"])
        return classifier.eval(), tokenizer, info
    base_name = model or info.get("model") or _base_in_adapter_config(folder)
    if base_name is None:
        raise PeftkitError(
            f"{folder} does not say which base model it adapts (no {RUN_INFO_NAME}); pass --model NAME_OR_FOLDER"
        )
    labels = info.get("label_names")
    if not labels and info.get("combined") and info["combined"].get("head_from") is None:
        raise PeftkitError(
            f"{folder} was made by `peftkit combine` without a classification head, so it cannot classify; "
            "combine again with --head N (the position or folder of the input whose head to attach)"
        )
    num_labels = len(labels) if labels else _num_labels_from_adapter(folder)
    base, tokenizer = zoo.load_classifier(base_name, num_labels=num_labels, id2label=labels)
    quantize_like_run(base, info, task_type="SEQ_CLS")
    wrapped = PeftModel.from_pretrained(base, folder)
    return wrapped.eval(), tokenizer, info


def _base_in_adapter_config(folder: Path) -> str | None:
    """adapter_config.json's base_model_name_or_path where it names a model here (a peftkit model or a folder).

    Adapters saved outside `peftkit train` (MixedLoraModel.save_adapter, peft) have no peftkit_run.json."""
    if not (folder / io.CONFIG_NAME).is_file():
        return None
    name = load_config(folder).base_model_name_or_path
    return name if name and (name in zoo.list_models() or Path(name, "config.json").is_file()) else None


def quantize_like_run(base, info: dict[str, Any], task_type: str | None = None) -> None:
    """Quantize a freshly loaded base as the run's was (its `quantize` entry), before loading the adapter."""
    if info.get("quantize"):
        quantization.quantize_model(base, **info["quantize"], task_type=task_type)


def _num_labels_from_adapter(folder: Path) -> int:
    tensors = io.read_tensors(folder / io.WEIGHTS_NAME)
    for key in ("base_model.model.classifier.weight", "base_model.model.score.weight"):
        if key in tensors:
            return tensors[key].shape[0]
    raise PeftkitError(f"cannot tell the number of classes of {folder}: no trained classifier head in it")


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities, (len(texts), num_labels)."""
    model.eval()
    collate = PaddingCollator(tokenizer)
    outputs = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length)
        features = [{k: encoded[k][i] for k in encoded} for i in range(len(encoded["input_ids"]))]
        batch = collate(features)
        outputs.append(model(**batch).logits.float().softmax(-1))
    return torch.cat(outputs)


def evaluate_run(folder, task: str | None = None, split: str = "validation", model: str | None = None,
                 max_examples: int | None = None) -> dict[str, Any]:
    """Accuracy of a saved run on a task split (default: the task it was trained on)."""
    classifier, tokenizer, info = load_run(folder, model=model)
    task, examples = examples_for_run(folder, info, task, split, max_examples,
                                      lambda name, columns: zoo.load_task(name, **columns), "text_column", "text")
    probabilities = predict_texts(classifier, tokenizer, [e.text for e in examples], info.get("max_length", 128))
    labels = torch.tensor([e.label for e in examples])
    accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
    return {"task": task, "split": split, "examples": len(examples), "accuracy": accuracy}


def examples_for_run(folder, info: dict, task: str | None, split: str, max_examples: int | None, load_task,
                     input_column: str, default_input: str) -> tuple[str, list]:
    """The examples a saved run is evaluated on: `split` of `task` (default: the run's own task, read with the
    run's columns and with the validation split it held out rebuilt exactly). `load_task(name, columns)` reads a
    task given {input_column: ..., "label_column": ...}."""
    task = task or info.get("task")
    if task is None:
        raise PeftkitError(f"{folder} does not say which task it was trained on; pass --task")
    same_task = task == info.get("task")
    data = load_task(task, {input_column: info.get(input_column, default_input) if same_task else default_input,
                            "label_column": info.get("label_column", "label") if same_task else "label"})
    holdout = info.get("validation_holdout") if same_task else None
    if holdout and not data.validation:  # the split the run held out of its training data, rebuilt exactly
        data = hold_out_validation(data, holdout["fraction"], holdout["seed"])
    examples = getattr(data, split, None)
    if not examples:
        available = [s for s in ("train", "validation", "test") if getattr(data, s, None)]
        raise PeftkitError(f"task {task!r} has no {split!r} split; it has: {', '.join(available)}")
    return task, examples[:max_examples] if max_examples else examples


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the tensor files in a folder (what shipping the adapter costs)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
