"""LoRA's config (`LoraConfig`, field for field Hugging Face `peft.LoraConfig`) and the per-module values
it gives (rank and scale by pattern)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from peftkit.config import PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.lora.kernels import lora_scaling, pattern_value


@register_config
@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation. Field names and meanings are those of Hugging Face `peft.LoraConfig`.

    r: rank of the update. lora_alpha: scale numerator (scale = alpha / r, or alpha / sqrt(r) with
    use_rslora). target_modules: names, a regex, or "all-linear". rank_pattern / alpha_pattern: per
    module overrides, keys are regexes matched against the end of the module path. bias: "none",
    "all" (train every bias) or "lora_only" (biases of adapted modules). init_lora_weights: True (B=0,
    A kaiming-uniform), "gaussian" (B=0, A normal), "pissa" (principal singular vectors), or False
    (random A and B; only for tests: the model changes at once). use_dora: weight-decomposed LoRA
    (DoRA) on Linear, GPT-2 Conv1D and Conv2d layers, W' = m * (W + s B A) / ||W + s B A|| with a
    trained magnitude m per output channel.
    """

    peft_type = "LORA"
    peft_neutral_fields = {
        "lora_bias": False, "layer_replication": None, "loftq_config": {},
        "megatron_config": None, "megatron_core": "megatron.core", "use_qalora": False,
        "qalora_group_size": 16, "target_parameters": None, "trainable_token_indices": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | Literal["gaussian", "pissa"] = True
    fan_in_fan_out: bool = False
    use_dora: bool = False

    def validate(self):
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"LoraConfig.r must be a positive integer (the rank), got {self.r}")
        for pattern, rank in self.rank_pattern.items():
            if rank <= 0:
                raise PeftkitError(f"LoraConfig.rank_pattern[{pattern!r}] must be positive, got {rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftkitError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_rslora and self.init_lora_weights == "pissa":
            pass  # allowed: the scale enters the PiSSA split exactly as in peft


def module_rank_and_scaling(config: LoraConfig, module_name: str) -> tuple[int, float]:
    """(r, s) of the module at path `module_name`: rank_pattern / alpha_pattern over r / lora_alpha, and the
    scale alpha / r (or alpha / sqrt(r) with use_rslora)."""
    r = pattern_value(module_name, config.rank_pattern, config.r)
    alpha = pattern_value(module_name, config.alpha_pattern, config.lora_alpha)
    return r, lora_scaling(alpha, r, config.use_rslora)


def check_plain_lora(config: LoraConfig, source: str) -> None:
    """Refuse, naming `source`, a LoRA variant that mixed-adapter batches cannot hold: DoRA, PiSSA, trained
    biases, fan_in_fan_out (mixed batches stack plain LoRA factors over a shared, unchanged base)."""
    if config.use_dora:
        raise PeftkitError(f"{source} is a DoRA adapter (use_dora=True); mixed batches hold plain LoRA only. "
                           "Run it with PeftModel, or merge_and_unload it into its own base model")
    if config.init_lora_weights == "pissa":
        raise PeftkitError(f"{source} uses PiSSA (init_lora_weights='pissa'), which changes the base weights; "
                           "save it with peftkit (which writes the equivalent plain LoRA) and load that")
    if config.bias != "none":
        raise PeftkitError(f"{source} trains biases (bias={config.bias!r}), which change the shared base; mixed "
                           "batches hold LoRA factors only: run it with PeftModel")
    if config.fan_in_fan_out:
        raise PeftkitError(f"{source} sets fan_in_fan_out=True; mixed batches read the layout from the layer itself: "
                           "save the adapter with fan_in_fan_out=False")
