"""A whole classification job: model + task + method in, trained adapter and a report out.

This is what `peftkit train` runs; the library user can call `train_classifier` directly. The run
folder holds `adapter/` (peft layout, plus `peftkit_run.json` naming the base model, task and labels
so that `peftkit eval` / `predict` / `merge` need nothing else), `checkpoints/`, `best/` and
`metrics.json`.
"""

from __future__ import annotations

import dataclasses
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
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.adapter import BottleneckConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.freeze import FreezeConfig
from peftkit.methods.full import FullFinetuneConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.ln_tuning import LNTuningConfig
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.oft import OFTConfig
from peftkit.methods.prefix import PrefixTuningConfig
from peftkit.methods.prompt import PromptEncoderConfig, PromptTuningConfig
from peftkit.methods.sparse import SparseConfig
from peftkit.methods.vera import VeraConfig
from peftkit.model import PeftModel, get_peft_model
from peftkit.train.data import (
    DEFAULT_VALIDATION_FRACTION, PaddingCollator, describe_holdout, hold_out_validation, length_grouped_order,
    tokenize_examples, with_validation,
)
from peftkit.train.loop import TrainingArguments, train

RUN_INFO_NAME = "peftkit_run.json"

# Per-method defaults for classification: the config and a learning rate that suits it. A config
# passed in replaces the default config; the learning rate can always be set.
# LoRA: r=8 on every linear layer (attention and feed-forward) reaches 87.5% on sst2 in the default 2
# epochs, where query,value alone stays near 86.5% even in 3. No LoRA dropout: on CPU it costs about a
# third of the step time, for a difference within noise. Figures: benchmarks/default_job.py.
METHOD_DEFAULTS: dict[str, tuple[type[PeftConfig], dict[str, Any], float]] = {
    "lora": (LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"), 1e-3),
    # AdaLoRA: ranks 12 -> 8 on average (scale 24/12 = LoRA's 16/8); warmup 10% of the steps, ranks fixed
    # for the last half (the paper's sst2 run: 44%), so every end-of-epoch evaluation sees the final ranks.
    # Its update starts smaller than LoRA's (E = 0, small A and B), hence the higher rate.
    "adalora": (AdaLoraConfig, dict(init_r=12, target_r=8, lora_alpha=24, target_modules="all-linear", tinit=0.1,
                                    tfinal=0.5, deltaT=10, orth_reg_weight=0.1), 2e-3),
    "dora": (LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", use_dora=True), 1e-3),
    # VeRA: shared projections of rank 256 on every linear layer; it trains ~out+r values per layer, so it
    # needs a larger step than LoRA (the paper uses 4e-3 to 1e-2 over far more epochs than our 2). Measured
    # on sst2, 2 epochs: 84.63% at 1e-2, 86.01% at 3e-2.
    "vera": (VeraConfig, dict(r=256, target_modules="all-linear", d_initial=0.1), 3e-2),
    "adapter": (BottleneckConfig, dict(placement="houlsby", bottleneck_size=64, activation="gelu"), 1e-3),
    # BitFit: biases only (27k values on minilm) move slowly; measured on sst2: 82.45% at 2e-3 and 83.83% at
    # 5e-3 in 2 epochs, 73.62% at 1e-2 (unstable), 84.86% at 5e-3 in 4 epochs (METHOD_EPOCHS).
    "bitfit": (BitFitConfig, {}, 5e-3),
    "freeze": (FreezeConfig, dict(last_k=2), 1e-4),
    "full": (FullFinetuneConfig, {}, 1e-4),
    # Sparse fine-tuning: 2% of the linear weights' entries (215k, 0.95% of minilm), chosen by |gradient| over 8
    # batches; the chosen entries move like full fine-tuning's weights but need a larger rate to do it in 2 epochs.
    "sparse": (SparseConfig, dict(budget=0.02, importance="gradient", target_modules="all-linear"), 1e-3),
    # (IA)3: key, value and intermediate.dense scaled on their outputs, both output.dense layers (peft's
    # "ends with" rule also picks attention.output.dense) on their inputs; 25k vector entries on minilm.
    # The vectors start at 1 and need a high learning rate to move in the default job's 434 steps (a
    # 32-step check at 5e-3 moved them by at most 0.07). LN tuning: copies of every LayerNorm (10k values).
    "ia3": (IA3Config, dict(target_modules=["key", "value", "intermediate.dense", "output.dense"],
                            feedforward_modules=["output.dense"]), 1e-2),
    "ln_tuning": (LNTuningConfig, {}, 5e-3),
    # LoHa / LoKr: r=8, alpha=16 on every linear layer as for LoRA, with a higher lr: their update grows
    # from zero more slowly than LoRA's (a product of two small factors).
    "loha": (LoHaConfig, dict(r=8, alpha=16, target_modules="all-linear"), 2e-3),
    "lokr": (LoKrConfig, dict(r=8, alpha=16, target_modules="all-linear"), 2e-3),
    # OFT: 32-wide rotation blocks on the input of every linear layer (peft's default block size); the rate is
    # LoRA's, not yet tuned on sst2.
    "oft": (OFTConfig, dict(oft_block_size=32, target_modules="all-linear"), 1e-3),
    "prompt": (PromptTuningConfig, dict(num_virtual_tokens=20, prompt_tuning_init="SAMPLE_VOCAB"), 3e-2),
    "ptuning": (PromptEncoderConfig, dict(num_virtual_tokens=20, encoder_hidden_size=128), 3e-3),
    # Prefix tuning: 20 trained key/value positions per layer, the table trained directly at 1e-2 (peft's
    # sequence-classification example; P-tuning v2 trains without the reparameterisation on such tasks).
    "prefix": (PrefixTuningConfig, dict(num_virtual_tokens=20, prefix_projection=False), 1e-2),
}


# Passes over the data when the caller gives none (the classification job's default is 2): methods that
# train very few values need more of them to come near full fine-tuning.
DEFAULT_EPOCHS = 2
METHOD_EPOCHS: dict[str, float] = {"bitfit": 4}


def default_epochs(method: str) -> float:
    return METHOD_EPOCHS.get(method, DEFAULT_EPOCHS)


def list_methods() -> list[str]:
    return sorted(METHOD_DEFAULTS)


def method_config(method: str, task_type: str = "SEQ_CLS", **options) -> PeftConfig:
    """The config for `method` with its classification defaults, updated by `options`.

    task_type: "SEQ_CLS" (a new classifier head is trained with the adapter) or "CAUSAL_LM".
    """
    if method not in METHOD_DEFAULTS:
        raise PeftkitError(f"unknown method {method!r}; methods: {', '.join(list_methods())}")
    cls, defaults, _ = METHOD_DEFAULTS[method]
    # An option given as None drops the job's default and leaves the config class's own default.
    values = {k: v for k, v in {**defaults, **options}.items() if v is not None}
    if cls is not FullFinetuneConfig:
        values.setdefault("task_type", task_type)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PeftkitError(f"option(s) {unknown} do not apply to method {method!r}; its options: {', '.join(sorted(known))}")
    return cls(**values)


def default_learning_rate(method: str) -> float:
    return METHOD_DEFAULTS[method][2] if method in METHOD_DEFAULTS else 5e-4


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
    arguments = {"learning_rate": default_learning_rate(method), "epochs": default_epochs(method), "seed": seed,
                 **{k: v for k, v in (training or {}).items() if not (k == "epochs" and v is None)}}
    arguments = TrainingArguments(output_dir=str(output_dir), **arguments)
    arguments.validate()  # so do bad training options (a tracker that is not installed, ...)
    if quantize is not None:
        quantization.check_method(method)
        quantization.check_scheme(quantize, 64)
    data = zoo.load_task(task, text_column=text_column, label_column=label_column)
    if not data.train:
        raise PeftkitError(f"task {task!r} has no training examples")
    data, holdout = with_validation(data, validation_fraction)
    if holdout and log is not None:
        log(describe_holdout(task, holdout))
    evaluation = data.validation or data.test
    base, tokenizer = zoo.load_classifier(model, num_labels=len(data.label_names), id2label=data.label_names, seed=seed)
    quantized = quantization.quantize_model(base, quantize, task_type="SEQ_CLS").settings() if quantize else None
    # The adapter's initialization (LoRA's A) draws from the global torch RNG: seed it, so that a job
    # is repeatable given `seed`, without touching the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(base, peft_config)

    train_examples = data.train[:max_train_examples] if max_train_examples else data.train
    eval_examples = (evaluation[:max_eval_examples] if max_eval_examples else evaluation) if evaluation else None
    train_features = tokenize_examples(train_examples, tokenizer, max_length=max_length)
    eval_features = tokenize_examples(eval_examples, tokenizer, max_length=max_length) if eval_examples else None
    lengths = [len(f["input_ids"]) for f in train_features]

    order = lambda epoch: length_grouped_order(lengths, arguments.batch_size * _processes(), arguments.seed, epoch)  # noqa: E731
    result = train(wrapped, train_features, eval_features, arguments, PaddingCollator(tokenizer), batch_order=order)

    adapter_dir = output_dir / "adapter"
    # A folder is recorded as an absolute path so that eval / predict / merge work from anywhere.
    model_id = str(model) if str(model) in zoo.list_models() else str(zoo.resolve_model(model).resolve())
    task_id = str(task) if str(task) in zoo.list_tasks() else str(Path(task).resolve())
    if _is_main_process():
        save_run(wrapped, tokenizer, adapter_dir, model=model_id, task=task_id, method=method,
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
    if _is_main_process():
        io.write_json(output_dir / "job.json", job.to_dict())
    return job


def _processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    task = task or info.get("task")
    if task is None:
        raise PeftkitError(f"{folder} does not say which task it was trained on; pass --task")
    same_task = task == info.get("task")
    data = zoo.load_task(task, text_column=info.get("text_column", "text") if same_task else "text",
                         label_column=info.get("label_column", "label") if same_task else "label")
    holdout = info.get("validation_holdout") if same_task else None
    if holdout and not data.validation:  # the split the run held out of its train file, rebuilt exactly
        data = hold_out_validation(data, holdout["fraction"], holdout["seed"])
    examples = getattr(data, split, None)
    if not examples:
        available = [s for s in ("train", "validation", "test") if getattr(data, s, None)]
        raise PeftkitError(f"task {task!r} has no {split!r} split; it has: {', '.join(available)}")
    examples = examples[:max_examples] if max_examples else examples
    probabilities = predict_texts(classifier, tokenizer, [e.text for e in examples], info.get("max_length", 128))
    labels = torch.tensor([e.label for e in examples])
    accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
    return {"task": task, "split": split, "examples": len(examples), "accuracy": accuracy}


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the tensor files in a folder (what shipping the adapter costs)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
