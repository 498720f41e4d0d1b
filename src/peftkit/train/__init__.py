"""Training: the loop (`train`, `TrainingArguments`) and whole classification jobs (`train_classifier`).

    from peftkit.train import TrainingArguments, train
    result = train(peft_model, train_features, eval_features, TrainingArguments(output_dir="runs/x"), collate_fn)
"""

from peftkit.train.job import JobResult, evaluate_run, load_run, train_classifier
from peftkit.train.loop import TrainingArguments, TrainResult, train

__all__ = ["JobResult", "TrainResult", "TrainingArguments", "evaluate_run", "load_run", "train", "train_classifier"]
