"""Export for serving engines: what an engine can load, and a conversion of any mergeable adapter to LoRA.

Serving engines (vLLM, SGLang, TGI, llama.cpp's converters) load adapters in the Hugging Face `peft`
LoRA layout: `lora_A` / `lora_B` per linear layer, one rank, no bias, no extra tensors. peftkit
writes that layout for LoRA already; `serving_problems` says what else an adapter holds that such an
engine would refuse or silently ignore (DoRA magnitudes, `modules_to_save`, trained biases, a method
that is not LoRA), and `lora_from_adapter` rewrites an adapter whose update can be merged into the
linear weights (DoRA, AdaLoRA, VeRA, LoHa, LoKr, IA3 on linear layers, sparse, ...) as a plain LoRA:
the update of each layer, computed in full (merged weight minus base weight), factored by a truncated
SVD to one rank. The conversion is exact when every update's rank fits (AdaLoRA, LoRA itself) and
otherwise the best approximation of that rank; the relative error per layer is reported, never hidden.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from peftkit import io
from peftkit.errors import PeftkitError
from peftkit.methods.base import adapted_modules
from peftkit.methods.lora import LoraConfig
from peftkit.quantize import float_base_layer

__all__ = ["LoraConversion", "factor_updates", "layer_updates", "lora_from_adapter", "save_lora_conversion", "serving_problems"]


def serving_problems(peft_model, adapter_name: str = "default") -> list[str]:
    """What in this adapter a LoRA serving engine (vLLM and the like) cannot load; empty when nothing."""
    config = peft_model.peft_config[adapter_name]
    method = getattr(config, "peft_type", None)
    if method != "LORA":
        kind = "trains the whole model" if method is None else f"is {method}, not LoRA"
        return [f"adapter {adapter_name!r} {kind}: serving engines load LoRA adapters only"]
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("it uses DoRA: engines ignore or refuse the magnitude vectors (lora_magnitude_vector)")
    if getattr(config, "modules_to_save", None):
        problems.append(f"it trains whole modules ({', '.join(config.modules_to_save)}, modules_to_save), "
                        "which engines do not load")
    if getattr(config, "bias", "none") != "none":
        problems.append(f"it trains biases (bias={config.bias!r}), which engines do not load")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        problems.append("it has per-module ranks or alphas (rank_pattern / alpha_pattern), which some engines ignore")
    non_linear = [path for path, module in adapted_modules(peft_model.base_model)
                  if adapter_name in module.adapters and not _is_linear(module.base_layer)]
    if non_linear:
        problems.append(f"it adapts layers that are not linear ({', '.join(non_linear[:3])}"
                        f"{', ...' if len(non_linear) > 3 else ''}), which engines do not load")
    return problems


@dataclasses.dataclass
class LoraConversion:
    """A plain LoRA equivalent of an adapter: its config, its tensors (peft keys), and how close it is."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    relative_errors: dict[str, float]  # module path -> ||delta - B A|| / ||delta|| (Frobenius)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _weight_as_out_in(module: nn.Module) -> torch.Tensor:
    # GPT-2's Conv1D stores its weight as (in, out).
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


@torch.no_grad()
def layer_updates(peft_model, adapter_name: str, skip_modules_to_save: bool = False) -> dict[str, torch.Tensor]:
    """module path -> the adapter's full update of that layer's weight, (out, in), float32.

    Every adapted layer must be linear and mergeable. Whole modules the adapter trains
    (`modules_to_save`, e.g. a classification head) are refused unless `skip_modules_to_save`,
    which leaves them out (adapter arithmetic treats such heads as task-specific).
    """
    if adapter_name not in peft_model.peft_config:
        raise PeftkitError(f"no adapter named {adapter_name!r}; adapters: {', '.join(peft_model.peft_config)}")
    if adapter_name in peft_model.model_adapters:
        raise PeftkitError(
            f"adapter {adapter_name!r} ({peft_model.peft_config[adapter_name].peft_type}) adds virtual tokens or "
            "prefixes, not weight updates: it has no LoRA form; serve it with peftkit or export a peft adapter"
        )
    updates, refused = {}, []
    for path, module in adapted_modules(peft_model.base_model):
        if adapter_name not in module.adapters:
            continue
        delta = module.adapters[adapter_name]
        if delta.replaces_base and skip_modules_to_save:
            continue
        if delta.replaces_base:
            refused.append(f"{path} (trained as a whole module, modules_to_save)")
            continue
        if not _is_linear(module.base_layer):
            refused.append(f"{path} ({type(module.base_layer).__name__}, not a linear layer)")
            continue
        if not delta.mergeable:
            refused.append(f"{path} ({delta.merge_refusal})")
            continue
        if adapter_name in module.merged_adapters:
            raise PeftkitError(f"adapter {adapter_name!r} is merged into {path}; unmerge it before converting")
        with float_base_layer(module):  # a quantized base: the exact update, not one blurred by requantizing
            before = _weight_as_out_in(module.base_layer).detach().float().clone()
            bias_before = None if module.base_layer.bias is None else module.base_layer.bias.detach().clone()
            module.merge(adapter_name)
            try:
                update = _weight_as_out_in(module.base_layer).detach().float() - before
                if bias_before is not None and not torch.equal(module.base_layer.bias, bias_before):
                    refused.append(f"{path} (its update changes the bias, which LoRA cannot hold)")
            finally:
                module.unmerge(adapter_name)
        updates[path] = update
    if refused:
        raise PeftkitError(
            f"adapter {adapter_name!r} cannot be written as LoRA: {'; '.join(refused[:4])}"
            f"{' ...' if len(refused) > 4 else ''}. Export a merged model instead (peftkit merge)"
        )
    if not updates:
        raise PeftkitError(f"adapter {adapter_name!r} changes no linear layer, so it has no LoRA form")
    return updates


def _numerical_rank(singular_values: torch.Tensor, tolerance: float) -> int:
    """The smallest rank whose truncation error, relative to the whole, is at most `tolerance`."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 1
    # tail[k] = squared error when keeping the first k values
    tail = energy.flip(0).cumsum(0).flip(0)
    for rank in range(1, len(singular_values) + 1):
        remaining = float(tail[rank]) if rank < len(singular_values) else 0.0
        if remaining <= tolerance ** 2 * total:
            return rank
    return len(singular_values)


@torch.no_grad()
def lora_from_adapter(peft_model, adapter_name: str = "default", rank: int | None = None,
                      tolerance: float = 1e-3) -> LoraConversion:
    """The adapter rewritten as a plain LoRA of one rank (alpha = rank, so scaling 1).

    rank: the LoRA rank; by default the smallest rank that keeps every layer's relative error at or
    below `tolerance` (so a LoRA-shaped update converts exactly). The model is left as it was.
    """
    source = peft_model.peft_config[adapter_name] if adapter_name in peft_model.peft_config else None
    updates = layer_updates(peft_model, adapter_name)
    layers = {path: module.base_layer for path, module in adapted_modules(peft_model.base_model)}
    return factor_updates(updates, layers, rank=rank, tolerance=tolerance, task_type=getattr(source, "task_type", None))


@torch.no_grad()
def factor_updates(updates: dict[str, torch.Tensor], layers: dict[str, nn.Module], rank: int | None = None,
                   tolerance: float = 1e-3, task_type: str | None = None) -> LoraConversion:
    """Full per-layer updates, (out, in) each, factored by truncated SVD into one plain LoRA.

    layers: module path -> the base layer it updates (for the dtype and GPT-2's Conv1D layout).
    rank: the LoRA rank; by default the smallest rank that keeps every layer's relative error at or
    below `tolerance`. A layer whose full rank is below `rank` is padded with zeros (exact).
    """
    factors = {path: torch.linalg.svd(update, full_matrices=False) for path, update in updates.items()}
    if rank is None:
        rank = max(_numerical_rank(s, tolerance) for _, s, _ in factors.values())
    if rank < 1:
        raise PeftkitError(f"rank must be at least 1, got {rank}")
    tensors, errors = {}, {}
    for path, (u, s, vh) in factors.items():
        update = updates[path]
        keep = min(rank, len(s))
        root = s[:keep].sqrt()
        b = u[:, :keep] * root[None, :]
        a = root[:, None] * vh[:keep]
        if keep < rank:  # a layer smaller than the rank: pad with zeros so every layer has one rank
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
            a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])], dim=0)
        norm = float(update.norm())
        errors[path] = float((update - b @ a).norm()) / norm if norm > 0 else 0.0
        dtype = layers[path].weight.dtype
        tensors[f"{io.KEY_PREFIX}{path}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{io.KEY_PREFIX}{path}.lora_B.weight"] = b.to(dtype).contiguous()
    # Factors are stored as for Linear (A: r x in, B: out x r) whatever the layer; fan_in_fan_out only
    # tells peft that GPT-2's Conv1D weights are stored transposed.
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(updates), task_type=task_type,
        fan_in_fan_out=any(type(layers[p]).__name__ == "Conv1D" for p in updates),
    )
    return LoraConversion(config=config, tensors=tensors, relative_errors=errors)


def save_lora_conversion(conversion: LoraConversion, folder: str | os.PathLike, base_model_name_or_path: str | None) -> Path:
    """Write a conversion as a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
    data = {**conversion.config.to_dict(), "base_model_name_or_path": base_model_name_or_path}
    return Path(io.write_adapter_folder(folder, data, conversion.tensors))


# -- whole run folders (what `peftkit merge` and `peftkit export` do) ---------------------------------
def is_causal_run(folder: str | os.PathLike) -> bool:
    """A run of the instruction-tuning job, or a peft adapter made for a causal LM."""
    from peftkit.train.job import read_run_info

    if read_run_info(folder).get("kind") == "causal":
        return True
    config = Path(folder) / io.CONFIG_NAME
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("task_type") == "CAUSAL_LM"
        except json.JSONDecodeError:
            return False
    return False


def load_trained(folder: str | os.PathLike, model: str | None = None):
    """A saved run, classification (text or image) or causal: (model, tokenizer or image preprocessor, run info, causal)."""
    if is_causal_run(folder):
        from peftkit.train.instruct import load_causal_run

        return (*load_causal_run(folder, model=model), True)
    from peftkit.train.image_job import is_image_run, load_image_run

    if is_image_run(folder):  # (model, its ImagePreprocessor in the tokenizer's place, run info, False)
        return (*load_image_run(folder, model=model), False)
    from peftkit.train.job import load_run

    return (*load_run(folder, model=model), False)


def merge_to_folder(adapter: str | os.PathLike, output: str | os.PathLike, model: str | None = None) -> tuple[str | None, bool]:
    """Merge a saved adapter into its base and write a plain transformers model folder (with its tokenizer)
    at `output`, whole or not at all. Returns (a note on the merge into a quantized base or None, causal)."""
    from peftkit.quantize import dequantize_merged

    with io.new_folder(output, "--output folder") as partial:
        wrapped, tokenizer, _, causal = load_trained(adapter, model)
        plain = wrapped.merge_and_unload() if hasattr(wrapped, "merge_and_unload") else wrapped
        note = dequantize_merged(plain)  # a quantized base: the merge error, and float layers transformers can load
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return note, causal


@dataclasses.dataclass
class ExportResult:
    """What `export_to_folder` wrote: a LoRA conversion (to_lora) or the adapter as it is, with what serving
    engines cannot load of it."""

    conversion: LoraConversion | None
    problems: list[str]


def export_to_folder(adapter: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                     to_lora: bool = False, rank: int | None = None) -> ExportResult:
    """Write a saved adapter for serving engines at `output` (peft layout): as it is, or (to_lora) rewritten as
    plain LoRA of rank `rank` (default: the smallest exact to 1e-3), whole or not at all."""
    with io.new_folder(output, "--output folder") as partial:
        wrapped, _, info, _ = load_trained(adapter, model)
        if not hasattr(wrapped, "peft_config") or wrapped.is_full_finetune:
            raise PeftkitError(f"{adapter} holds a fully fine-tuned model, not an adapter; serve the model folder itself")
        if to_lora:
            base_id = info.get("model") or wrapped.peft_config["default"].to_dict().get("base_model_name_or_path")
            conversion = lora_from_adapter(wrapped, "default", rank=rank)
            save_lora_conversion(conversion, partial, base_id)
            return ExportResult(conversion, [])
        problems = serving_problems(wrapped)
        wrapped.save_pretrained(partial)
    return ExportResult(None, problems)
