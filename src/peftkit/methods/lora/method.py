"""LoRA as a peftkit method: which layers it adapts, `add_adapter`, the config written next to saved
tensors (`export_config`), and how `peftkit train` trains it (`METHODS`, collected by peftkit.registry)."""

from __future__ import annotations

import math

from torch import nn

from peftkit.config import Method
from peftkit.errors import PeftkitError
from peftkit.methods.base import BiasDelta, attach_delta, iter_base_modules
from peftkit.methods.lora.config import LoraConfig, module_rank_and_scaling
from peftkit.methods.lora.dora import DoraConv2dDelta, DoraLinearDelta
from peftkit.methods.lora.layer import LoraConv2dDelta, LoraEmbeddingDelta, LoraLinearDelta
from peftkit.targeting import find_targets, linear_types, other_bias_modules


def _delta_class(base_layer: nn.Module, use_dora: bool = False):
    if isinstance(base_layer, linear_types()):
        return DoraLinearDelta if use_dora else LoraLinearDelta
    if isinstance(base_layer, nn.Conv2d):
        return DoraConv2dDelta if use_dora else LoraConv2dDelta
    if isinstance(base_layer, nn.Embedding) and not use_dora:
        return LoraEmbeddingDelta
    return None


def _refuse_dora_on_embeddings(model: nn.Module, targets: list[str]) -> None:
    # peft's DoRA on an embedding normalises each embedding dimension over the whole vocabulary and
    # rescales the output of any adapter that ran before it; peftkit leaves that variant out.
    modules = dict(iter_base_modules(model))
    embeddings = [name for name in targets if isinstance(modules[name], nn.Embedding)]
    if embeddings:
        raise PeftkitError(
            f"use_dora=True cannot adapt {embeddings[0]!r} (an Embedding"
            + (f", as are {embeddings[1:]}" if len(embeddings) > 1 else "")
            + "): DoRA in peftkit supports Linear, GPT-2 Conv1D and Conv2d layers. Leave the embedding out of "
            "target_modules (or exclude_modules it), or use plain LoRA (use_dora=False) for it in a second adapter."
        )


def supported_types() -> tuple[type, ...]:
    return (*linear_types(), nn.Conv2d, nn.Embedding)


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, skip: list[str]) -> list[str]:
    """Attach LoRA adapter `adapter_name` to the modules `config` selects; returns their paths."""
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        supported_types=supported_types(), task_type=config.task_type, skip=skip,
    )
    if config.use_dora:
        _refuse_dora_on_embeddings(model, targets)
    for name in targets:
        r, scaling = module_rank_and_scaling(config, name)

        def make(base_layer, r=r, scaling=scaling):
            return _delta_class(base_layer, config.use_dora)(
                base_layer, r, scaling, config.lora_dropout, config.init_lora_weights, config.bias != "none"
            )

        attach_delta(model, name, adapter_name, make)

    if config.bias == "all":
        for name in other_bias_modules(model, targets, skip):
            attach_delta(model, name, adapter_name, BiasDelta)
    return targets


def export_config(config: LoraConfig) -> LoraConfig:
    """The config to write next to the saved tensors (PiSSA is saved as the equivalent plain LoRA)."""
    if config.init_lora_weights != "pissa":
        return config
    factor = math.sqrt(2) if config.use_rslora else 2  # keeps alpha / r (or alpha / sqrt r) unchanged
    return config.replace(
        r=2 * config.r, lora_alpha=config.lora_alpha * factor, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )

# How `peftkit train` trains it (peftkit.registry collects this). r=8 on every linear layer (attention and
# feed-forward) reaches 87.5% on sst2 in the default 2 epochs, where query,value alone stays near 86.5% even
# in 3. No LoRA dropout: on CPU it costs about a third of the step time, for a difference within noise
# (benchmarks/default_job.py). On a causal LM: r=16 on every attention and MLP projection ("all-linear"
# leaves the LM head out).
METHODS = (
    Method("lora", LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"), learning_rate=1e-3,
           causal_defaults=dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"), causal_learning_rate=5e-4),
    Method("dora", LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", use_dora=True),
           learning_rate=1e-3, causal_defaults=dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                    use_dora=True), causal_learning_rate=5e-4),
)
