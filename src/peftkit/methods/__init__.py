"""The PEFT methods, one file each, and the registry from config type to the method's code."""

from __future__ import annotations

from types import ModuleType

from peftkit.config import PeftConfig
from peftkit.errors import PeftkitError
from peftkit.methods import bitfit, freeze, full, lora
from peftkit.methods import adapter
from peftkit.methods import loha, lokr
from peftkit.methods import prompt
from peftkit.methods import prefix
from peftkit.methods import ia3, ln_tuning
from peftkit.methods import adalora
from peftkit.methods import vera
from peftkit.methods import sparse
from peftkit.methods import oft

# peft_type -> the module holding that method's `add_adapter` (and optional `export_config`).
METHODS: dict[str, ModuleType] = {
    "LORA": lora,
    "BOTTLENECK": adapter,
    "BITFIT": bitfit,
    "FREEZE": freeze,
    "LOHA": loha,
    "LOKR": lokr,
    "PROMPT_TUNING": prompt,
    "P_TUNING": prompt,
    "PREFIX_TUNING": prefix,
    "IA3": ia3,
    "LN_TUNING": ln_tuning,
    "ADALORA": adalora,
    "VERA": vera,
    "SPARSE": sparse,
    "OFT": oft,
}


def method_for(config: PeftConfig) -> ModuleType:
    try:
        return METHODS[config.peft_type]
    except KeyError:
        raise PeftkitError(
            f"{type(config).__name__} is not an adapter method; adapter methods: {', '.join(sorted(METHODS))}"
        ) from None
