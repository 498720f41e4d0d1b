"""Training: the loop (`train`, `TrainingArguments`) and whole classification jobs (`train_classifier`).

    from peftkit.train import TrainingArguments, train
    result = train(peft_model, train_features, eval_features, TrainingArguments(output_dir="runs/x"), collate_fn)
"""

import importlib

# Imported on first use, so that reading data (peftkit.train.data, which peftkit.tasks needs) does not
# pull in the jobs, which need the built-in models and tasks: no import cycle.
_HOMES = {"JobResult": "job", "evaluate_run": "job", "load_run": "job", "train_classifier": "job",
          "TrainingArguments": "arguments", "TrainResult": "loop", "train": "loop"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'peftkit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftkit.train.{_HOMES[name]}"), name)

__all__ = ["JobResult", "TrainResult", "TrainingArguments", "evaluate_run", "load_run", "train", "train_classifier"]
