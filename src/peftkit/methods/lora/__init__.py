"""LoRA: a frozen weight W plus a trained low-rank update, y = W x + (alpha / r) * B A x.

Layers for nn.Linear, transformers' GPT-2 Conv1D, nn.Conv2d and nn.Embedding. Options follow
Hugging Face `peft` (`LoraConfig`): rank and alpha per module by pattern, rsLoRA scaling
alpha / sqrt(r), dropout on the LoRA input, trained biases, and initialisation with B = 0 (default),
gaussian A, or PiSSA (A and B from the principal singular vectors of W).

Training on nn.Linear and GPT-2 Conv1D is fused by default (`FusedLoraLinear`): one autograd
function computes the frozen matmul and the low-rank path together, keeps no dropout mask (it is
regenerated in backward from a seed) and computes no gradient for the frozen weight. It runs when the
LoRA adapter is the only unmerged one active on the layer; `set_lora_fused(model, False)` opts out.

The package:
    config.py         LoraConfig, per-module rank and scale
    kernels.py        the shared math: fused linear forward / backward on rows, FusedLoraLinear, when
                      merging pays, merged rows, the fused dropout mask
    layer.py          the LoRA layers (Linear / Conv1D, Conv2d, Embedding), merge, PiSSA, set_lora_fused
    dora.py           DoRA's magnitude and direction on Linear / Conv1D and Conv2d
    method.py         add_adapter, export_config, METHODS (what peftkit.registry collects)
    mixed_batch.py    many adapters in one batch: gathered_lora_update, LoraRuns
    adapter_names.py  PeftModel(..., adapter_names=[...]) on top of mixed_batch
peftkit.mixed (MixedLoraModel, stacked adapter slots) is built on mixed_batch.
"""

from peftkit.methods.lora.adapter_names import running_adapter_names
from peftkit.methods.lora.config import LoraConfig, check_plain_lora, module_rank_and_scaling
from peftkit.methods.lora.dora import DoraConv2dDelta, DoraLinearDelta
from peftkit.methods.lora.kernels import (
    FusedLoraLinear,
    draw_dropout_seed,
    fused_lora_output,
    lora_dropout_keep_mask,
    lora_dropout_keep_probability,
    lora_linear_backward,
    lora_linear_forward,
    lora_scaling,
    merged_rows,
    merging_pays,
    pattern_value,
)
from peftkit.methods.lora.layer import (
    LoraConv2dDelta,
    LoraEmbeddingDelta,
    LoraLinearDelta,
    init_lora_factors,
    set_lora_fused,
)
from peftkit.methods.lora.method import METHODS, add_adapter, export_config, supported_types
from peftkit.methods.lora.mixed_batch import BASE_ADAPTER, LoraRuns, gathered_lora_update

__all__ = [
    "BASE_ADAPTER",
    "METHODS",
    "DoraConv2dDelta",
    "DoraLinearDelta",
    "FusedLoraLinear",
    "LoraConfig",
    "LoraConv2dDelta",
    "LoraEmbeddingDelta",
    "LoraLinearDelta",
    "LoraRuns",
    "add_adapter",
    "check_plain_lora",
    "draw_dropout_seed",
    "export_config",
    "fused_lora_output",
    "gathered_lora_update",
    "init_lora_factors",
    "lora_dropout_keep_mask",
    "lora_dropout_keep_probability",
    "lora_linear_backward",
    "lora_linear_forward",
    "lora_scaling",
    "merged_rows",
    "merging_pays",
    "module_rank_and_scaling",
    "pattern_value",
    "running_adapter_names",
    "set_lora_fused",
    "supported_types",
]
