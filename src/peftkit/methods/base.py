"""What every method shares: the thin wrapper that replaces an adapted module, and the delta interface.

A targeted module `m` is replaced by `AdaptedModule(base_layer=m)`. Each adapter that touches `m`
owns one `AdapterDelta` in `AdaptedModule.adapters[adapter_name]`; the wrapper computes
`y = base_layer(x)` and lets every active, unmerged delta change `y` in turn. A delta may instead
replace the base computation outright (a trainable copy of the module, as for `modules_to_save`).

Methods never know about files or training: they only say which tensors they hold and how those map
to the Hugging Face `peft` key suffixes (`lora_A.weight`, `base_layer.bias`, ...).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from peftkit.errors import PeftkitError


class AdapterDelta(nn.Module):
    """One adapter's change to one module.

    Subclasses implement `forward(x, base_output) -> output`; mergeable ones implement `merge` and
    `unmerge` on the base layer's weights; all implement `file_tensors` / `load_file_tensors`.
    """

    replaces_base = False
    mergeable = True
    # Why merging cannot work, said to the user when mergeable is False.
    merge_refusal = ""
    # True when the merged weight depends on the base weight itself (DoRA's weight norm): `merge` is
    # then called with `unmerged_weight=`, the base weight without the adapters merged before it,
    # which is the weight forward sees.
    merge_reads_base_weight = False
    # True when the delta changes the module's input rather than its output ((IA)3 on feed-forward
    # layers scales the input): the wrapper calls `transform_input(x)` before the base layer runs.
    transforms_input = False
    # Names of parameters that never train (AdaLoRA's ranknum): counted in the model's size, as peft
    # counts them, but left frozen when the adapter is made trainable.
    frozen_parameters: tuple[str, ...] = ()
    # True when the delta can compute the module's whole output itself, the base computation included
    # (fused LoRA): when it is the only adapter running, the wrapper calls `forward_with_base(base_layer,
    # x)` instead of `base_layer(x)` then `forward(x, base_output)`, unless that returns None.
    computes_base_output = False

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward_with_base(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The module's output with this delta applied, or None to run the base layer then `forward`."""
        return None

    def merge(self, base_layer: nn.Module) -> None:  # pragma: no cover
        raise NotImplementedError

    def unmerge(self, base_layer: nn.Module) -> None:  # pragma: no cover
        raise NotImplementedError

    def file_tensors(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by the suffix that follows the module path in a peft file."""
        raise NotImplementedError  # pragma: no cover

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], base_layer: nn.Module, where: str) -> None:
        """Copy tensors read from a file into this delta; `tensors` has the same keys as `file_tensors`."""
        own = {suffix: tensor for suffix, tensor in self.file_tensors(base_layer).items()}
        for suffix, target in own.items():
            source = tensors[suffix]
            check_shape(f"{where}.{suffix}", source, target)
        self._assign_file_tensors(tensors, base_layer)

    def _assign_file_tensors(self, tensors: dict[str, torch.Tensor], base_layer: nn.Module) -> None:
        raise NotImplementedError  # pragma: no cover


def check_shape(key: str, found: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(found.shape) != tuple(expected.shape):
        raise PeftkitError(
            f"tensor {key} has shape {tuple(found.shape)} in the adapter file but the model needs "
            f"{tuple(expected.shape)}: this adapter was made for another base model (or another config)"
        )


def channel_dim(module: nn.Module) -> int:
    """Which output dimension holds a module's channels (where its bias is added)."""
    conv_like = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
    return 1 if isinstance(module, conv_like) else -1


def add_along_channels(output: torch.Tensor, vector: torch.Tensor, dim: int) -> torch.Tensor:
    """output + vector, with `vector` (C,) broadcast along channel dimension `dim` of `output`."""
    if dim == -1 or output.dim() <= 1:
        return output + vector
    shape = [1] * output.dim()
    shape[dim] = -1
    return output + vector.view(shape)


def shadow_parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A trained change of an existing base parameter (a bias delta).

    Marked so that parameter reports count it as trainable but not as an extra parameter of the
    model: it re-parametrizes a weight the model already has (peft trains such biases in place and
    counts them once).
    """
    parameter = nn.Parameter(tensor)
    parameter.shadows_base_parameter = True
    return parameter


class BiasDelta(AdapterDelta):
    """A trained change of a module's bias: y = base(x) + delta_bias (BitFit, LoRA bias='all')."""

    def __init__(self, base_layer: nn.Module, file_suffix: str = "bias"):
        super().__init__()
        bias = getattr(base_layer, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise PeftkitError(f"{type(base_layer).__name__} has no bias to train")
        self.delta_bias = shadow_parameter(torch.zeros_like(bias))
        self.dim = channel_dim(base_layer)
        self.file_suffix = file_suffix

    def forward(self, x, base_output):
        return add_along_channels(base_output, self.delta_bias, self.dim)

    def merge(self, base_layer):
        with torch.no_grad():
            base_layer.bias.add_(self.delta_bias.to(base_layer.bias.dtype))

    def unmerge(self, base_layer):
        with torch.no_grad():
            base_layer.bias.sub_(self.delta_bias.to(base_layer.bias.dtype))

    # Files hold the trained bias itself (base + delta), as Hugging Face peft saves biases.
    def file_tensors(self, base_layer):
        return {self.file_suffix: (base_layer.bias + self.delta_bias).detach()}

    def _assign_file_tensors(self, tensors, base_layer):
        with torch.no_grad():
            self.delta_bias.copy_(tensors[self.file_suffix].to(self.delta_bias) - base_layer.bias)


class WeightDelta(AdapterDelta):
    """A delta that changes the base layer's weight (its merged form) and, optionally, its bias.

    Subclasses give `delta_weight()`, the change of the weight in the weight's own layout, and call
    `add_bias_change` where the bias trains too (`delta_bias`, None otherwise). Merging adds both into
    the base layer and unmerging takes them out; a subclass whose weight change is not additive (OFT
    rotates) overrides `merge` / `unmerge` and keeps the bias half (`merge_bias`, `unmerge_bias`).
    In files the trained bias is saved whole (base + change) as `base_layer.bias`, as peft saves it.
    """

    def __init__(self):
        super().__init__()
        self.delta_bias: nn.Parameter | None = None

    def add_bias_change(self, base_layer: nn.Module, enabled: bool) -> None:
        """Train a change of the base bias (starting at zero) where `enabled` and the base layer has a bias."""
        if enabled and getattr(base_layer, "bias", None) is not None:
            self.delta_bias = shadow_parameter(torch.zeros_like(base_layer.bias))

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, base_layer):
        base_layer.weight.add_(self.delta_weight().to(base_layer.weight.dtype))
        self.merge_bias(base_layer)

    @torch.no_grad()
    def unmerge(self, base_layer):
        base_layer.weight.sub_(self.delta_weight().to(base_layer.weight.dtype))
        self.unmerge_bias(base_layer)

    @torch.no_grad()
    def merge_bias(self, base_layer: nn.Module) -> None:
        if self.delta_bias is not None:
            base_layer.bias.add_(self.delta_bias.to(base_layer.bias.dtype))

    @torch.no_grad()
    def unmerge_bias(self, base_layer: nn.Module) -> None:
        if self.delta_bias is not None:
            base_layer.bias.sub_(self.delta_bias.to(base_layer.bias.dtype))

    def bias_file_tensors(self, base_layer: nn.Module) -> dict[str, torch.Tensor]:
        """{"base_layer.bias": the trained bias} where the bias trains, else {}."""
        if self.delta_bias is None:
            return {}
        return {"base_layer.bias": (base_layer.bias + self.delta_bias).detach()}

    @torch.no_grad()
    def assign_bias_file_tensor(self, tensors: dict[str, torch.Tensor], base_layer: nn.Module) -> None:
        if self.delta_bias is not None:
            self.delta_bias.copy_(tensors["base_layer.bias"].to(self.delta_bias) - base_layer.bias)


class ReplacementDelta(AdapterDelta):
    """A trainable copy of the whole module that replaces it while the adapter is active.

    Used for `modules_to_save` (e.g. a new classification head) and layer-wise freezing (the chosen
    blocks train as copies, so the base stays untouched and other adapters still see it).
    """

    replaces_base = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base_layer)
        for parameter in self.module.parameters():
            parameter.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def merge(self, base_layer):
        self._saved_base = {k: v.detach().clone() for k, v in base_layer.state_dict().items()}
        base_layer.load_state_dict(self.module.state_dict())

    def unmerge(self, base_layer):
        base_layer.load_state_dict(self._saved_base)
        del self._saved_base

    def file_tensors(self, base_layer):
        return {key: value.detach() for key, value in self.module.state_dict().items()}

    def _assign_file_tensors(self, tensors, base_layer):
        self.module.load_state_dict({k: tensors[k] for k in self.file_tensors(base_layer)})


class ModelAdapter(nn.Module):
    """Adapter state that belongs to the whole model rather than to one module.

    Prompt tuning's virtual tokens, prefix tuning's key/value prefixes and VeRA's shared random
    projections live here; a method's `add_adapter` returns one inside `Attached`. The wrapper
    saves and loads its tensors next to the per-module ones and calls its hooks:

    - `intercepts_forward`: `forward(model, *args, **kwargs)` runs the base `model` itself (to add
      virtual tokens or a key/value prefix); `generate(model, **kwargs)` does the same for generation.
    - `prepare_training(model, batches)`: once before training, with a few training batches (sparse
      fine-tuning picks its weights here); `on_optimizer_step(step, total_steps)`: after every
      optimizer step, before gradients are cleared (adaptive rank reallocates here).
    """

    mergeable = True
    # Why merging cannot work, said to the user when mergeable is False.
    merge_refusal = ""
    intercepts_forward = False
    # Where the adapter's per-module tensors (modules_to_save) go in a peft file, when not under
    # "base_model.model.": peft writes them under "base_model." for prompt-learning methods.
    module_key_prefix: str | None = None

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by their full key in a peft file (e.g. "prompt_embeddings")."""
        return {}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy tensors read from `where` into this adapter; `tensors` has the keys of `file_tensors`."""
        own = self.file_tensors()
        for key, target in own.items():
            check_shape(f"{where}: {key}", tensors[key], target)
        self._assign_file_tensors(tensors)

    def _assign_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.file_tensors():  # pragma: no cover
            raise NotImplementedError

    def forward(self, model: nn.Module, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def generate(self, model: nn.Module, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def prepare_training(self, model: nn.Module, batches) -> None:
        """Called once before training with an iterable of training batches (dicts for model(**batch))."""

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step `step` (1-based) of `total_steps`, before gradients are cleared."""


class WholeModelMethod:
    """A method that trains the base model's own weights instead of adding an adapter beside them (full
    fine-tuning). PeftModel hands it what an adapter would do itself: it takes the model alone, saves
    the whole model, and refuses each operation that has no adapter to act on, in its own words."""

    # operation -> the line the user sees: "share" (another adapter on the same model), "delete",
    # "disable" and "load" (an adapter's tensors into it; "{folder}" names the folder).
    refusals: dict[str, str] = {}

    def attach(self, model: nn.Module) -> None:  # pragma: no cover
        """Make `model` trainable as this method trains it."""
        raise NotImplementedError

    def save(self, model: nn.Module, config, folder: str) -> str:  # pragma: no cover
        """Write what the run trained into `folder`; return the folder."""
        raise NotImplementedError

    def refuse(self, operation: str, **names: str) -> PeftkitError:
        return PeftkitError(self.refusals[operation].format(**names))


@dataclasses.dataclass
class Attached:
    """What a method's `add_adapter` attached: the module paths it adapts, and model-level state."""

    targets: list[str]
    model_adapter: ModelAdapter | None = None
    # The config completed from the model (e.g. sizes read from its config), kept and saved in place
    # of the one given; None keeps the given one.
    config: object | None = None


class AdaptedModule(nn.Module):
    """A module with adapters: `base_layer` (frozen) plus one delta per adapter name."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        # Code around the model reads attributes such as `.weight` or `.nf` from the module it
        # wrapped; answer from the base layer so that code keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base_layer = super().__getattr__("base_layer")
            return getattr(base_layer, name)

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        running = [self.adapters[n] for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        if len(running) == 1 and running[0].computes_base_output and len(args) == 1 and not kwargs:
            output = running[0].forward_with_base(self.base_layer, args[0])
            if output is not None:
                return output
        x = args[0] if args else next(iter(kwargs.values()))
        if any(d.transforms_input for d in running):
            args, kwargs = _with_first_input(args, kwargs, running)
        replacement = next((d for d in running if d.replaces_base), None)
        if replacement is not None:
            output = replacement(*args, **kwargs)
        else:
            output = self.base_layer(*args, **kwargs)
        for delta in running:
            if not delta.replaces_base:
                output = delta(x, output)
        return output

    def merge(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters or adapter_name not in self.adapters:
            return
        delta = self.adapters[adapter_name]
        if not delta.mergeable:
            raise PeftkitError(
                f"adapter {adapter_name!r} cannot be merged into {type(self.base_layer).__name__}: {delta.merge_refusal}"
            )
        unmerged_weight = None
        if delta.merge_reads_base_weight:
            unmerged_weight = self._weight_without_merged_adapters() if self.merged_adapters else self.base_layer.weight
        self._merge_one(adapter_name, unmerged_weight)

    def _merge_one(self, adapter_name: str, unmerged_weight: torch.Tensor | None) -> None:
        delta = self.adapters[adapter_name]

        def merge(base_layer):
            if delta.merge_reads_base_weight:
                delta.merge(base_layer, unmerged_weight=unmerged_weight)
            else:
                delta.merge(base_layer)

        if getattr(self.base_layer, "is_quantized", False) and not delta.replaces_base:
            # A quantized base holds codes, not a weight to add into: merge into a float copy, requantize.
            self.base_layer.merge_requantized(merge, owner=delta)
        else:
            merge(self.base_layer)
        self.merged_adapters.append(adapter_name)

    def _weight_without_merged_adapters(self) -> torch.Tensor:
        """A copy of the base weight with every merged adapter taken out; they are merged back after."""
        merged = list(self.merged_adapters)
        for name in reversed(merged):
            self.unmerge(name)
        weight = self.base_layer.weight.detach().clone()
        for name in merged:  # all of them see this same weight, as in their own merge
            self._merge_one(name, weight)
        return weight

    def unmerge(self, adapter_name: str) -> None:
        if adapter_name not in self.merged_adapters:
            return
        delta = self.adapters[adapter_name]
        if getattr(self.base_layer, "is_quantized", False) and not delta.replaces_base:
            # Requantizing is lossy, so restore the codes saved before this merge; later merges are redone.
            later = self.merged_adapters[self.merged_adapters.index(adapter_name) + 1:]
            for name in reversed(later):
                self.unmerge(name)
            self.base_layer.restore_before_merge(delta)
            self.merged_adapters.remove(adapter_name)
            for name in later:
                self.merge(name)
            return
        delta.unmerge(self.base_layer)
        self.merged_adapters.remove(adapter_name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={self.merged_adapters}"


def _with_first_input(args: tuple, kwargs: dict, deltas) -> tuple[tuple, dict]:
    """args/kwargs with the first input passed through each input-transforming delta in turn."""
    x = args[0] if args else next(iter(kwargs.values()))
    for delta in deltas:
        if delta.transforms_input:
            x = delta.transform_input(x)
    if args:
        return (x, *args[1:]), kwargs
    first = next(iter(kwargs))
    return args, {**kwargs, first: x}


def iter_base_modules(model: nn.Module, prefix: str = ""):
    """(path, module) pairs of the model as if no adapter were attached.

    An AdaptedModule stands for its base layer (under the original path) and its adapters' own
    modules (copies, dropout) are not listed, so targeting never picks an adapter's insides.
    """
    if isinstance(model, AdaptedModule):
        model = model.base_layer
    yield prefix, model
    for child_name, child in model._modules.items():
        if child is None:
            continue
        yield from iter_base_modules(child, f"{prefix}.{child_name}" if prefix else child_name)


def _resolve_parent(model: nn.Module, module_name: str) -> tuple[nn.Module, str]:
    """The module holding `module_name` (an original path) and the child's attribute name."""
    *parents, child_name = module_name.split(".")
    parent = model
    for part in parents:
        if isinstance(parent, AdaptedModule):
            parent = parent.base_layer
        parent = getattr(parent, part)
    if isinstance(parent, AdaptedModule):
        parent = parent.base_layer
    return parent, child_name


def attach_delta(model: nn.Module, module_name: str, adapter_name: str, make_delta) -> AdapterDelta:
    """Wrap `model.<module_name>` in an AdaptedModule (once) and add `make_delta(base_layer)` to it."""
    parent, child_name = _resolve_parent(model, module_name)
    module = getattr(parent, child_name)
    if not isinstance(module, AdaptedModule):
        if any(isinstance(m, AdaptedModule) for m in module.modules()):
            raise PeftkitError(
                f"module {module_name!r} contains modules that other adapters already adapt; an adapter "
                "cannot copy a block whose insides carry other adapters"
            )
        module = AdaptedModule(module)
        setattr(parent, child_name, module)
    if adapter_name in module.adapters:
        raise PeftkitError(f"adapter {adapter_name!r} touches {module_name!r} twice")
    base_layer = module.base_layer
    delta = make_delta(base_layer)
    delta.to(device=_device_of(base_layer))
    module.adapters[adapter_name] = delta
    return delta


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):  # a quantized layer may hold buffers only
        return tensor.device
    return torch.device("cpu")


def adapted_modules(model: nn.Module):
    """(path, AdaptedModule) pairs in model order; paths are the original module paths."""
    for name, module in _iter_with_wrappers(model, ""):
        if isinstance(module, AdaptedModule):
            yield name, module


def _iter_with_wrappers(module: nn.Module, prefix: str):
    yield prefix, module
    inner = module.base_layer if isinstance(module, AdaptedModule) else module
    for child_name, child in inner._modules.items():
        if child is None:
            continue
        yield from _iter_with_wrappers(child, f"{prefix}.{child_name}" if prefix else child_name)


def remove_wrapper(model: nn.Module, module_name: str, replacement: nn.Module) -> None:
    """Put `replacement` where the AdaptedModule at `module_name` stands."""
    parent, child_name = _resolve_parent(model, module_name)
    setattr(parent, child_name, replacement)
