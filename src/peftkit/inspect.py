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
    others = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / io.CONFIG_NAME).is_file()):
        inner = inspect_adapter(sub)
        others[sub.name] = {k: inner[k] for k in ("peft_type", "parameters", "file_bytes")}
    if others:
        report["other_adapters"] = others
    return report


_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".base_layer.bias")


def _module_of(key: str) -> str:
    name = key[len(io.KEY_PREFIX):] if key.startswith(io.KEY_PREFIX) else key
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]
