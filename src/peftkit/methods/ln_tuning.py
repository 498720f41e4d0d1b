"""LayerNorm tuning: train copies of the model's normalization layers (Zhao et al., 2023, "Tuning
LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning").

Each targeted module (LayerNorm, RMSNorm, ...) gets a trainable copy that replaces it while the
adapter is active; the base layer stays frozen and shared with other adapters. Merging copies the
trained weights into the base layer exactly, and unmerging puts the originals back.

Files follow Hugging Face `peft`: `base_model.model.<module path>.ln_tuning_layers.<tensor name>`
(e.g. `...input_layernorm.ln_tuning_layers.weight`). As in peft, any module may be targeted; without
target_modules the model type's defaults are used (peft's), or else every normalization layer found.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import Attached, ReplacementDelta, attach_delta, iter_base_modules
from peftkit.targeting import describe_module_names, find_targets, name_matches

# Hugging Face peft's defaults by `model.config.model_type`; other models train every normalization
# layer found by type (see `normalization_layer_names`).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens", "lm_head"],
}
FILE_KEY = "ln_tuning_layers"


@register_config
@dataclasses.dataclass
class LNTuningConfig(PeftConfig):
    """Field names and meanings are those of Hugging Face `peft.LNTuningConfig`.

    target_modules: names or a regex of the modules to train as copies; None picks the model type's
    defaults, or every normalization layer (LayerNorm, RMSNorm, GroupNorm) when the type has none.
    exclude_modules: modules to leave out. modules_to_save: modules trained whole (a new head).
    """

    peft_type = "LN_TUNING"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self):
        for field in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, field), (set, frozenset, tuple)):
                setattr(self, field, sorted(getattr(self, field)))
        super().validate()


def is_normalization_layer(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and GroupNorm, including model-specific classes such as LlamaRMSNorm."""
    kinds = tuple(k for k in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if k is not None)
    return isinstance(module, kinds) or re.search(r"(LayerNorm|RMSNorm)$", type(module).__name__) is not None


def normalization_layer_names(model: nn.Module, skip: list[str]) -> list[str]:
    """The shortest name list selecting exactly the model's normalization layers (last path parts
    when they select nothing else, else full paths)."""
    modules = [(name, module) for name, module in iter_base_modules(model) if name]
    found = [name for name, module in modules if is_normalization_layer(module) and name not in skip]
    short = sorted({name.rsplit(".", 1)[-1] for name in found})
    if [name for name, _ in modules if name_matches(name, short) and name not in skip] == found:
        return short
    return found


class NormCopyDelta(ReplacementDelta):
    """A trainable copy of a normalization layer; files key its tensors `ln_tuning_layers.<name>`."""

    def file_tensors(self, base_layer):
        return {f"{FILE_KEY}.{key}": value for key, value in super().file_tensors(base_layer).items()}

    def _assign_file_tensors(self, tensors, base_layer):
        self.module.load_state_dict({key: tensors[f"{FILE_KEY}.{key}"] for key in self.module.state_dict()})


def resolve_defaults(model: nn.Module, config: LNTuningConfig, skip: list[str]) -> LNTuningConfig:
    """`config` with target_modules filled in when None (peft's names for the model type, or the
    normalization layers found)."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = [n for n in DEFAULT_TARGET_MODULES.get(model_type, [])
             if any(name_matches(path, [n]) for path, _ in iter_base_modules(model) if path)]
    if not names:
        names = normalization_layer_names(model, skip)
    if not names:
        raise PeftkitError(
            f"LNTuningConfig.target_modules is not set and {type(model).__name__} (model type {model_type!r}) has no "
            f"LayerNorm or RMSNorm layer to train; pass target_modules. Module names in this model: "
            f"{describe_module_names(model)}"
        )
    return config.replace(target_modules=names)


def add_adapter(model: nn.Module, config: LNTuningConfig, adapter_name: str, skip: list[str]) -> Attached:
    """Attach trainable copies of the selected (normalization) modules as adapter `adapter_name`."""
    config = resolve_defaults(model, config, skip)
    targets = find_targets(model, config.target_modules, exclude_modules=config.exclude_modules, skip=skip)
    # A module inside another target trains as part of that copy already.
    targets = [n for n in targets if not any(n.startswith(other + ".") for other in targets)]
    modules = dict(iter_base_modules(model))
    for name in targets:
        if next(modules[name].parameters(), None) is None:
            raise PeftkitError(
                f"module {name!r} ({type(modules[name]).__name__}) has no parameters to train; LayerNorm tuning "
                "trains copies of LayerNorm/RMSNorm layers. Narrow target_modules (or use exclude_modules) to skip it."
            )
    for name in targets:
        attach_delta(model, name, adapter_name, NormCopyDelta)
    return Attached(targets=targets, config=config)

# How `peftkit train` trains it: copies of every LayerNorm (10k values on minilm).
METHODS = (Method("ln_tuning", LNTuningConfig, {}, learning_rate=5e-3),)
