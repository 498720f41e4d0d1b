"""What an adapter folder holds: method, config, adapted modules, parameter count, file size."""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftkit import io
from peftkit.config import load_config
from peftkit.errors import PeftkitError


def inspect_adapter(folder: str | os.PathLike) -> dict:
    """A report of the adapter in `folder` (and of other adapters in its subfolders), from the files alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftkitError(f"{folder} is not a folder; give an adapter folder (with adapter_config.json)")
    if (folder / io.FULL_CONFIG_NAME).is_file() and not (folder / io.CONFIG_NAME).is_file():
        raise PeftkitError(f"{folder} holds a fully fine-tuned model, not an adapter; it loads with transformers directly")
    config = load_config(folder)
    tensors = io.read_tensors(folder / io.WEIGHTS_NAME)
    modules = sorted({_module_of(key) for key in tensors})
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    report = {
        "folder": str(folder),
        "peft_type": config.peft_type,
        "base_model": config.base_model_name_or_path,
        "config": json.loads(json.dumps(config.to_dict())),
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "dtype": ", ".join(dtypes),
        "file_bytes": (folder / io.WEIGHTS_NAME).stat().st_size,
        "modules": modules,
    }
    ranks = _ranks(tensors)
    if ranks:  # low-rank methods: the rank of each module (AdaLoRA's differ after allocation)
        report["ranks"] = ranks
    others = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / io.CONFIG_NAME).is_file()):
        inner = inspect_adapter(sub)
        others[sub.name] = {k: inner[k] for k in ("peft_type", "parameters", "file_bytes")}
    if others:
        report["other_adapters"] = others
    return report


# The first component of a file key that is an adapter tensor's own name, not part of the module path
# (peft's names for every method it has, and peftkit's for bottleneck adapters and sparse fine-tuning).
_TENSOR_NAMES = (
    "lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "ranknum",
    "ia3_l", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "vera_lambda_b", "vera_lambda_d", "ln_tuning_layers", "adapter_down", "adapter_up",
    "sparse_indices", "sparse_values", "base_layer", "modules_to_save",
)


# Tensors whose first dimension is the rank of their module's update (LoRA, AdaLoRA).
_RANK_SUFFIXES = (".lora_A.weight", ".lora_A", ".lora_embedding_A")


def _ranks(tensors: dict) -> dict[str, int]:
    """{module path: rank} read from the shapes of the A factors."""
    ranks = {}
    for key, tensor in tensors.items():
        name = key[len(io.KEY_PREFIX):] if key.startswith(io.KEY_PREFIX) else key
        suffix = next((s for s in _RANK_SUFFIXES if name.endswith(s)), None)
        if suffix is not None and tensor.dim() >= 1:
            ranks[name[: -len(suffix)]] = int(tensor.shape[0])
    return dict(sorted(ranks.items()))


def _module_of(key: str) -> str:
    name = key[len(io.KEY_PREFIX):] if key.startswith(io.KEY_PREFIX) else key
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part in _TENSOR_NAMES and position > 0:
            return ".".join(parts[:position])
    return name.rsplit(".", 1)[0] if "." in name else name
