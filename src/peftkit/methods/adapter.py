"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021): small trained MLPs added to each block.

An adapter is a down-projection to a narrow bottleneck, an activation, and an up-projection back:

    adapter(v) = adapter_up(activation(adapter_down(dropout(v))))

It sits right after an output projection of a transformer block (the attention block's output
projection and/or the feed-forward block's last projection), inside the block's residual branch,
so it changes what that sublayer adds to the residual stream. Two forms:

- "sequential" (Houlsby): the adapter reads the projection's output h and adds to it,
  y = h + scaling * adapter(h); adapter_down maps the hidden size d to the bottleneck, adapter_up
  maps it back to d.
- "parallel" (He et al., 2022): the adapter reads the projection's *input* x, the same tensor the
  projection reads, and runs beside it, y = h + scaling * adapter(x). Note that x is the input of
  the output projection, not of the whole sublayer: for the attention block it is the concatenated
  head outputs (width d), for the feed-forward block the intermediate activation (width of the
  feed-forward layer, e.g. 4d). adapter_down therefore maps x's width to the bottleneck and
  adapter_up maps the bottleneck to d.

Placement "houlsby" puts one adapter after the attention output projection and one after the
feed-forward output projection of every block; "pfeiffer" only after the feed-forward one. In
BERT the residual connection and LayerNorm come after the projection (inside BertSelfOutput /
BertOutput), so the adapter acts on `attention.output.dense` and `output.dense` before the
residual and LayerNorm, as in the Houlsby paper. `BottleneckConfig.target_modules` names the
projections directly for models whose layout is not recognised.

adapter_up starts at zero, so a new adapter leaves the model exactly as it was; adapter_down starts
with PyTorch's default Linear initialisation (kaiming-uniform), so gradients reach adapter_up at once.

Adapters cannot be merged: the activation between the two projections makes the adapter a
nonlinear function, which no change of the projection's weight can reproduce.

Files: Hugging Face `peft` has no bottleneck adapter, so these files use peftkit's own layout in the
peft folder style (adapter_config.json with peft_type "BOTTLENECK" + adapter_model.safetensors with
keys `base_model.model.<module path>.adapter_down.weight`, `.adapter_down.bias`,
`.adapter_up.weight`, `.adapter_up.bias`). peftkit loads them; `peft` cannot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdapterDelta, attach_delta, iter_base_modules
from peftkit.targeting import describe_module_names, find_layer_blocks, find_targets, linear_types

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "swish": nn.SiLU, "silu": nn.SiLU}

# Known block layouts: (family, attention output projection, feed-forward output projection), as
# module paths relative to one transformer block.
BLOCK_LAYOUTS: list[tuple[str, str, str]] = [
    ("BERT / RoBERTa / ViT before transformers 5", "attention.output.dense", "output.dense"),
    ("GPT-2", "attn.c_proj", "mlp.c_proj"),
    ("Llama / Mistral / Qwen", "self_attn.o_proj", "mlp.down_proj"),
    ("ViT (transformers 5)", "attention.o_proj", "mlp.fc2"),
    ("DistilBERT", "attention.out_lin", "ffn.lin2"),
    ("OPT", "self_attn.out_proj", "fc2"),
]


@register_config
@dataclasses.dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters after the output projections of each transformer block (peftkit's own method).

    placement: "houlsby" (an adapter after the attention output projection and one after the
        feed-forward output projection of each block) or "pfeiffer" (after the feed-forward one only).
    bottleneck_size: width of the bottleneck (an int smaller than the hidden size). Give this or
        reduction_factor, not both.
    reduction_factor: hidden size / bottleneck width (bottleneck = hidden size // reduction_factor),
        e.g. 16 gives a 48-wide bottleneck on a 768-wide model.
    activation: between the two projections: "relu", "gelu", "tanh", "swish" (= "silu").
    form: "sequential" (the adapter reads the projection's output h: y = h + scaling * adapter(h))
        or "parallel" (it reads the projection's input x: y = h + scaling * adapter(x)).
    scaling: multiplies the adapter's output in both forms (1.0: the plain Houlsby adapter).
    dropout: dropout on the adapter's input while training.
    target_modules: the output projections to place adapters after (names or a regex, as for LoRA),
        instead of the ones `placement` finds; needed for models whose layout is not recognised.
    layers_to_transform: block indices that get adapters (None: every block).
    modules_to_save: modules trained whole (e.g. a new classifier head).
    """

    peft_type = "BOTTLENECK"

    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    form: Literal["sequential", "parallel"] = "sequential"
    scaling: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    modules_to_save: list[str] | None = None

    def validate(self):
        super().validate()
        if (self.bottleneck_size is None) == (self.reduction_factor is None):
            given = "both" if self.bottleneck_size is not None else "neither"
            raise PeftkitError(
                f"BottleneckConfig needs exactly one of bottleneck_size (the bottleneck width, e.g. 64) or "
                f"reduction_factor (hidden size / bottleneck width, e.g. 16); {given} was given"
            )
        if self.bottleneck_size is not None and self.bottleneck_size <= 0:
            raise PeftkitError(f"BottleneckConfig.bottleneck_size must be a positive integer, got {self.bottleneck_size}")
        if self.reduction_factor is not None and not self.reduction_factor > 1:
            raise PeftkitError(
                f"BottleneckConfig.reduction_factor must be greater than 1 (the bottleneck must be narrower than "
                f"the hidden size), got {self.reduction_factor}"
            )
        if self.activation.lower() not in ACTIVATIONS:
            raise PeftkitError(
                f"BottleneckConfig.activation={self.activation!r} is unknown; known activations: {', '.join(ACTIVATIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise PeftkitError(f"BottleneckConfig.dropout must be in [0, 1), got {self.dropout}")

    def bottleneck_for(self, hidden_size: int) -> int:
        """The bottleneck width for a projection whose output has `hidden_size` features."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return int(hidden_size // self.reduction_factor)


def _features(base_layer: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an nn.Linear or GPT-2 Conv1D."""
    weight = base_layer.weight
    # GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in).
    return tuple(weight.shape) if not isinstance(base_layer, nn.Linear) else (weight.shape[1], weight.shape[0])


class BottleneckDelta(AdapterDelta):
    """One bottleneck adapter after one projection.

    adapter_down: Linear(read width -> bottleneck), adapter_up: Linear(bottleneck -> hidden), where
    the read width is the hidden size (sequential: reads the output h) or the projection's input
    width (parallel: reads its input x). forward(x (..., in), h (..., hidden)) -> (..., hidden).
    """

    mergeable = False
    merge_refusal = (
        "a bottleneck adapter has an activation between its down- and up-projection, so it is a nonlinear "
        "function of its input that no change of the projection's weight can reproduce; keep it unmerged"
    )

    def __init__(self, base_layer: nn.Module, bottleneck_size: int, activation: str, form: str, scaling: float, dropout: float):
        super().__init__()
        in_features, hidden_size = _features(base_layer)
        dtype = base_layer.weight.dtype
        self.form, self.scaling = form, scaling
        read_width = in_features if form == "parallel" else hidden_size
        self.adapter_down = nn.Linear(read_width, bottleneck_size, dtype=dtype)
        self.activation = ACTIVATIONS[activation.lower()]()
        self.adapter_up = nn.Linear(bottleneck_size, hidden_size, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            # Zero up-projection: the adapter adds exactly nothing until it is trained.
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x, base_output):
        read = x if self.form == "parallel" else base_output
        read = self.dropout(read.to(self.adapter_down.weight.dtype))
        update = self.adapter_up(self.activation(self.adapter_down(read))) * self.scaling
        return base_output + update.to(base_output.dtype)

    def extra_repr(self) -> str:
        return f"form={self.form}, scaling={self.scaling:g}"

    def file_tensors(self, base_layer):
        return {
            "adapter_down.weight": self.adapter_down.weight.detach(), "adapter_down.bias": self.adapter_down.bias.detach(),
            "adapter_up.weight": self.adapter_up.weight.detach(), "adapter_up.bias": self.adapter_up.bias.detach(),
        }

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.adapter_down.weight.copy_(tensors["adapter_down.weight"])
        self.adapter_down.bias.copy_(tensors["adapter_down.bias"])
        self.adapter_up.weight.copy_(tensors["adapter_up.weight"])
        self.adapter_up.bias.copy_(tensors["adapter_up.bias"])


def recognised_projections(model: nn.Module, placement: str) -> list[tuple[int, str]] | None:
    """(block index, module path) of the output projections `placement` adapts, or None when the
    model's block layout is not one of BLOCK_LAYOUTS."""
    try:
        blocks = find_layer_blocks(model)
    except PeftkitError:
        return None
    modules = {name for name, _ in iter_base_modules(model)}
    for _, attention, feed_forward in BLOCK_LAYOUTS:
        if all(f"{block}.{attention}" in modules and f"{block}.{feed_forward}" in modules for block in blocks):
            suffixes = [attention, feed_forward] if placement == "houlsby" else [feed_forward]
            return [(index, f"{block}.{suffix}") for index, block in enumerate(blocks) for suffix in suffixes]
    return None


def _unrecognised_layout(model: nn.Module) -> PeftkitError:
    layouts = "; ".join(f"{family}: {attention}, {feed_forward}" for family, attention, feed_forward in BLOCK_LAYOUTS)
    return PeftkitError(
        f"BottleneckConfig does not recognise the block layout of {type(model).__name__}, so it cannot tell where "
        f"the attention and feed-forward output projections are (layouts it knows, attention then feed-forward "
        f"projection: {layouts}). Pass target_modules with the names of the output projections to place adapters "
        f"after (Linear or Conv1D modules); module names in this model: {describe_module_names(model)}"
    )


def _choose_targets(model: nn.Module, config: BottleneckConfig, skip: list[str]) -> list[str]:
    if config.target_modules is not None:
        return find_targets(
            model, config.target_modules, layers_to_transform=config.layers_to_transform,
            supported_types=linear_types(), task_type=config.task_type, skip=skip,
        )
    projections = recognised_projections(model, config.placement)
    if projections is None:
        raise _unrecognised_layout(model)
    if config.layers_to_transform is not None:
        wanted = {config.layers_to_transform} if isinstance(config.layers_to_transform, int) else set(config.layers_to_transform)
        count = len({index for index, _ in projections})
        projections = [(index, name) for index, name in projections if index in wanted]
        if not projections:
            raise PeftkitError(
                f"layers_to_transform={config.layers_to_transform} selects no block: {type(model).__name__} has "
                f"{count} blocks (0..{count - 1})"
            )
    return [name for _, name in projections if name not in skip and not any(name.startswith(s + ".") for s in skip)]


def add_adapter(model: nn.Module, config: BottleneckConfig, adapter_name: str, skip: list[str]) -> list[str]:
    """Attach bottleneck adapter `adapter_name` after the projections `config` selects; returns their paths."""
    targets = _choose_targets(model, config, skip)
    modules = dict(iter_base_modules(model))
    sizes = {}
    for name in targets:  # every size is checked before anything is attached
        module = modules[name]
        if not isinstance(module, linear_types()):
            kinds = ", ".join(t.__name__ for t in linear_types())
            raise PeftkitError(f"module {name!r} is a {type(module).__name__}; bottleneck adapters go after {kinds} only")
        in_features, hidden_size = _features(module)
        bottleneck = config.bottleneck_for(hidden_size)
        read_width = in_features if config.form == "parallel" else hidden_size
        limit = min(hidden_size, read_width)
        if bottleneck < 1:
            raise PeftkitError(
                f"reduction_factor={config.reduction_factor} leaves no bottleneck for {name!r} (hidden size "
                f"{hidden_size}); use a reduction_factor of at most {hidden_size}"
            )
        if bottleneck >= limit:
            which = "hidden size" if limit == hidden_size else "input width (the parallel form reads the input)"
            raise PeftkitError(
                f"bottleneck size {bottleneck} is not smaller than the {which} {limit} of {name!r}: a bottleneck "
                f"adapter must compress; use bottleneck_size < {limit} (or a larger reduction_factor)"
            )
        sizes[name] = bottleneck
    for name in targets:
        def make(base_layer, bottleneck=sizes[name]):
            return BottleneckDelta(base_layer, bottleneck, config.activation, config.form, config.scaling, config.dropout)

        attach_delta(model, name, adapter_name, make)
    return targets

# How `peftkit train` trains it.
METHODS = (Method("adapter", BottleneckConfig, dict(placement="houlsby", bottleneck_size=64, activation="gelu"),
                  learning_rate=1e-3),)
