"""(IA)3: learned vectors that rescale activations (Liu et al., 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

Each targeted module gets one vector `ia3_l`, initialised to ones (the model starts as the base):
- on attention modules (keys, values) it scales the module's output: y = l * (W x + b);
- on feed-forward modules (those in `feedforward_modules`) it scales the module's input:
  y = W (l * x) + b, which rescales the feed-forward hidden units.

Shapes and keys follow Hugging Face `peft`: `base_model.model.<module path>.ia3_l` holds (out, 1) for
output scaling and (1, in) for input scaling on nn.Linear and GPT-2's Conv1D (whose weight is stored
(in, out); the vector shapes do not depend on that layout), and (1, channels, 1, 1) on Conv2d.

Merging is exact: output scaling multiplies the weight's output rows and the bias, input scaling the
weight's input columns (the bias is untouched). Unmerging divides back out; entries whose scale is
zero keep a copy of the original weights so that the base is always restored.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdapterDelta, Attached, attach_delta, iter_base_modules
from peftkit.targeting import (
    ALL_LINEAR,
    DEFAULT_LAYER_CONTAINERS,
    describe_module_names,
    find_targets,
    linear_types,
    name_matches,
)

# Defaults when target_modules / feedforward_modules are not given, by `model.config.model_type`.
# These are Hugging Face peft's defaults (so a config resolved here means the same there), plus ViT.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "vit": ["k_proj", "v_proj", "fc2"],
    "deberta": ["in_proj", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "vit": ["fc2"],
    "deberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "gpt_neo": ["c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "gptj": ["fc_out"],
    "bloom": ["mlp.dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "opt": ["fc2"],
    "bart": ["fc2"],
    "phi": ["fc2"],
    "t5": ["wo"],
    "mt5": [],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

# Names before transformers 5 renamed them, used when the names above match nothing in the model.
EARLIER_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "vit": (["key", "value", "output.dense"], ["output.dense"]),
}


@register_config
@dataclasses.dataclass
class IA3Config(PeftConfig):
    """(IA)3 vectors. Field names and meanings are those of Hugging Face `peft.IA3Config`.

    target_modules: names, a regex, or "all-linear"; None picks the defaults for the model type (see
    DEFAULT_TARGET_MODULES). feedforward_modules: the targeted modules whose input is scaled instead of
    their output; a list must be a subset of a target_modules list. As in peft, a listed name selects
    every module path that ends with it (so "output.dense" also picks BERT's "attention.output.dense").
    None picks the model type's defaults. fan_in_fan_out: kept for peft files; the weight layout is
    read from the module type (GPT-2's Conv1D is (in, out)). init_ia3_weights: True starts every
    vector at ones (the base model); False draws them at random (tests only).
    layers_to_transform / layers_pattern: peftkit's addition (peft's IA3 has neither): only adapt
    modules inside these transformer blocks; saved files spell the selection out for peft.
    """

    peft_type = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    # peftkit's additions, written to files only when set, so that peft reads ours without warnings.
    _peftkit_only_fields = ("layers_to_transform", "layers_pattern")

    def to_dict(self):
        data = super().to_dict()
        for field in self._peftkit_only_fields:
            if data.get(field) is None:
                data.pop(field, None)
        return data

    def validate(self):
        # peft keeps these as sets in memory; a list is what JSON and this dataclass hold.
        for field in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, field), (set, frozenset, tuple)):
                setattr(self, field, sorted(getattr(self, field)))
        super().validate()
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise PeftkitError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules (as in peft): {outside} "
                    f"is not in target_modules={self.target_modules}; add it there or drop it from feedforward_modules"
                )


def is_feedforward(module_path: str, feedforward_modules: list[str] | str | None) -> bool:
    """Whether (IA)3 scales this module's input (peft's rule: a regex must match the whole path, a
    listed name need only end the path, without a dot boundary)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_path) is not None
    return any(module_path.endswith(name) for name in feedforward_modules)


class IA3Delta(AdapterDelta):
    """One (IA)3 vector on nn.Linear, GPT-2 Conv1D, nn.Conv2d or nn.Conv3d.

    ia3_l: (out_features, 1) to scale the output, (1, in_features) to scale the input; on
    convolutions (1, channels, 1, 1[, 1]) either way.
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool, init_ones: bool):
        super().__init__()
        weight = base_layer.weight
        self.convolution = isinstance(base_layer, (nn.Conv2d, nn.Conv3d))
        # GPT-2's Conv1D stores its weight as (in, out); nn.Linear and convolutions as (out, in, ...).
        self.transposed = not self.convolution and not isinstance(base_layer, nn.Linear)
        if self.convolution:
            channels = base_layer.in_channels if feedforward else base_layer.out_channels
            shape = (1, channels) + (1,) * (weight.dim() - 2)
        else:
            in_features, out_features = weight.shape if self.transposed else weight.shape[::-1]
            shape = (1, in_features) if feedforward else (out_features, 1)
        self.feedforward = feedforward
        self.transforms_input = feedforward
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=weight.dtype) if init_ones else torch.randn(shape, dtype=weight.dtype))

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}, size={tuple(self.ia3_l.shape)}"

    def _activation_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The vector shaped to broadcast over activations: (C,) on the last dim, or (1, C, 1, ...) for convs."""
        scale = self.ia3_l if self.convolution else self.ia3_l.flatten()
        return scale.to(dtype)

    def transform_input(self, x):
        return x * self._activation_scale(x.dtype)

    def forward(self, x, base_output):
        if self.feedforward:  # the input was scaled before the base layer ran
            return base_output
        return base_output * self._activation_scale(base_output.dtype)

    def _weight_scale(self, base_layer: nn.Module) -> torch.Tensor:
        """The vector shaped to broadcast over the base weight, scaling its output or input axis."""
        if not self.convolution:
            return self.ia3_l.T if self.transposed else self.ia3_l
        if not self.feedforward:
            return self.ia3_l.transpose(0, 1)  # (out, 1, 1, ...)
        groups = base_layer.groups
        if groups == 1:
            return self.ia3_l  # (1, in, 1, ...)
        # A grouped kernel is (out, in / groups, ...): output channel o sees input channels of its group.
        in_per_group = base_layer.in_channels // groups
        out_per_group = base_layer.out_channels // groups
        per_group = self.ia3_l.reshape(groups, in_per_group)
        kernel_ones = (1,) * (base_layer.weight.dim() - 2)
        return per_group.repeat_interleave(out_per_group, dim=0).reshape(base_layer.out_channels, in_per_group, *kernel_ones)

    def _scaled_parameters(self, base_layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = [(base_layer.weight, self._weight_scale(base_layer).detach())]
        if not self.feedforward and getattr(base_layer, "bias", None) is not None:
            pairs.append((base_layer.bias, self.ia3_l.detach().flatten()))
        return pairs

    @torch.no_grad()
    def merge(self, base_layer):
        # Entries multiplied by zero cannot be divided back; keep their original values instead.
        self._kept_where_zero = []
        for tensor, scale in self._scaled_parameters(base_layer):
            zero = (scale == 0).expand_as(tensor)
            self._kept_where_zero.append((zero, tensor[zero].clone()))
            tensor.mul_(scale.to(tensor.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer):
        for (tensor, scale), (zero, kept) in zip(self._scaled_parameters(base_layer), self._kept_where_zero):
            scale = scale.to(tensor.dtype)
            tensor.div_(torch.where(scale == 0, torch.ones_like(scale), scale))
            tensor[zero] = kept
        del self._kept_where_zero

    def file_tensors(self, base_layer):
        return {"ia3_l": self.ia3_l.detach()}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.ia3_l.copy_(tensors["ia3_l"])


def supported_types() -> tuple[type, ...]:
    return (*linear_types(), nn.Conv2d, nn.Conv3d)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_defaults(model: nn.Module, config: IA3Config) -> IA3Config:
    """`config` with target_modules / feedforward_modules filled in from the model type when None."""
    model_type = model_type_of(model)
    changes = {}
    if config.target_modules is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise PeftkitError(
                f"IA3Config.target_modules is not set and there is no default for model type {model_type!r} "
                f"({type(model).__name__}); pass target_modules (the attention key and value projections and the "
                f"feed-forward output projection) and feedforward_modules. Module names in this model: "
                f"{describe_module_names(model)}. Defaults exist for: {', '.join(sorted(DEFAULT_TARGET_MODULES))}"
            )
        targets, feedforward = DEFAULT_TARGET_MODULES[model_type], DEFAULT_FEEDFORWARD_MODULES[model_type]
        if model_type in EARLIER_DEFAULTS and not _selects_any(model, targets):
            targets, feedforward = EARLIER_DEFAULTS[model_type]
        changes["target_modules"] = list(targets)
        if config.feedforward_modules is None:
            changes["feedforward_modules"] = list(feedforward)
    if config.feedforward_modules is None and "feedforward_modules" not in changes:
        if model_type not in DEFAULT_FEEDFORWARD_MODULES:
            raise PeftkitError(
                f"IA3Config.feedforward_modules is not set and there is no default for model type {model_type!r} "
                f"({type(model).__name__}); name the targeted feed-forward modules whose input (IA)3 scales "
                "(e.g. ['fc2']), or pass [] to scale the output of every targeted module"
            )
        feedforward = list(DEFAULT_FEEDFORWARD_MODULES[model_type])
        targets = changes.get("target_modules", config.target_modules)
        if isinstance(targets, list) and not set(feedforward) <= set(targets):
            # The same selection (peft's "ends with" rule), in the form peft allows next to these targets.
            feedforward = _endswith_regex(feedforward)
        changes["feedforward_modules"] = feedforward
    return config.replace(**changes) if changes else config


def _selects_any(model: nn.Module, names: list[str]) -> bool:
    return any(name_matches(path, names) for path, _ in iter_base_modules(model) if path)


def add_adapter(model: nn.Module, config: IA3Config, adapter_name: str, skip: list[str]) -> Attached:
    """Attach (IA)3 adapter `adapter_name` to the modules `config` selects (defaults by model type)."""
    config = resolve_defaults(model, config)
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        supported_types=supported_types(), task_type=config.task_type, skip=skip,
    )
    # fan_in_fan_out only records the weight layout, which the module type decides (peft sets it the
    # same way: True for GPT-2's Conv1D, whose weight is (in, out)); record it for peft's sake.
    modules = dict(iter_base_modules(model))
    transposed = {not isinstance(modules[n], nn.Linear) for n in targets if isinstance(modules[n], linear_types())}
    if len(transposed) == 1 and config.fan_in_fan_out not in transposed:
        config = config.replace(fan_in_fan_out=transposed.pop())
    for name in targets:
        feedforward = is_feedforward(name, config.feedforward_modules)
        attach_delta(model, name, adapter_name, lambda base, ff=feedforward: IA3Delta(base, ff, config.init_ia3_weights))
    return Attached(targets=targets, config=config)


def _endswith_regex(names: list[str]) -> str:
    """A regex that fully matches exactly the paths ending with one of `names` (peft's list rule)."""
    return ".*(?:" + "|".join(re.escape(name) for name in names) + ")"


def _layer_restricted_regex(target_modules: list[str] | str, layers: list[int] | int, layers_pattern) -> str:
    """A regex selecting the modules target_modules selects, inside the given transformer blocks only."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    containers = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or DEFAULT_LAYER_CONTAINERS)
    block = "(?:" + "|".join(re.escape(c) for c in containers) + r")\.(?:" + "|".join(str(i) for i in layers) + ")"
    if isinstance(target_modules, str):
        named = f"(?:{target_modules})"
    else:
        named = r"(?:.*\.)?(?:" + "|".join(re.escape(name) for name in target_modules) + ")"
    return rf"(?=(?:.*\.)?{block}(?:\..*)?$){named}"


def export_config(config: IA3Config) -> IA3Config:
    """The config to write next to the saved vectors, in a form Hugging Face peft reads the same way.

    peft's IA3 has no layers_to_transform, so the layer choice goes into a target_modules regex; and
    peft requires a feedforward_modules list to be a subset of a target_modules list, so where that
    would not hold the list becomes the equivalent regex.
    """
    changes = {}
    targets = config.target_modules
    if config.layers_to_transform is not None:
        if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
            # ("all-linear" stays: the wrapper writes any string target_modules as the adapted paths.)
            targets = changes["target_modules"] = _layer_restricted_regex(
                targets, config.layers_to_transform, config.layers_pattern
            )
        changes["layers_to_transform"] = None
        changes["layers_pattern"] = None
    feedforward = config.feedforward_modules
    if isinstance(feedforward, list) and feedforward and isinstance(targets, (str, list)) and (
            isinstance(targets, str) or not set(feedforward) <= set(targets)):
        changes["feedforward_modules"] = _endswith_regex(feedforward)
    return config.replace(**changes) if changes else config

# How `peftkit train` trains it: key, value and intermediate.dense scaled on their outputs, both
# output.dense layers (peft's "ends with" rule also picks attention.output.dense) on their inputs; 25k vector
# entries on minilm. The vectors start at 1 and need a high learning rate to move in the default job's 434
# steps (a 32-step check at 5e-3 moved them by at most 0.07). On a causal LM: the config's own
# per-architecture targets.
METHODS = (Method("ia3", IA3Config, dict(target_modules=["key", "value", "intermediate.dense", "output.dense"],
                                         feedforward_modules=["output.dense"]), learning_rate=1e-2,
                  causal_defaults=dict(target_modules=None, feedforward_modules=None), causal_learning_rate=5e-3),)
