"""Layer-wise freezing: train only chosen transformer blocks or named modules, optionally LayerNorms.

The chosen modules train as copies that replace the originals while the adapter is active, so the
base model stays untouched and shared; a saved adapter holds the full weights of those modules only.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import ReplacementDelta, attach_delta, iter_base_modules
from peftkit.targeting import find_layer_blocks, find_targets

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _is_norm(module: nn.Module) -> bool:
    # Llama's RMSNorm and similar are not torch.nn classes; recognise them by name.
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@register_config
@dataclasses.dataclass
class FreezeConfig(PeftConfig):
    """layers_to_train: block indices to train (negative counts from the end); last_k: train the
    last k blocks; target_modules: module names or a regex to train whole; train_layernorm: also
    train every normalisation layer; modules_to_save: modules trained whole (e.g. the head)."""

    peft_type = "FREEZE"

    layers_to_train: list[int] | None = None
    last_k: int | None = None
    target_modules: list[str] | str | None = None
    train_layernorm: bool = False
    modules_to_save: list[str] | None = None

    def validate(self):
        super().validate()
        if self.last_k is not None and self.last_k <= 0:
            raise PeftkitError(f"FreezeConfig.last_k must be positive, got {self.last_k}")
        if self.layers_to_train is not None and self.last_k is not None:
            raise PeftkitError("FreezeConfig: give layers_to_train or last_k, not both")
        if not (self.layers_to_train or self.last_k or self.target_modules or self.train_layernorm or self.modules_to_save):
            raise PeftkitError(
                "FreezeConfig trains nothing: set layers_to_train, last_k, target_modules or train_layernorm"
            )


def add_adapter(model: nn.Module, config: FreezeConfig, adapter_name: str, skip: list[str]) -> list[str]:
    chosen: list[str] = []
    if config.layers_to_train is not None or config.last_k is not None:
        blocks = find_layer_blocks(model)
        indices = config.layers_to_train if config.layers_to_train is not None else range(-config.last_k, 0)
        for index in indices:
            if not -len(blocks) <= index < len(blocks):
                raise PeftkitError(
                    f"layer {index} does not exist: {type(model).__name__} has {len(blocks)} blocks (0..{len(blocks) - 1})"
                )
            chosen.append(blocks[index])
    if config.target_modules:
        chosen += find_targets(model, config.target_modules, skip=skip)
    chosen = [n for n in dict.fromkeys(chosen) if n not in skip]
    if config.train_layernorm:
        inside = tuple(n + "." for n in chosen + list(skip))
        chosen += [
            name for name, module in iter_base_modules(model)
            if name and _is_norm(module) and not name.startswith(inside) and name not in skip
        ]
    # A module inside another chosen one trains with it already.
    chosen = [n for n in chosen if not any(n.startswith(other + ".") for other in chosen)]
    for name in chosen:
        attach_delta(model, name, adapter_name, ReplacementDelta)
    return chosen

# How `peftkit train` trains it. linear_probe trains the classification head alone on the frozen
# features (the usual baseline for image models): a FreezeConfig whose only trained module is the head.
METHODS = (
    Method("freeze", FreezeConfig, dict(last_k=2), learning_rate=1e-4),
    Method("linear_probe", FreezeConfig, dict(last_k=None, modules_to_save=["classifier", "score"]), learning_rate=1e-2),
)
