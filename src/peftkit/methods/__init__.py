"""The PEFT methods, one file each, and the registry from config type to the method's code."""

from __future__ import annotations

from types import ModuleType

from peftkit.config import PeftConfig
from peftkit.errors import PeftkitError
from peftkit.methods import bitfit, freeze, full, lora

# peft_type -> the module holding that method's `add_adapter` (and optional `export_config`).
METHODS: dict[str, ModuleType] = {
    "LORA": lora,
    "BITFIT": bitfit,
    "FREEZE": freeze,
}


def method_for(config: PeftConfig) -> ModuleType:
    try:
        return METHODS[config.peft_type]
    except KeyError:
        raise PeftkitError(
            f"{type(config).__name__} is not an adapter method; adapter methods: {', '.join(sorted(METHODS))}"
        ) from None
