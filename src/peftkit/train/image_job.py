"""A whole image-classification job: an image model + an image task + a method in, a trained adapter out.

What `peftkit train --model efficientnet-lite0 --task mnist-5k` runs (any model whose kind is
"image": the built-in EfficientNet-Lite0, or a local transformers image-classification folder). It
shares the text job's pieces (options checked before loading, seeded wrapping, the training loop,
the run folder's layout and `JobResult`); the run info has `"kind": "image"` and the preprocessing,
and the adapter folder carries `preprocessor_config.json`, so `peftkit eval`, `predict`, `merge`,
`export` and `serve` need nothing else.

Method defaults on a CNN: where a method's default target is "all-linear" (the only linear layer
of a CNN is its head), the model's own `default_target_modules` replace it (EfficientNet-Lite: its
pointwise convolutions). Methods that cannot apply (prompt / prefix tuning need token embeddings and
attention) are refused when the model is wrapped, with the reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit import io
from peftkit.config import PeftConfig
from peftkit.errors import PeftkitError
from peftkit.models import BUILTIN_MODELS, resolve_model
from peftkit.registry import default_learning_rate, method_config
from peftkit.train.data import DEFAULT_VALIDATION_FRACTION, describe_holdout, with_validation
from peftkit.train.job import JobResult, examples_for_run, folder_bytes, read_run_info, save_run, training_arguments, wrap_with_adapter
from peftkit.train.loop import train
from peftkit.train.processes import is_main_process
from peftkit.vision.data import BUILTIN_IMAGE_TASKS, check_images, load_image_task
from peftkit.vision.images import Augmentation, ImageCollator, ImagePreprocessor, image_features, load_image
from peftkit.vision.models import load_image_classifier

# The built-in image task's job: its 3,000 training images in 1 epoch fit the 10-minute budget on 2 CPU cores.
IMAGE_DEFAULT_EPOCHS = 1
# Input size per built-in task where the model's own (224 for EfficientNet-Lite0) would waste compute: mnist-5k's
# digits are 28 x 28 pixels, and 64 x 64 costs a twelfth of 224 x 224 (--image-size 224 gives the model's own).
TASK_IMAGE_SIZES = {"mnist-5k": 64}


def image_method_config(method: str, model: torch.nn.Module, options: dict[str, Any] | None = None) -> PeftConfig:
    """The method's config for an image classifier: its defaults, with the model's own default targets where the
    method's default is "all-linear" (or, for IA3, names of transformer modules) and the caller did not choose targets."""
    options = dict(options or {})
    rank = getattr(model, "default_lora_r", None)
    if rank and method in ("lora", "dora") and "r" not in options:
        options.setdefault("r", rank)
        options.setdefault("lora_alpha", 2 * rank)
    config = method_config(method, **options)
    own = getattr(model, "default_target_modules", None)
    if not own or "target_modules" in options:
        return config
    if getattr(config, "target_modules", None) == "all-linear":
        return config.replace(target_modules=list(own))
    if method == "ia3":  # its defaults name transformer modules (key, value, output.dense)
        return config.replace(target_modules=list(own), feedforward_modules=list(getattr(model, "default_feedforward_modules", [])))
    return config


def train_image_classifier(
    model: str = "efficientnet-lite0",
    task: str = "mnist-5k",
    method: str = "lora",
    output_dir: str | os.PathLike = "runs/image",
    *,
    config: PeftConfig | None = None,
    method_options: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    image_size: int | None = None,
    augmentation: Augmentation | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    seed: int = 0,
    validation_fraction: float | None = DEFAULT_VALIDATION_FRACTION,
    log=None,
) -> JobResult:
    """Train `method` on image `task` with base `model`; save the best adapter to `output_dir/adapter`.

    `image_size` changes the input size (default: TASK_IMAGE_SIZES for a built-in task, else the model's own);
    `augmentation` turns on a random crop and / or a flip for the training images. Returns the same
    measurements as the text job (validation accuracy, trainable share, adapter size, time, memory).
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    given = {k: v for k, v in (training or {}).items() if not (k == "epochs" and v is None)}
    defaults = {"learning_rate": default_learning_rate(method), "epochs": IMAGE_DEFAULT_EPOCHS, "seed": seed}
    arguments = training_arguments(output_dir, defaults, given)
    data = load_image_task(task, image_column=image_column, label_column=label_column)
    if not data.train:
        raise PeftkitError(f"task {task!r} has no training examples")
    data, holdout = with_validation(data, validation_fraction)
    if holdout and log is not None:
        log(describe_holdout(str(task), holdout))
    check_images(data)  # a bad file stops the run here, with its path, not mid-epoch
    base, preprocessor = load_image_classifier(model, num_labels=len(data.label_names), id2label=data.label_names, seed=seed)
    image_size = image_size or TASK_IMAGE_SIZES.get(str(task))
    if image_size is not None:
        preprocessor = preprocessor.with_image_size(image_size)
    peft_config = config or image_method_config(method, base, method_options)
    wrapped = wrap_with_adapter(base, peft_config, seed)
    evaluation = data.validation or data.test
    train_examples = data.train[:max_train_examples] if max_train_examples else data.train
    eval_examples = (evaluation[:max_eval_examples] if max_eval_examples else evaluation) if evaluation else None
    augmentation = augmentation or Augmentation()
    result = train(wrapped, image_features(train_examples, augment=True),
                   image_features(eval_examples) if eval_examples else None, arguments,
                   ImageCollator(preprocessor, augmentation))

    adapter_dir = output_dir / "adapter"
    task_id = str(task) if str(task) in BUILTIN_IMAGE_TASKS else str(Path(task).resolve())
    model_id = str(model) if str(model) in BUILTIN_MODELS else str(resolve_model(model).resolve())
    if is_main_process():
        save_run(wrapped, preprocessor, adapter_dir, kind="image", model=model_id, task=task_id, method=method,
                 label_names=data.label_names, preprocessing=preprocessor.to_dict(), augmentation=augmentation.to_dict(),
                 image_column=image_column, label_column=label_column, validation_holdout=holdout)
        preprocessor.save_pretrained(adapter_dir)  # the adapter folder carries the preprocessing its model needs
    report = wrapped.trainable_parameters_report()
    best = result.best_eval or result.final_eval or {}
    job = JobResult(
        model=str(model), task=str(task), method=method, validation_accuracy=best.get("accuracy"),
        trainable_parameters=report.trainable, total_parameters=report.total, trainable_share=report.share,
        adapter_bytes=folder_bytes(adapter_dir), wall_time_s=time.perf_counter() - started,
        train_time_s=result.wall_time_s, peak_rss_mb=result.peak_rss_mb, examples_per_second=result.examples_per_second,
        steps=result.steps, output_dir=str(output_dir), adapter_dir=str(adapter_dir), validation_holdout=holdout,
    )
    if is_main_process():
        io.write_json(output_dir / "job.json", job.to_dict())
    return job


def is_image_run(folder: str | os.PathLike) -> bool:
    return read_run_info(folder).get("kind") == "image"


def load_image_run(folder: str | os.PathLike, model: str | None = None):
    """A saved image run ready for inference: (model, ImagePreprocessor, run info)."""
    from peftkit.model import PeftModel

    folder = Path(folder)
    if not folder.is_dir():
        raise PeftkitError(f"{folder} is not a folder; give the adapter folder written by `peftkit train` (runs/NAME/adapter)")
    info = read_run_info(folder)
    labels = info.get("label_names")
    preprocessor = ImagePreprocessor.from_folder(folder)
    if info.get("full_finetune"):
        classifier, _ = load_image_classifier(folder, id2label=labels)
        return classifier.eval(), preprocessor, info
    base_name = model or info.get("model")
    if base_name is None:
        raise PeftkitError(f"{folder} does not say which base model it adapts; pass --model NAME_OR_FOLDER")
    base, _ = load_image_classifier(base_name, num_labels=len(labels) if labels else None, id2label=labels)
    wrapped = PeftModel.from_pretrained(base, folder)
    return wrapped.eval(), preprocessor, info


@torch.no_grad()
def predict_images(model, preprocessor: ImagePreprocessor, images: list, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (len(images), num_labels) for image paths, uint8 arrays or PIL images."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = torch.stack([preprocessor.pixels(load_image(image) if isinstance(image, (str, os.PathLike, np.ndarray)) else image)
                              for image in chunk])
        outputs.append(model(pixel_values=pixels).logits.float().softmax(-1))
    return torch.cat(outputs)


def evaluate_image_run(folder, task: str | None = None, split: str = "validation", model: str | None = None,
                       max_examples: int | None = None) -> dict[str, Any]:
    """Accuracy of a saved image run on a task split (default: the task it was trained on)."""
    classifier, preprocessor, info = load_image_run(folder, model=model)
    task, examples = examples_for_run(folder, info, task, split, max_examples,
                                      lambda name, columns: load_image_task(name, **columns), "image_column", "image")
    probabilities = predict_images(classifier, preprocessor, [example.image for example in examples])
    labels = torch.tensor([example.label for example in examples])
    accuracy = (probabilities.argmax(-1) == labels).float().mean().item()
    return {"task": str(task), "split": split, "examples": len(examples), "accuracy": accuracy}

