"""Training checkpoints: folders written atomically, loaded without unpickling code.

Layout of one checkpoint, ``<output_dir>/checkpoints/step-<N>/``::

    trainable.safetensors   trainable parameters, keyed by parameter name
    optimizer.pt            optimizer.state_dict()        (torch.save, tensors and plain types only)
    scheduler.pt            lr scheduler state_dict()     (same; not in co-training's, whose schedules are pure)
    scaler.pt               fp16 gradient scaler state    (only with mixed_precision="fp16")
    rng_state_<rank>.pt     torch CPU/CUDA, Python and NumPy RNG states of process <rank>
    state.json              step, epoch, batch within epoch, best metric, history, ...

Every ``.pt`` file is loaded with ``torch.load(..., weights_only=True)``, so a checkpoint can never run
code. A checkpoint is written into a hidden temporary folder and renamed into place with
``os.replace``; ``state.json`` is written last. A ``step-<N>`` folder is therefore always complete,
and a run killed while saving leaves the previous checkpoints untouched.

Single-task training (peftkit.train.loop) and co-training (peftkit.train.cotrain, where a step is a
forward pass, the trainable tensors are the stacked adapter slots and the optimizer is SlotAdamW)
write and read this one format through these functions.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peftkit.errors import PeftkitError

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINABLE_FILENAME = "trainable.safetensors"
STATE_FILENAME = "state.json"
OPTIMIZER_FILENAME = "optimizer.pt"
SCHEDULER_FILENAME = "scheduler.pt"
SCALER_FILENAME = "scaler.pt"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"


# --------------------------------------------------------------------------- durability


def _fsync_directory(path: Path) -> None:
    # Makes a rename durable across a power cut; not every platform allows opening a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _to_saveable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


# --------------------------------------------------------------------------- trainable parameters


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters with ``requires_grad=True``, by name, in ``model.named_parameters()`` order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the tensors saved at ``path`` into the trainable parameters of ``model``, in place.

    Raises PeftkitError, naming the tensor, when the names or shapes differ from the model's.
    """
    load_tensors_into(trainable_parameters(model), path)


def load_tensors_into(params: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy the tensors saved at ``path`` into ``params`` (name -> tensor), in place; the file must hold
    exactly these names with these shapes (PeftkitError naming the first that differs)."""
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        saved_names = set(handle.keys())
        missing = [name for name in params if name not in saved_names]
        unexpected = sorted(saved_names - set(params))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"trainable parameters missing from the file: {_short_list(missing)}")
            if unexpected:
                parts.append(
                    f"tensors in the file that are not trainable parameters of the model: {_short_list(unexpected)}"
                )
            raise PeftkitError(
                f"{path} does not match the model: " + "; ".join(parts) + ". "
                "Resume with the same model and the same trainable parameters (same adapter config), "
                "or start a fresh run in another output_dir."
            )
        tensors = {}
        for name, param in params.items():
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise PeftkitError(
                    f"{path}: tensor '{name}' has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"{tuple(param.shape)} in the model. Resume with the same model and adapter config "
                    "that wrote the checkpoint, or start a fresh run in another output_dir."
                )
            tensors[name] = tensor
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------- random number generators


def capture_rng_state() -> dict[str, Any]:
    """RNG states of this process as tensors and plain types, so ``weights_only=True`` can load them."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [
            np_kind,
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(cuda_states)} devices but this machine has "
                f"{torch.cuda.device_count()}; CUDA randomness (dropout on GPU) will not repeat exactly",
                stacklevel=2,
            )


# --------------------------------------------------------------------------- checkpoint folders


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, folder), oldest first.

    Temporary folders (a save that was cut off) and folders without ``state.json`` are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILENAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume_checkpoint(resume: bool | str, output_dir: str | os.PathLike) -> Path:
    """The checkpoint folder that ``resume`` points at.

    ``True``: the newest checkpoint in ``<output_dir>/checkpoints``. A string: either a checkpoint
    folder itself, or an output folder / checkpoints folder whose newest checkpoint is taken.
    """
    if resume is True:
        root = checkpoints_dir(output_dir)
        found = latest_checkpoint(root)
        if found is None:
            raise PeftkitError(
                f"resume=True but there is no complete checkpoint in {root}. Start without resume, "
                "or pass resume='<path to a step-N checkpoint folder>'."
            )
        return found
    path = Path(resume)
    if (path / STATE_FILENAME).is_file():
        return path
    for root in (path, checkpoints_dir(path)):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise PeftkitError(
        f"resume={str(resume)!r}: no checkpoint there (expected a step-N folder with {STATE_FILENAME}, "
        "or an output_dir holding checkpoints/step-N folders)."
    )


def remove_temporary_folders(root: str | os.PathLike) -> None:
    """Delete leftovers of saves that were cut off (hidden ``.tmp-*`` entries)."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith(_TEMPORARY_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints; each is renamed away first, then removed."""
    found = list_checkpoints(root)
    for _, folder in found[: max(0, len(found) - keep)]:
        doomed = folder.with_name(f"{_TEMPORARY_PREFIX}delete-{folder.name}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def temporary_checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """The folder a checkpoint is assembled in; the same name on every process of a run."""
    return Path(root) / f"{_TEMPORARY_PREFIX}step-{step}"


def prepare_temporary_dir(root: str | os.PathLike, step: int) -> Path:
    temporary = temporary_checkpoint_dir(root, step)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def rng_filename(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def write_process_rng(temporary: Path, rank: int) -> None:
    torch.save(capture_rng_state(), temporary / rng_filename(rank))


def finish_checkpoint(
    temporary: Path,
    *,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict | None,
    scaler_state: dict | None,
    state: dict,
    keep: int,
) -> Path:
    """Write the shared files into ``temporary``, rename it to ``step-<step>`` and prune old ones.

    Called by the main process only, after every process wrote its RNG state into ``temporary``.
    ``scheduler_state`` None: the run has no scheduler object (co-training's schedules are functions of
    each task's step count, which ``state`` holds).
    """
    save_file(_to_saveable(trainable), str(temporary / TRAINABLE_FILENAME))
    torch.save(optimizer_state, temporary / OPTIMIZER_FILENAME)
    if scheduler_state is not None:
        torch.save(scheduler_state, temporary / SCHEDULER_FILENAME)
    if scaler_state is not None:
        torch.save(scaler_state, temporary / SCALER_FILENAME)
    with open(temporary / STATE_FILENAME, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2)
        handle.write("\n")
    for entry in temporary.iterdir():
        _fsync_file(entry)
    _fsync_directory(temporary)

    final = temporary.parent / f"step-{step}"
    if final.exists():
        # os.replace cannot put a folder over a non-empty one: move the old one aside first.
        stale = final.with_name(f"{_TEMPORARY_PREFIX}replaced-{final.name}")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(temporary, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary, final)
    _fsync_directory(final.parent)
    prune_checkpoints(final.parent, keep)
    return final


def read_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_FILENAME
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise PeftkitError(f"{path} is not valid JSON ({error}); the checkpoint is damaged: resume from another "
                           "step-N folder, or start afresh in another output_dir") from None


def load_torch_file(path: Path) -> Any:
    """Load a checkpoint ``.pt`` file; never unpickles anything but tensors and plain types."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PeftkitError(f"checkpoint file {path} is missing; the checkpoint folder is damaged.") from None
    except Exception as error:  # torch raises UnpicklingError (and others) for disallowed content
        raise PeftkitError(
            f"could not load {path} with weights_only=True ({type(error).__name__}: {error}). "
            "peftkit checkpoints hold only tensors and plain values; this file was not written by "
            "peftkit or is damaged."
        ) from None
