"""Built-in tasks: sst2, trec, cr and mr are small public sentence-classification benchmarks packaged
under `peftkit/data/textcls/` (sources and licences in `peftkit/data/ATTRIBUTION.md`); sst2-phrases is
the 67k-phrase GLUE SST-2 training set, evaluated on sst2's validation and test sentences. Anything else
is read from disk by `peftkit.train.data.load_task_path`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.models import did_you_mean
from peftkit.train.data import ACCEPTED_DATA_FORMS, TaskData, load_task_files, load_task_path, read_label_names

__all__ = ["BUILTIN_TASKS", "BuiltinTask", "TASK_DATA_FOLDER", "list_tasks", "load_task"]


TASK_DATA_FOLDER = Path(__file__).parent / "data" / "textcls"


@dataclass(frozen=True)
class BuiltinTask:
    """A task packaged under peftkit/data/textcls; file paths are relative to that folder."""

    name: str
    description: str
    meta_file: str  # its "labels" give the class names in id order
    split_files: Mapping[str, str]  # split name -> data file


def _standard_task(name: str, description: str) -> BuiltinTask:
    return BuiltinTask(
        name=name,
        description=description,
        meta_file=f"{name}/meta.json",
        split_files={split: f"{name}/{split}.jsonl" for split in ("train", "validation", "test")},
    )


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    task.name: task
    for task in (
        _standard_task("sst2", "SST-2 movie review sentiment, sentences, 2 classes"),
        BuiltinTask(
            name="sst2-phrases",
            description="SST-2 sentiment, trained on GLUE's 67k phrases, evaluated on sst2 sentences",
            meta_file="sst2-phrases/meta.json",
            # Validation and test are sst2's own files (validation = GLUE dev), not copies.
            split_files={
                "train": "sst2-phrases/train.jsonl.gz",
                "validation": "sst2/validation.jsonl",
                "test": "sst2/test.jsonl",
            },
        ),
        _standard_task("trec", "TREC question type, 6 classes"),
        _standard_task("cr", "customer review sentiment, 2 classes"),
        _standard_task("mr", "movie review sentence sentiment, 2 classes"),
    )
}


def list_tasks() -> list[str]:
    """The names of the built-in tasks."""
    return sorted(BUILTIN_TASKS)


def load_task(name_or_path: str | Path, text_column: str = "text", label_column: str = "label") -> TaskData:
    """Loads a built-in task by name, or a task from a file or folder.

    Accepted paths: a folder with train/validation/test `.jsonl` or `.csv` files (and an optional
    meta.json listing label names), a single `.jsonl` or `.csv` file (the train split), or a folder
    saved with Hugging Face datasets' `save_to_disk`. `text_column` and `label_column` name the
    columns in the user's files.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_TASKS:
        task = BUILTIN_TASKS[name_or_path]
        if (text_column, label_column) != ("text", "label"):
            raise PeftkitError(
                f"the built-in task {task.name!r} has the columns 'text' and 'label'; "
                f"--text-column and --label-column are for your own data files"
            )
        return load_task_files(
            task.name,
            {split: TASK_DATA_FOLDER / file for split, file in task.split_files.items()},
            label_names=read_label_names(TASK_DATA_FOLDER / task.meta_file),
        )
    path = Path(name_or_path).expanduser()
    if path.exists():
        return load_task_path(path, text_column, label_column)
    known = ", ".join(f"{name} ({task.description})" for name, task in sorted(BUILTIN_TASKS.items()))
    raise PeftkitError(
        f"unknown task {str(name_or_path)!r}: it is neither a built-in task nor an existing path."
        f"{did_you_mean(str(name_or_path), list_tasks())} Built-in tasks are: {known}. "
        f"Or give {ACCEPTED_DATA_FORMS}."
    )
