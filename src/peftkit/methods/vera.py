"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024).

One pair of frozen random projections is shared by every adapted layer of the model, vera_A:
(r, max_in) and vera_B: (max_out, r), sized for the largest adapted layer; each layer slices what it
needs and trains two vectors only, lambda_d: (r,) and lambda_b: (out,):

    y = W x + lambda_b * (B[:out, :] (lambda_d * (A[:, :in] x)))

The projections are drawn from `projection_prng_key` exactly as Hugging Face `peft` draws them
(kaiming-uniform from a seeded CPU generator, vera_A first), so an adapter saved without them
(`save_projection=False`) rebuilds the same ones. They are model-level state (`VeraProjections`),
saved under peft's keys `base_model.vera_A` / `base_model.vera_B`; the per-layer vectors are saved as
`base_model.model.<module path>.vera_lambda_b` / `.vera_lambda_d`. Merging adds
(lambda_b * B)(lambda_d * A) to W, which is exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import (
    Attached,
    BiasDelta,
    ModelAdapter,
    WeightDelta,
    attach_delta,
    iter_base_modules,
)
from peftkit.targeting import find_targets, linear_types, other_bias_modules


@register_config
@dataclasses.dataclass
class VeraConfig(PeftConfig):
    """VeRA. Field names and meanings are those of Hugging Face `peft.VeraConfig`.

    r: rank of the shared projections (VeRA uses far larger ranks than LoRA: the trained vectors
    do not grow with r beyond lambda_d). target_modules: names, a regex, or "all-linear" (Linear and
    GPT-2 Conv1D layers only). projection_prng_key: seed of the shared projections.
    save_projection: write the projections into the adapter file (else they are rebuilt from the
    key). vera_dropout: dropout on the adapter's input. d_initial: starting value of every lambda_d
    (lambda_b starts at 0, so the adapter starts at the base model). bias: "none", "all" (every bias
    trains) or "vera_only" (biases of adapted layers). init_weights: False starts lambda_b at 1 and
    lambda_d random (only for tests: the model changes at once). fan_in_fan_out: accepted for peft
    files; the layout is read from the layer type.
    """

    peft_type = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "vera_only"] = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self):
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"VeraConfig.r must be a positive integer (the rank of the shared projections), got {self.r}")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise PeftkitError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout}")
        if not -(2**63) <= self.projection_prng_key < 2**64:
            raise PeftkitError(
                "VeraConfig.projection_prng_key must be a torch.Generator seed, in [-2**63, 2**64), "
                f"got {self.projection_prng_key}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise PeftkitError("VeraConfig.layers_pattern only applies together with layers_to_transform; set both or neither")


def shared_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen projections for seed `key`: vera_A (r, max_in), vera_B (max_out, r), float32.

    Kaiming-uniform (gain sqrt 2, fan-in mode) drawn from one CPU generator, vera_A first, as peft
    does, so both libraries rebuild the same tensors from the key.
    """
    generator = torch.Generator(device="cpu").manual_seed(key)
    return _kaiming_uniform((r, max_in), generator), _kaiming_uniform((max_out, r), generator)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    fan_in = shape[1]
    # Computed in this order (gain / sqrt(fan), times sqrt 3) so the bound, and so every drawn value,
    # is bit-identical to peft's.
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(ModelAdapter):
    """The shared frozen projections of one VeRA adapter: buffers vera_A (r, max_in), vera_B (max_out, r).

    Buffers, not parameters: they never train and, as in peft, do not count as model parameters.
    """

    def __init__(self, r: int, max_in: int, max_out: int, key: int, save_projection: bool):
        super().__init__()
        vera_A, vera_B = shared_projections(r, max_in, max_out, key)
        self.register_buffer("vera_A", vera_A)
        self.register_buffer("vera_B", vera_B)
        self.save_projection = save_projection

    def file_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        return {"base_model.vera_A": self.vera_A, "base_model.vera_B": self.vera_B}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        # A saved projection only has to be large enough for every layer to slice its part from it (a
        # file whose projections were sized over more layers still works), as in peft.
        needed = {"base_model.vera_A": self.vera_A.shape, "base_model.vera_B": self.vera_B.shape}
        for key, shape in needed.items():
            if key not in tensors:
                continue
            found = tuple(tensors[key].shape)
            rank_dim = 0 if key.endswith("vera_A") else 1
            if len(found) != 2 or found[rank_dim] != shape[rank_dim] or found[1 - rank_dim] < shape[1 - rank_dim]:
                raise PeftkitError(
                    f"{where}: {key} has shape {found}, but the adapted layers need at least {tuple(shape)} "
                    f"(r={self.vera_A.shape[0]}, largest input {self.vera_A.shape[1]}, largest output "
                    f"{self.vera_B.shape[0]}): this adapter was made for another base model or config"
                )
        self._assign_file_tensors(tensors)

    def _assign_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "base_model.vera_A" in tensors:
            self.vera_A = tensors["base_model.vera_A"].to(self.vera_A.device, self.vera_A.dtype).clone()
            self.vera_B = tensors["base_model.vera_B"].to(self.vera_B.device, self.vera_B.dtype).clone()


class VeraDelta(WeightDelta):
    """VeRA on nn.Linear or GPT-2 Conv1D: vera_lambda_d (r,), vera_lambda_b (out_features,).

    Reads the shared projections from its `VeraProjections` (held by reference, not as a submodule:
    they belong to the model, are saved once and must not count as this layer's tensors).
    """

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, config: VeraConfig):
        super().__init__()
        weight = base_layer.weight
        # GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in).
        self.transposed = not isinstance(base_layer, nn.Linear)
        self.in_features, self.out_features = (weight.shape if self.transposed else weight.shape[::-1])
        object.__setattr__(self, "projections", projections)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features, dtype=dtype)
            lambda_d = torch.full((config.r,), float(config.d_initial), dtype=dtype)
        else:
            lambda_b = torch.ones(self.out_features, dtype=dtype)
            lambda_d = torch.randn(config.r).to(dtype)
        self.vera_lambda_b = nn.Parameter(lambda_b)
        self.vera_lambda_d = nn.Parameter(lambda_d)
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        self.add_bias_change(base_layer, config.bias != "none")

    def _sliced_projections(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's parts of the shared projections: A (r, in_features), B (out_features, r)."""
        vera_A = self.projections.vera_A[:, : self.in_features]
        vera_B = self.projections.vera_B[: self.out_features, :]
        return vera_A.to(like), vera_B.to(like)

    def forward(self, x, base_output):
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        vera_A, vera_B = self._sliced_projections(self.vera_lambda_d)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, vera_A), vera_B)
        output = base_output + update.to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + self.delta_bias
        return output

    def extra_repr(self) -> str:
        return f"r={self.vera_lambda_d.shape[0]}, in={self.in_features}, out={self.out_features}"

    def delta_weight(self) -> torch.Tensor:
        """(lambda_b * B)(lambda_d * A) in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        vera_A, vera_B = self._sliced_projections(self.vera_lambda_d)
        delta = (self.vera_lambda_b[:, None] * vera_B) @ (self.vera_lambda_d[:, None] * vera_A)
        return delta.T if self.transposed else delta

    def file_tensors(self, base_layer):
        tensors = {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}
        return tensors | self.bias_file_tensors(base_layer)

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.vera_lambda_b.copy_(tensors["vera_lambda_b"])
        self.vera_lambda_d.copy_(tensors["vera_lambda_d"])
        self.assign_bias_file_tensor(tensors, base_layer)


def add_adapter(model: nn.Module, config: VeraConfig, adapter_name: str, skip: list[str]) -> Attached:
    """Attach VeRA adapter `adapter_name`: shared projections sized for the selected layers, and
    lambda vectors on each of them."""
    targets = find_targets(
        model, config.target_modules, layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern, supported_types=linear_types(), task_type=config.task_type, skip=skip,
    )
    modules = dict(iter_base_modules(model))
    shapes = []  # (in_features, out_features) of each adapted layer
    for name in targets:
        weight = modules[name].weight
        shapes.append(tuple(weight.shape) if not isinstance(modules[name], nn.Linear) else tuple(weight.shape[::-1]))
    max_in = max(in_features for in_features, _ in shapes)
    max_out = max(out_features for _, out_features in shapes)
    projections = VeraProjections(config.r, max_in, max_out, config.projection_prng_key, config.save_projection)
    for name in targets:
        attach_delta(model, name, adapter_name, lambda base_layer: VeraDelta(base_layer, projections, config))

    if config.bias == "all":
        for name in other_bias_modules(model, targets, skip):
            attach_delta(model, name, adapter_name, BiasDelta)
    return Attached(targets=targets, model_adapter=projections)

# How `peftkit train` trains it: shared projections of rank 256 on every linear layer; it trains ~out+r
# values per layer, so it needs a larger step than LoRA (the paper uses 4e-3 to 1e-2 over far more epochs
# than our 2). Measured on sst2, 2 epochs: 84.63% at 1e-2, 86.01% at 3e-2.
METHODS = (Method("vera", VeraConfig, dict(r=256, target_modules="all-linear", d_initial=0.1), learning_rate=3e-2),)
