"""What LoHa and LoKr share (the LyCORIS family); not a method of its own.

Both describe a weight update Delta W of an nn.Linear, nn.Conv1d or nn.Conv2d through small factors
(a Hadamard product of two low-rank matrices, or a Kronecker product), and add its effect to the
frozen layer's output: y = base(x) + x Delta W^T (or the convolution with Delta W). Merging adds
Delta W to the base weight, so it is exact.

Training-time options, as in Hugging Face `peft`:
- module_dropout p: each forward in training skips the whole update with probability p;
- rank_dropout p: each forward in training zeroes every output row of Delta W with probability p
  (optionally rescaling the kept rows by 1 / their share, as dropout does).

GPT-2's transformers Conv1D is refused: peft has no LoHa or LoKr layer for it, so an adapter for it
could not be shared with peft.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.config import PeftConfig
from peftkit.errors import PeftkitError
from peftkit.methods.base import WeightDelta, attach_delta, iter_base_modules
from peftkit.targeting import find_targets

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def pattern_value(module_name: str, patterns: dict, default):
    """The value of the first pattern that matches the end of `module_name` (peft's rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def module_sets_to_lists(config: PeftConfig) -> None:
    """peft keeps target_modules / exclude_modules as sets; store them as sorted lists (JSON-friendly)."""
    if isinstance(config.target_modules, set):
        config.target_modules = sorted(config.target_modules)
    if isinstance(config.exclude_modules, set):
        config.exclude_modules = sorted(config.exclude_modules)


def validate_common(config: PeftConfig) -> None:
    """Checks shared by LoHaConfig and LoKrConfig (r, dropouts, patterns, layer choice), after the type checks."""
    name = type(config).__name__
    if config.r <= 0:
        raise PeftkitError(f"{name}.r must be a positive integer (the rank), got {config.r}")
    for pattern, rank in config.rank_pattern.items():
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise PeftkitError(f"{name}.rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
    for field in ("rank_dropout", "module_dropout"):
        value = getattr(config, field)
        if not 0.0 <= value < 1.0:
            raise PeftkitError(f"{name}.{field} must be in [0, 1), got {value}")
    if config.layers_pattern and config.layers_to_transform is None:
        raise PeftkitError(
            f"{name}.layers_pattern={config.layers_pattern!r} only says where to count layers; "
            "set layers_to_transform too (the layer indices to adapt)"
        )


def kaiming_uniform(tensor: torch.Tensor) -> None:
    """The default nn.Linear initialisation, which peft uses for LyCORIS factors."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LycorisDelta(WeightDelta):
    """A delta defined by a full weight update Delta W, (out, in) or (out, in / groups, *kernel).

    Subclasses register their factors as parameters named exactly as peft's file keys (hada_w1_a,
    lokr_w1, ...) and implement `delta_weight()`; a Linear subclass may override `linear_update(x)`
    when it can apply Delta W without building it.
    """

    # Whether rank dropout divides the kept rows by their share (LoHa always; LoKr when asked).
    rescale_rank_dropout = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float):
        super().__init__()
        weight = base_layer.weight
        self.weight_shape = tuple(weight.shape)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.is_conv = isinstance(base_layer, (nn.Conv1d, nn.Conv2d))
        if self.is_conv:
            self.convolve = F.conv2d if isinstance(base_layer, nn.Conv2d) else F.conv1d
            self.conv_options = dict(stride=base_layer.stride, padding=base_layer.padding,
                                     dilation=base_layer.dilation, groups=base_layer.groups)
            self.padding_mode = base_layer.padding_mode
            self.explicit_padding = base_layer._reversed_padding_repeated_twice

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._parameters.values())).dtype

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover
        """The scaled update alpha / r * Delta W in the base weight's shape."""
        raise NotImplementedError

    def linear_update(self, x: torch.Tensor) -> torch.Tensor:
        """x Delta W^T for a Linear base: (..., in) -> (..., out)."""
        return F.linear(x, self.delta_weight())

    def conv_update(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of x with Delta W, with the base layer's stride, padding and groups."""
        options = self.conv_options
        if self.padding_mode != "zeros":
            # The base pads with reflect/replicate/circular first; do the same so merging stays exact.
            x = F.pad(x, self.explicit_padding, mode=self.padding_mode)
            options = {**options, "padding": 0}
        return self.convolve(x, self.delta_weight(), None, **options)

    def forward(self, x, base_output):
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return base_output
        x = x.to(self.dtype)
        update = self.conv_update(x) if self.is_conv else self.linear_update(x)
        if self.training and self.rank_dropout > 0:
            # Zeroing output rows of Delta W zeroes the same output channels of its effect.
            keep = (torch.rand(self.weight_shape[0], device=update.device) > self.rank_dropout).to(update.dtype)
            if self.rescale_rank_dropout and keep.any():
                keep = keep / keep.mean()
            update = update * (keep.view(-1, *[1] * (update.dim() - 2)) if self.is_conv else keep)
        return base_output + update.to(base_output.dtype)

    def file_tensors(self, base_layer):
        return {name: parameter.detach() for name, parameter in self._parameters.items()}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        for name, parameter in self._parameters.items():
            parameter.copy_(tensors[name])

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{name}={tuple(p.shape)}" for name, p in self._parameters.items())
        return f"r={self.r}, scaling={self.scaling:g}, {shapes}"


def attach(model: nn.Module, config: PeftConfig, adapter_name: str, skip: list[str], method: str, make_delta) -> list[str]:
    """Attach `make_delta(base_layer, r, alpha)` to every module `config` selects; returns their paths."""
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        task_type=config.task_type, skip=skip,
    )
    modules = dict(iter_base_modules(model))
    for name in targets:
        _check_supported(name, modules[name], method)
    for name in targets:
        r = pattern_value(name, config.rank_pattern, config.r)
        alpha = pattern_value(name, config.alpha_pattern, config.alpha)
        attach_delta(model, name, adapter_name, lambda base_layer, r=r, alpha=alpha: make_delta(base_layer, r, alpha))
    return targets


def _check_supported(name: str, module: nn.Module, method: str) -> None:
    if isinstance(module, SUPPORTED_TYPES):
        return
    kind = type(module).__name__
    if kind == "Conv1D":  # transformers' GPT-2 layer, weight stored as (in, out)
        raise PeftkitError(
            f"module {name!r} is a transformers Conv1D (GPT-2 style); {method} adapts only nn.Linear, "
            f"nn.Conv1d and nn.Conv2d, as in Hugging Face peft, which has no {method} layer for Conv1D "
            "either. Use LoRA for GPT-2's attention and MLP layers, or target other modules (e.g. lm_head)."
        )
    raise PeftkitError(
        f"module {name!r} is a {kind}; {method} adapts only nn.Linear, nn.Conv1d and nn.Conv2d. "
        "Narrow target_modules (or use exclude_modules) to skip it."
    )
