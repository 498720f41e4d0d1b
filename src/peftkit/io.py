"""Files: safetensors + JSON, written atomically, in the Hugging Face `peft` layout.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.<suffix>` (suffix as the method names it: `lora_A.weight`, `bias`,
...). Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peftkit.errors import PeftkitError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FULL_CONFIG_NAME = "peftkit_full_finetune.json"  # marks a folder written by full fine-tuning
KEY_PREFIX = "base_model.model."


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success rename it over `path` (never half a file)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        yield temporary
        # mkstemp creates the file 0600; give the result the permissions a plain open() would (0666 minus umask).
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors atomically (contiguous, no shared storage)."""
    clean = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(clean, temporary, metadata={"format": "pt", **(metadata or {})})


@contextmanager
def new_folder(path: str | os.PathLike, option: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block succeeds it is renamed to `path`, so the folder
    appears whole or not at all; when it fails the temporary folder is removed. A `path` that exists and is
    not empty is refused (a PeftkitError naming `option`)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PeftkitError(f"{path} exists and is not empty; choose a new {option}")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_adapter_folder(folder: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                         **other_files: dict) -> str:
    """Write one adapter in the peft layout: `adapter_model.safetensors` (keys `base_model.model.<path>...`)
    and `adapter_config.json` (`config`, with inference_mode true), each file atomically; `other_files`
    are more JSON files by name (`peftkit_run.json`). The one writer of adapter folders."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    write_tensors(os.path.join(folder, WEIGHTS_NAME), tensors)
    write_json(os.path.join(folder, CONFIG_NAME), {**config, "inference_mode": True})
    for name, data in other_files.items():
        write_json(os.path.join(folder, name), data)
    return folder


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; a damaged file gives a PeftkitError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PeftkitError(f"no tensor file at {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise PeftkitError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: save it again"
        ) from None


def adapter_folder(root: str | os.PathLike, adapter_name: str) -> str:
    """Where save_pretrained puts an adapter: the root for "default", a subfolder for the others (as peft)."""
    root = os.fspath(root)
    return root if adapter_name == "default" else os.path.join(root, adapter_name)


def check_adapter_name(name: str) -> str:
    """Adapter names become folder names: refuse anything that could leave the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise PeftkitError(
            f"adapter name {name!r} is not allowed: use letters, digits, '-', '_' (it becomes a folder name)"
        )
    return name
