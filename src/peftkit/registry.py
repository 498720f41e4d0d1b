"""The one registry of methods: each method file declares its `METHODS` (name, config class, the
defaults and learning rate `peftkit train` uses) and holds its layers (`add_adapter`); this module
collects them. Adding a method is its file plus one line in METHOD_FILES.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from peftkit.config import Method, PeftConfig
from peftkit.errors import PeftkitError
from peftkit.methods import (
    adalora,
    adapter,
    bitfit,
    freeze,
    full,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    oft,
    prefix,
    prompt,
    sparse,
    vera,
)
from peftkit.methods.base import WholeModelMethod

# One entry per method file (the names are listed sorted wherever they are shown).
METHOD_FILES: tuple[ModuleType, ...] = (
    lora, adalora, vera, loha, lokr, oft, ia3, adapter, prompt, prefix, sparse, bitfit, ln_tuning, freeze, full,
)

METHODS: dict[str, Method] = {method.name: method for file in METHOD_FILES for method in file.METHODS}
# peft_type -> the file whose `add_adapter` adds it (full fine-tuning changes the base and adds nothing).
ADAPTER_FILES: dict[str, ModuleType] = {
    method.config.peft_type: file for file in METHOD_FILES if hasattr(file, "add_adapter") for method in file.METHODS
}

# peft_type -> how PeftModel runs a method that trains the base model itself (full fine-tuning).
WHOLE_MODEL_METHODS: dict[str, WholeModelMethod] = {
    method.config.peft_type: file.WHOLE_MODEL for file in METHOD_FILES if hasattr(file, "WHOLE_MODEL") for method in file.METHODS
}

DEFAULT_EPOCHS = 2  # passes over the data when neither the caller nor the method says otherwise
DEFAULT_LEARNING_RATE = 5e-4


def list_methods() -> list[str]:
    return sorted(METHODS)


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise PeftkitError(f"unknown method {name!r}; methods: {', '.join(list_methods())}") from None


def method_for(config: PeftConfig) -> ModuleType:
    """The method file that adds `config`'s adapter to a model."""
    try:
        return ADAPTER_FILES[config.peft_type]
    except KeyError:
        raise PeftkitError(
            f"{type(config).__name__} is not an adapter method; adapter methods: {', '.join(sorted(ADAPTER_FILES))}"
        ) from None


def whole_model_method(config: PeftConfig) -> WholeModelMethod | None:
    """How PeftModel runs `config`'s method when it trains the base model itself (full fine-tuning); None
    for adapter methods."""
    return WHOLE_MODEL_METHODS.get(config.peft_type)


def method_config(name: str, task_type: str = "SEQ_CLS", **options: Any) -> PeftConfig:
    """The config for method `name` with its classification defaults, updated by `options`.

    task_type: "SEQ_CLS" (a new classifier head is trained with the adapter) or "CAUSAL_LM".
    An option given as None drops the job's default and leaves the config class's own default.
    """
    declared = method(name)
    values = {k: v for k, v in {**declared.defaults, **options}.items() if v is not None}
    if declared.config.peft_type != "FULL":
        values.setdefault("task_type", task_type)
    known = {f.name for f in dataclasses.fields(declared.config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PeftkitError(f"option(s) {unknown} do not apply to method {name!r}; its options: {', '.join(sorted(known))}")
    return declared.config(**values)


def causal_method_config(name: str, **options: Any) -> PeftConfig:
    """The config for method `name` on a causal LM (task_type CAUSAL_LM): its causal defaults over its
    classification ones, updated by `options`."""
    return method_config(name, task_type="CAUSAL_LM", **{**(method(name).causal_defaults or {}), **options})


def default_learning_rate(name: str) -> float:
    return METHODS[name].learning_rate if name in METHODS else DEFAULT_LEARNING_RATE


def causal_learning_rate(name: str) -> float:
    if name in METHODS and METHODS[name].causal_learning_rate is not None:
        return METHODS[name].causal_learning_rate
    return default_learning_rate(name)


def default_epochs(name: str) -> float:
    return (METHODS[name].epochs if name in METHODS else None) or DEFAULT_EPOCHS
