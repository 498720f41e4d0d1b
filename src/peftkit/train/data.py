"""Text classification data: reading it from disk into examples, and holding out a validation split.

Reading. A task is a name, its label names, and up to three splits (train, validation, test) of
`Example(text, label)`. `load_task_path` reads one from disk in any of these forms:

- a folder with `train.jsonl` / `train.csv` (and optionally `validation.*` or `dev.*`, `test.*`),
  plus an optional `meta.json` holding `{"labels": [name, ...]}`;
- a single `.jsonl` / `.csv` file, which becomes the train split;
- a folder written by Hugging Face `datasets` `save_to_disk` (needs `pip install datasets`).

Labels are integers 0..K-1 or names. Names are given by `meta.json` or a `ClassLabel` feature where
there is one; otherwise integer labels name themselves ("0", "1", ...) and string labels are numbered
in sorted order of the names found in the train split. Every problem is reported with the file and
line (or the split and row) where it is, in a `PeftkitError`.

Tokenizing and batching the examples is peftkit.train.batching's (its names are importable from
here too).
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.train.batching import PaddingCollator, length_grouped_order, tokenize_examples

__all__ = ["ACCEPTED_DATA_FORMS", "DEFAULT_VALIDATION_FRACTION", "Example", "PaddingCollator", "TaskData",
           "describe_holdout", "hold_out_validation", "length_grouped_order", "load_task_files", "load_task_path",
           "read_label_names", "tokenize_examples", "with_validation"]

SPLITS = ("train", "validation", "test")

# The file names a folder's splits may have; common spellings of "validation" are accepted.
SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
DATA_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".tsv")

ACCEPTED_DATA_FORMS = (
    "a folder with train.jsonl or train.csv (and optionally validation.* and test.*, "
    "plus meta.json with {\"labels\": [...]}), a single .jsonl or .csv file (used as the train split), "
    "or a folder saved with Hugging Face datasets' save_to_disk"
)

_INTEGER_TEXT = re.compile(r"-?\d+")
_SHOWN_LABELS = 20


@dataclass(frozen=True, slots=True)
class Example:
    """One text and the id of its class (0..num_labels-1)."""

    text: str
    label: int


@dataclass
class TaskData:
    """A text classification task: its label names and its splits (None where a split is absent)."""

    name: str
    label_names: list[str]
    train: list[Example] | None
    validation: list[Example] | None = None
    test: list[Example] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class _RawSplit:
    """A split as read, before labels become ids; keeps each row's position for error messages."""

    source: str  # named in errors: a file path, or "<folder> split 'train'" for a saved dataset
    unit: str  # "line" for files, "row" for saved datasets
    texts: list[str] = field(default_factory=list)
    labels: list[int | str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def where(self, index: int) -> str:
        return f"{self.source} {self.unit} {self.positions[index]}"

    def add(self, text: str, label: int | str, position: int) -> None:
        self.texts.append(text)
        self.labels.append(label)
        self.positions.append(position)


def _describe_labels(label_names: Sequence[str]) -> str:
    shown = ", ".join(label_names[:_SHOWN_LABELS])
    if len(label_names) > _SHOWN_LABELS:
        shown += f", ... ({len(label_names)} in all)"
    return shown


def _missing_column_error(where: str, column: str, columns: Sequence[str], role: str) -> PeftkitError:
    flag = f"--{role}-column"
    return PeftkitError(
        f"{where}: no column {column!r}; columns are: {list(columns)}; "
        f"pass {flag} (or {role}_column= in Python) to name the {role} column"
    )


def _show(value: object) -> str:
    """A value as the user wrote it: JSON spelling where it has one (null, true), else repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _normalize_label(value: object, where: str) -> int | str:
    """A raw label as an int (a class id) or a str (a class name)."""
    # bool is an int subclass in Python; true/false as a label is almost surely a mistake.
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise PeftkitError(
            f"{where}: label {_show(value)} is neither a class id (0, 1, ...) nor a class name"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise PeftkitError(f"{where}: label {value} is not a whole number; class ids are 0, 1, ...")
    name = str(value).strip()
    if not name:
        raise PeftkitError(f"{where}: the label is empty")
    # CSV has no types, so "1" must mean class 1 there; treat JSON the same way for consistency.
    if _INTEGER_TEXT.fullmatch(name):
        return int(name)
    return name


def _check_text(value: object, where: str, text_column: str) -> str:
    if isinstance(value, str):
        return value
    raise PeftkitError(
        f"{where}: column {text_column!r} holds {_show(value)}, which is not a string"
    )


def binary_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file as bytes, read through gzip when its name ends in .gz."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as file:
        yield from file


def jsonl_records(path: Path, one_record: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, "PATH line N", parsed JSON) for each non-blank line of a .jsonl (or .jsonl.gz) file.

    Bad UTF-8 and bad JSON raise a PeftkitError naming the file and line; `one_record` describes a
    valid line for that message (e.g. 'one object like {"text": "...", "label": 0}').
    """
    for line_number, raw_line in enumerate(binary_lines(path), start=1):
        where = f"{path} line {line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PeftkitError(f"{where}: not UTF-8 text ({error.reason}); save the file as UTF-8") from None
        if line_number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))  # so an error points into the line, not past its end
        except json.JSONDecodeError as error:
            raise PeftkitError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be {one_record}"
            ) from None
        yield line_number, where, record


def _read_jsonl(path: Path, text_column: str, label_column: str) -> _RawSplit:
    split = _RawSplit(source=str(path), unit="line")
    example = f'one object like {{"{text_column}": "...", "{label_column}": 0}}'
    for line_number, where, row in jsonl_records(path, example):
        if not isinstance(row, dict):
            raise PeftkitError(
                f"{where}: expected a JSON object like "
                f'{{"{text_column}": "...", "{label_column}": 0}}, found a {type(row).__name__}'
            )
        if text_column not in row:
            raise _missing_column_error(where, text_column, list(row), "text")
        if label_column not in row:
            raise _missing_column_error(where, label_column, list(row), "label")
        split.add(
            _check_text(row[text_column], where, text_column),
            _normalize_label(row[label_column], where),
            line_number,
        )
    return split


def _first_non_utf8_line(path: Path) -> int:
    """The number of the first line of `path` that is not UTF-8 (the text reader only knows the byte offset)."""
    with open(path, "rb") as file:
        for number, raw_line in enumerate(file, start=1):
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _read_delimited(path: Path, delimiter: str, text_column: str, label_column: str) -> _RawSplit:
    split = _RawSplit(source=str(path), unit="line")
    try:
        # utf-8-sig drops the byte order mark that spreadsheet programs like to write.
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise PeftkitError(f"{path} is empty: no header line and no examples")
            for column, role in ((text_column, "text"), (label_column, "label")):
                if column not in header:
                    raise _missing_column_error(f"{path} line 1 (the header)", column, header, role)
            text_index, label_index = header.index(text_column), header.index(label_column)
            for row in reader:
                # line_num counts physical lines, so it is right even after quoted multi-line texts.
                where = f"{path} line {reader.line_num}"
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise PeftkitError(
                        f"{where}: {len(row)} fields, but the header has {len(header)} "
                        f"({header}); quote texts that contain {delimiter!r}"
                    )
                split.add(row[text_index], _normalize_label(row[label_index], where), reader.line_num)
    except UnicodeDecodeError as error:
        raise PeftkitError(f"{path} line {_first_non_utf8_line(path)}: not UTF-8 text ({error.reason}); "
                           "save the file as UTF-8") from None
    except csv.Error as error:
        kind = "CSV" if delimiter == "," else "TSV"
        raise PeftkitError(f"{path}: not a readable {kind} file ({error})") from None
    return split


def _read_data_file(path: Path, text_column: str, label_column: str) -> _RawSplit:
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            split = _read_jsonl(path, text_column, label_column)
        elif name.endswith(".csv"):
            split = _read_delimited(path, ",", text_column, label_column)
        elif name.endswith(".tsv"):
            split = _read_delimited(path, "\t", text_column, label_column)
        else:
            raise PeftkitError(
                f"{path}: unsupported file type; use .jsonl (one JSON object per line) or .csv "
                f"(with a header line), or .tsv / .jsonl.gz"
            )
    except (OSError, EOFError) as error:  # unreadable, or a truncated or corrupt .gz
        raise PeftkitError(f"{path}: cannot be read ({error})") from None
    if not split.texts:
        raise PeftkitError(f"{path} is empty: it holds no examples")
    return split


def read_label_names(meta_path: Path) -> list[str] | None:
    """The label names (in class id order) that a task's meta.json lists, or None where it lists none."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PeftkitError(f"{meta_path} line {error.lineno}: not valid JSON ({error.msg})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise PeftkitError(f'{meta_path}: "labels" must be a list of at least two label names (strings)')
    if len(set(labels)) != len(labels):
        raise PeftkitError(f'{meta_path}: "labels" lists a name twice: {labels}')
    return labels


# ---------------------------------------------------------------------------------------------
# Labels: from names or ids as read, to ids 0..K-1


def _label_names_from_train(train: _RawSplit) -> list[str]:
    """Label names inferred from the train split where no meta.json or ClassLabel gives them."""
    first_int = next((i for i, label in enumerate(train.labels) if isinstance(label, int)), None)
    first_name = next((i for i, label in enumerate(train.labels) if isinstance(label, str)), None)
    if first_int is not None and first_name is not None:
        raise PeftkitError(
            f"{train.where(first_name)}: label {train.labels[first_name]!r} is a name, but "
            f"{train.where(first_int)} has the class id {train.labels[first_int]}; use one kind of label"
        )
    if first_name is not None:
        names = sorted(set(train.labels))  # type: ignore[arg-type]
    else:
        for index, label in enumerate(train.labels):
            if label < 0:  # type: ignore[operator]
                raise PeftkitError(
                    f"{train.where(index)}: label {label} is negative; class ids are 0, 1, ..."
                )
        present = set(train.labels)
        num_labels = max(present) + 1  # type: ignore[type-var,operator]
        absent = [i for i in range(num_labels) if i not in present]
        if absent:
            raise PeftkitError(
                f"{train.source}: class ids must be 0..K-1 with every class present, but "
                f"{absent[:_SHOWN_LABELS]} never occur (ids found: {sorted(present)[:_SHOWN_LABELS]}); "
                f"renumber the labels, or list the label names in a meta.json next to the data"
            )
        names = [str(i) for i in range(num_labels)]
    if len(names) < 2:
        raise PeftkitError(
            f"{train.source}: only one label ({names[0]}) occurs in the train split; "
            f"a classifier needs two or more"
        )
    return names


def _label_ids(split: _RawSplit, label_names: list[str], names_from: str, accept_ids: bool) -> list[int]:
    """Each label of `split` as a class id.

    `names_from` says where the label names came from, for errors; `accept_ids` is False where the
    train split named its labels, since a bare id elsewhere would be a guess about their order.
    """
    id_of_name = {name: i for i, name in enumerate(label_names)}
    ids = []
    for index, label in enumerate(split.labels):
        if isinstance(label, int):
            if not accept_ids:
                raise PeftkitError(
                    f"{split.where(index)}: label {label} is a class id, but the train split uses "
                    f"label names (labels: {_describe_labels(label_names)}); use the names here too"
                )
            if not 0 <= label < len(label_names):
                raise PeftkitError(
                    f"{split.where(index)}: label {label} is outside 0..{len(label_names) - 1} "
                    f"(labels: {_describe_labels(label_names)})"
                )
            ids.append(label)
        elif label in id_of_name:
            ids.append(id_of_name[label])
        else:
            raise PeftkitError(
                f"{split.where(index)}: label {label!r} does not occur in {names_from} "
                f"(labels: {_describe_labels(label_names)})"
            )
    return ids


def _build_task(
    name: str,
    raw_splits: Mapping[str, _RawSplit],
    label_names: list[str] | None,
    names_from: str,
) -> TaskData:
    """Turns raw splits into a TaskData, numbering labels from `label_names` or from the train split."""
    accept_ids = True
    if label_names is None:
        label_names = _label_names_from_train(raw_splits["train"])
        names_from = "the train split"
        accept_ids = all(isinstance(label, int) for label in raw_splits["train"].labels)
    examples: dict[str, list[Example] | None] = dict.fromkeys(SPLITS)
    for split_name, split in raw_splits.items():
        if split_name != "train" and all(label == -1 for label in split.labels):
            # GLUE-style unlabeled test sets mark every label -1: there is nothing to evaluate on.
            warnings.warn(
                f"{split.source}: every label is -1 (unlabeled), so the {split_name} split is left out", stacklevel=2
            )
            continue
        ids = _label_ids(split, label_names, names_from, accept_ids)
        examples[split_name] = [Example(text, label) for text, label in zip(split.texts, ids)]
    return TaskData(name=name, label_names=list(label_names), **examples)


# ---------------------------------------------------------------------------------------------
# Task sources


def load_task_files(
    name: str,
    split_files: Mapping[str, Path],
    label_names: list[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> TaskData:
    """Reads a task from one data file per split (keys among "train", "validation", "test").

    `label_names`, where given, fixes the class ids; otherwise they come from the train split.
    """
    if "train" not in split_files:
        raise PeftkitError(f"task {name!r} has no train file")
    raw = {
        split: _read_data_file(Path(path), text_column, label_column) for split, path in split_files.items()
    }
    return _build_task(name, raw, label_names, names_from="the task's label names")


def _is_saved_dataset(folder: Path) -> bool:
    # save_to_disk writes dataset_dict.json for a DatasetDict, state.json for a single Dataset.
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _find_split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        candidates = [
            folder / f"{stem}{suffix}"
            for stem in stems
            for suffix in DATA_FILE_SUFFIXES
            if (folder / f"{stem}{suffix}").is_file()
        ]
        if len(candidates) > 1:
            raise PeftkitError(
                f"{folder}: more than one {split} file ({', '.join(p.name for p in candidates)}); keep one"
            )
        if candidates:
            found[split] = candidates[0]
    if "train" not in found:
        present = sorted(p.name for p in folder.iterdir())[:_SHOWN_LABELS]
        raise PeftkitError(
            f"{folder}: no train file; expected train.jsonl or train.csv (and optionally validation.* "
            f"and test.*); the folder holds: {present}"
        )
    return found


def _load_saved_dataset(folder: Path, text_column: str, label_column: str) -> TaskData:
    try:
        import datasets  # optional: only this form of input needs it
    except ImportError:
        raise PeftkitError(
            f"{folder} is a Hugging Face datasets folder (save_to_disk); reading it needs the datasets "
            f"package: pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(folder))
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    by_split: dict[str, object] = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        matches = [stem for stem in stems if stem in parts]
        if len(matches) > 1:
            raise PeftkitError(f"{folder}: more than one {split} split ({', '.join(matches)}); keep one")
        if matches:
            by_split[split] = parts[matches[0]]
    if "train" not in by_split:
        raise PeftkitError(f"{folder}: no 'train' split; the dataset's splits are: {sorted(parts)}")

    raw: dict[str, _RawSplit] = {}
    label_names: list[str] | None = None
    for split, dataset in by_split.items():
        source = f"{folder} split {split!r}"
        for column, role in ((text_column, "text"), (label_column, "label")):
            if column not in dataset.column_names:
                raise _missing_column_error(source, column, dataset.column_names, role)
        feature = dataset.features[label_column]
        if label_names is None and isinstance(feature, datasets.ClassLabel):
            label_names = list(feature.names)
        raw_split = _RawSplit(source=source, unit="row")
        for row, (text, label) in enumerate(zip(dataset[text_column], dataset[label_column]), start=1):
            where = f"{source} row {row}"
            raw_split.add(_check_text(text, where, text_column), _normalize_label(label, where), row)
        if not raw_split.texts:
            raise PeftkitError(f"{source} is empty: it holds no examples")
        raw[split] = raw_split
    return _build_task(folder.name, raw, label_names, names_from="the dataset's ClassLabel names")


def load_task_path(path: str | Path, text_column: str = "text", label_column: str = "label") -> TaskData:
    """Reads a task from a data file or folder, in any of the forms this module's docstring lists."""
    path = Path(path).expanduser()
    if path.is_file():
        name = path.name
        for suffix in DATA_FILE_SUFFIXES:
            name = name.removesuffix(suffix)
        return load_task_files(name, {"train": path}, None, text_column, label_column)
    if not path.is_dir():
        raise PeftkitError(f"{path} does not exist; give {ACCEPTED_DATA_FORMS}")
    if _is_saved_dataset(path):
        return _load_saved_dataset(path, text_column, label_column)
    split_files = _find_split_files(path)
    meta_path = path / "meta.json"
    label_names = read_label_names(meta_path) if meta_path.is_file() else None
    raw = {split: _read_data_file(file, text_column, label_column) for split, file in split_files.items()}
    return _build_task(path.name, raw, label_names, names_from=f"the labels of {meta_path}")


# ---------------------------------------------------------------------------------------------
# A validation split for a task that has none

# The held-out part is drawn with this seed whatever the run's seed, so runs with other seeds, other
# methods (peftkit compare) and `peftkit eval` later all score on the same examples.
VALIDATION_SPLIT_SEED = 0
DEFAULT_VALIDATION_FRACTION = 0.1


def hold_out_validation(data: TaskData, fraction: float, seed: int = VALIDATION_SPLIT_SEED) -> TaskData:
    """`data` with a seeded, stratified part of its train split moved to a new validation split.

    Each class gives round(fraction x its count) examples, at least one where it has two or more, so
    every class with a second example is scored. Both parts keep the file's order. The same
    (fraction, seed) on the same file gives the same split.
    """
    if isinstance(fraction, bool) or not 0 < fraction < 1:
        raise PeftkitError(f"the validation fraction must be between 0 and 1 (e.g. 0.1), got {fraction!r}; "
                           "0 holds nothing out")
    if data.validation:
        raise PeftkitError(f"task {data.name!r} already has a validation split; nothing to hold out")
    train = data.train or []
    by_label: dict[int, list[int]] = {}
    for index, example in enumerate(train):
        by_label.setdefault(example.label, []).append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_label):
        indices = list(by_label[label])
        rng.shuffle(indices)
        count = round(fraction * len(indices))
        if count == 0 and len(indices) >= 2:
            count = 1
        held.update(indices[:count])
    if not held or len(held) == len(train):
        raise PeftkitError(f"task {data.name!r} has {len(train)} training examples, too few to hold out "
                           f"{fraction:g} of them for validation; add examples, or pass --validation-fraction 0")
    return TaskData(
        name=data.name, label_names=data.label_names,
        train=[example for index, example in enumerate(train) if index not in held],
        validation=[example for index, example in enumerate(train) if index in held],
        test=data.test,
    )


def with_validation(data: TaskData, fraction: float | None) -> tuple[TaskData, dict | None]:
    """The task with a validation split: its own, or (fraction > 0) one held out of its train split.

    Returns (task, holdout) where holdout is None, or {"fraction", "seed", "examples"} to record in
    the run so that evaluation later rebuilds the same split."""
    if data.validation or not fraction:
        return data, None
    split = hold_out_validation(data, fraction)
    return split, {"fraction": fraction, "seed": VALIDATION_SPLIT_SEED, "examples": len(split.validation)}


def describe_holdout(task: str, holdout: dict) -> str:
    """The line a run prints when it held out a validation split."""
    return (f"validation: {task} has no validation split, so {holdout['examples']} examples "
            f"({100 * holdout['fraction']:g}% of its training examples, stratified by label, seed {holdout['seed']}) "
            "are held out for it; --validation-fraction 0 trains on all of them")
