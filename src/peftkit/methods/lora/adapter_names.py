"""PeftModel(..., adapter_names=[...]): each example of a batch runs with its own named LoRA adapter.

Hugging Face peft's keyword. For the length of the call, every adapted module runs its base layer and a
forward hook adds each example's update with `gathered_lora_update` over the named adapters' factors,
stacked (slot 0 = no adapter, `BASE_ADAPTER`); a `modules_to_save` copy (a classification head) replaces
the rows of its own adapter's examples.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import AdaptedModule, ReplacementDelta, adapted_modules
from peftkit.methods.lora.config import LoraConfig, check_plain_lora
from peftkit.methods.lora.layer import LoraLinearDelta
from peftkit.methods.lora.mixed_batch import BASE_ADAPTER, gathered_lora_update

# The block below installs hooks on the shared modules, so two threads inside it at once would mix their
# batches' adapters; calls with adapter_names therefore take turns (threads of one process, any model).
_ADAPTER_NAMES_LOCK = threading.RLock()


@contextmanager
def running_adapter_names(peft_model, adapter_names: Sequence[str]) -> Iterator[None]:
    """Inside this block, each example of a PeftModel's batch runs with its own named LoRA adapter.

    adapter_names: one adapter name per example, BASE_ADAPTER for none (Hugging Face peft's keyword).
    Every adapted module computes its base output and adds the example's LoRA update with
    `gathered_lora_update` over the named adapters' factors stacked (zero-padded to the largest rank);
    a `modules_to_save` copy (a classification head) replaces the rows of its own adapter's examples.
    Without gradients the stacks are kept and reused while the adapters' weights are unchanged.
    Only plain LoRA on Linear / GPT-2 Conv1D (plus modules_to_save) can be mixed, as in peft.
    Calls from several threads take turns (a lock); a plain forward of the same model from another
    thread while one runs is not safe, as for any module whose state is changing.
    """
    with _ADAPTER_NAMES_LOCK:
        yield from _running_adapter_names(peft_model, adapter_names)


def _running_adapter_names(peft_model, adapter_names: Sequence[str]) -> Iterator[None]:
    names = _checked_names(peft_model, adapter_names)
    used = [n for n in dict.fromkeys(names) if n != BASE_ADAPTER]
    example_slots = torch.tensor([0 if n == BASE_ADAPTER else 1 + used.index(n) for n in names], dtype=torch.long)
    modules = list(adapted_modules(peft_model.base_model))
    hooks, disabled = [], []
    layouts: dict = {}  # rows arranged by slot, shared by every layer of this call
    try:
        for path, module in modules:
            running = _module_runner(peft_model, path, module, used, example_slots, layouts)
            disabled.append((module, module.disabled))
            module.disabled = True  # the base layer alone; the hook adds each example's adapter
            if running is not None:
                hooks.append(module.register_forward_hook(running, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, was_disabled in disabled:
            module.disabled = was_disabled


def _checked_names(peft_model, adapter_names) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise PeftkitError("adapter_names must be a list with one adapter name (str) per example, "
                           f"{BASE_ADAPTER!r} for the base model")
    names = list(adapter_names)
    if not names:
        raise PeftkitError("adapter_names is empty; give one adapter name per example")
    if getattr(peft_model, "_disabled", False):
        raise PeftkitError("adapter_names cannot be used inside disable_adapter(); use the name "
                           f"{BASE_ADAPTER!r} for examples that should run without an adapter")
    for name in dict.fromkeys(names):
        if name == BASE_ADAPTER:
            continue
        if name not in peft_model.peft_config:
            known = ", ".join(peft_model.peft_config) or "none"
            raise PeftkitError(f"no adapter named {name!r}; adapters on this model: {known} (and {BASE_ADAPTER!r})")
        config = peft_model.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise PeftkitError(f"adapter {name!r} is {config.peft_type}; adapter_names mixes LoRA adapters only. "
                               "Run it with set_adapter in a batch of its own")
        try:
            check_plain_lora(config, f"adapter {name!r}")
        except PeftkitError as error:
            raise PeftkitError(f"{error} (or run it with set_adapter in a batch of its own)") from None
        if name in peft_model.model_adapters:
            raise PeftkitError(f"adapter {name!r} holds model-level state; adapter_names mixes plain LoRA adapters only")
    for _, module in adapted_modules(peft_model.base_model):
        if module.merged_adapters:
            raise PeftkitError(f"adapters {module.merged_adapters} are merged into the base weights; unmerge_adapter() "
                               "before running a batch with adapter_names")
    return names


def _module_runner(peft_model, path: str, module: AdaptedModule, used: list[str], example_slots: torch.Tensor,
                   layouts: dict):
    """The forward hook that adds each example's adapter to this module's base output, or None."""
    present = [n for n in used if n in module.adapters]
    if not present:
        return None
    for name in present:
        delta = module.adapters[name]
        if not _mixable(delta) and not isinstance(delta, ReplacementDelta):
            raise PeftkitError(f"adapter {name!r} on {path} is a {type(delta).__name__}; adapter_names mixes LoRA on "
                               "Linear / GPT-2 Conv1D layers (and modules_to_save) only. Run it with set_adapter in a "
                               "batch of its own")
    lora_names = [n for n in present if isinstance(module.adapters[n], LoraLinearDelta)]
    replacements = {1 + used.index(n): module.adapters[n] for n in present if isinstance(module.adapters[n], ReplacementDelta)}
    stacks = _stacked_factors(peft_model, path, module, used, lora_names) if lora_names else None

    def hook(_module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        ids = example_slots.to(x.device)
        if stacks is not None:
            lora_A, lora_B, scaling, dropout, local = stacks
            output = gathered_lora_update(x, lora_A, lora_B, scaling, local.to(x.device)[ids], output,
                                          dropout if module.training else None, layouts=layouts)
        if replacements:
            if len(args) + len(kwargs) != 1:
                raise PeftkitError(f"modules_to_save module {path} takes several inputs; it cannot be mixed per example")
            rows = ids.repeat_interleave(x.shape[0] // ids.shape[0]) if x.shape[0] != ids.shape[0] else ids
            for slot, delta in replacements.items():
                chosen = (rows == slot).nonzero().flatten()
                if chosen.numel():
                    output = output.index_put((chosen,), delta(x[chosen]).to(output.dtype))
        return output

    return hook


def _stacked_factors(peft_model, path: str, module: AdaptedModule, used: list[str], lora_names: list[str]):
    """(lora_A (n, R, in), lora_B (n, out, R), scaling (n,), dropout (n,), local (len(used) + 1,)) for one module:
    slot 0 is zeros; `local` maps an example's slot (0 = base, 1 + index in `used`) to a row of the stack."""
    if torch.is_grad_enabled() and any(module.adapters[n].lora_A.requires_grad for n in lora_names):
        stacked = _stack([module.adapters[n] for n in lora_names])  # differentiable, only the named ones
        order = lora_names
    else:
        # Without gradients: a stack of all this module's plain LoRA adapters, kept while their weights stay.
        order = [n for n, d in module.adapters.items() if _mixable(d)]
        deltas = [module.adapters[n] for n in order]
        key = tuple((n, id(d.lora_A), id(d.lora_B), d.lora_A._version, d.lora_B._version, d.scaling,
                     d.dropout.p if isinstance(d.dropout, nn.Dropout) else 0.0) for n, d in zip(order, deltas))
        cache = peft_model.__dict__.setdefault("_mixed_stacks", {})
        if path not in cache or cache[path][0] != key:
            with torch.no_grad():
                cache[path] = (key, _stack(deltas))
        stacked = cache[path][1]
    local = torch.zeros(len(used) + 1, dtype=torch.long)
    for name in lora_names:
        local[1 + used.index(name)] = 1 + order.index(name)
    return (*stacked, local)


def _mixable(delta) -> bool:
    """Plain LoRA on a Linear / Conv1D layer: no PiSSA start, no trained bias, no DoRA."""
    return type(delta) is LoraLinearDelta and not delta.pissa and delta.delta_bias is None


def _stack(deltas: list[LoraLinearDelta]):
    rank = max(d.lora_A.shape[0] for d in deltas)
    first = deltas[0].lora_A
    zeros_A = first.new_zeros(1, rank, first.shape[1])
    zeros_B = first.new_zeros(1, deltas[0].lora_B.shape[0], rank)
    lora_A = torch.cat([zeros_A, *(F.pad(d.lora_A, (0, 0, 0, rank - d.lora_A.shape[0])).unsqueeze(0) for d in deltas)])
    lora_B = torch.cat([zeros_B, *(F.pad(d.lora_B, (0, rank - d.lora_B.shape[1])).unsqueeze(0) for d in deltas)])
    scaling = torch.tensor([0.0, *(d.scaling for d in deltas)], device=first.device)
    dropout = torch.tensor([0.0, *(d.dropout.p if isinstance(d.dropout, nn.Dropout) else 0.0 for d in deltas)], device=first.device)
    return lora_A, lora_B, scaling, dropout
