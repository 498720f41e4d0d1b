"""OFT: orthogonal fine-tuning, the input of a frozen linear layer turned by a trained rotation.

y = base(x R) = x R W^T + b, with R = diag(R_1, ..., R_r) block-diagonal over in_features
(Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", 2023).

Each block R_i (b x b, b = oft_block_size, r * b = in_features) comes from a skew-symmetric Q_i
(Q_i^T = -Q_i) whose b (b - 1) / 2 upper-triangle entries are the trained values, stored row-major
per block as in `torch.triu_indices(b, b, 1)`: the parameter `oft_R` is (r, b (b - 1) / 2), or
(1, ...) with block_share (one block used r times). This is Hugging Face `peft` 0.21's `OFTConfig`
layout, saved under the key `<module path>.oft_R.weight`. Q -> R:

- use_cayley_neumann=False: the Cayley transform R = (I - Q)(I + Q)^-1, exactly orthogonal;
- use_cayley_neumann=True (peft's default): peft's truncated series
  R = I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m, m = max(num_cayley_neumann_terms - 1, 3) (terms 1: I,
  terms 2: I + 2Q), the Neumann expansion of (I + Q)(I - Q)^-1. It is orthogonal only up to
  O(|Q|^m): cheap, no inverse, close while Q stays small.

Zero Q gives R = I, so the adapter starts at the base model (init_weights=True). coft (constrained
OFT) projects every stored block back onto ||Q_i||_F <= eps / sqrt(number of stored blocks) before
each use, in place, as peft does. Merging replaces W by W R^T, which is exact; unmerging multiplies
by the inverse blocks (computed in float64), so it restores the base within float rounding even
where the Neumann series is not exactly orthogonal.

Layers: nn.Linear (and peftkit's quantized linear). peft's Conv2d OFT rotates unfolded patches and
folds them back with overlaps summed, which its merged weight does not reproduce, and peftkit does not
adapt embeddings with OFT; both are refused at wrap time, as is GPT-2's Conv1D (peft refuses it too).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import torch
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods import lycoris
from peftkit.methods.base import BiasDelta, WeightDelta, attach_delta, iter_base_modules
from peftkit.targeting import find_targets, other_bias_modules


@register_config
@dataclasses.dataclass
class OFTConfig(PeftConfig):
    """Orthogonal fine-tuning. Field names and meanings are those of Hugging Face `peft.OFTConfig`.

    Give exactly one of r (blocks per layer) and oft_block_size (the size b of each block); the
    other follows from in_features = r * b. A value that does not divide a layer's in_features is
    moved to the nearest one that does, for that layer, with a warning (peft's rule, so its files
    load). module_dropout: in training, the share of blocks replaced by the identity in a forward.
    bias: "none", "all" (train every bias of the model) or "oft_only" (biases of adapted layers).
    init_weights: True (Q = 0, the adapter starts at the base) or False (Q ~ N(0, 0.1^2); for tests).
    coft / eps: constrained OFT, each block's ||Q_i|| kept within eps. block_share: one block for all.
    use_cayley_neumann / num_cayley_neumann_terms: Q -> R by the truncated series (see the module
    docstring) instead of the exact Cayley transform. fan_in_fan_out: must stay False (peft resets it
    for nn.Linear; OFT has no Conv1D layer).
    """

    peft_type = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "oft_only"] = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def to_dict(self):
        # peft warns that a Cayley-Neumann adapter from before peft 0.18 (which changed the series) must be
        # retrained unless the file names a newer peft_version; these files use the 0.18+ series.
        return {**super().to_dict(), "peft_version": "0.18.0"}

    def validate(self):
        lycoris.module_sets_to_lists(self)
        super().validate()
        if self.r < 0 or self.oft_block_size < 0:
            raise PeftkitError(
                f"OFTConfig.r and OFTConfig.oft_block_size must not be negative, got r={self.r}, "
                f"oft_block_size={self.oft_block_size}"
            )
        if (self.r == 0) == (self.oft_block_size == 0):
            raise PeftkitError(
                f"OFTConfig needs exactly one of r (blocks per layer) and oft_block_size (block size) set, the "
                f"other 0, since r * oft_block_size = in_features; got r={self.r}, oft_block_size={self.oft_block_size}"
            )
        if not 0.0 <= self.module_dropout < 1.0:
            raise PeftkitError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.eps <= 0:
            raise PeftkitError(f"OFTConfig.eps must be positive (COFT's bound on each block's rotation), got {self.eps}")
        if self.num_cayley_neumann_terms < 1:
            raise PeftkitError(
                f"OFTConfig.num_cayley_neumann_terms must be at least 1, got {self.num_cayley_neumann_terms}"
            )
        if self.fan_in_fan_out:
            raise PeftkitError(
                "OFTConfig.fan_in_fan_out=True is for GPT-2's Conv1D, which OFT does not adapt (neither does peft); "
                "leave it False"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise PeftkitError(
                f"OFTConfig.layers_pattern={self.layers_pattern!r} only says where to count layers; "
                "set layers_to_transform too (the layer indices to adapt)"
            )


def nearest_divisor(size: int, wanted: int) -> int:
    """The divisor of `size` nearest to `wanted`, the smaller on a tie (peft's adjust_oft_parameters)."""
    if wanted >= size:
        return size
    above = wanted
    while above <= size and size % above:
        above += 1
    below = wanted
    while below > 1 and size % below:
        below -= 1
    return below if wanted - below <= above - wanted else above


def block_layout(in_features: int, r: int, block_size: int, module_name: str) -> tuple[int, int]:
    """(blocks, block size) for a layer of `in_features`, from the config's r or oft_block_size."""
    if r == 0:
        if in_features % block_size:
            adjusted = nearest_divisor(in_features, block_size)
            warnings.warn(f"OFT on {module_name!r}: oft_block_size {block_size} does not divide in_features "
                          f"{in_features}; using {adjusted}, as peft does", stacklevel=3)
            block_size = adjusted
        return in_features // block_size, block_size
    if in_features % r:
        adjusted = nearest_divisor(in_features, r)
        warnings.warn(f"OFT on {module_name!r}: r {r} does not divide in_features {in_features}; "
                      f"using {adjusted}, as peft does", stacklevel=3)
        r = adjusted
    return r, in_features // r


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series for (I + Q)(I - Q)^-1 on blocks Q (n, b, b); see the module docstring."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    if terms <= 1:
        return eye.clone()
    rotation = eye + 2 * skew
    if terms == 2:
        return rotation
    highest = max(terms - 1, 3)
    power = skew
    for _ in range(2, highest):
        power = power @ skew
        rotation = rotation + 2 * power
    return rotation + power @ skew


class OftDelta(WeightDelta):
    """OFT on one nn.Linear: rotates the input in blocks before the frozen layer.

    oft_R: (stored blocks, b (b - 1) / 2), the upper triangles of the skew-symmetric blocks Q_i.
    delta_bias: (out,) trained bias change when the config trains biases, else None.
    """

    transforms_input = True

    def __init__(self, base_layer: nn.Linear, config: OFTConfig, module_name: str):
        super().__init__()
        in_features = base_layer.in_features
        self.blocks, self.block_size = block_layout(in_features, config.r, config.oft_block_size, module_name)
        self.block_share = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.use_cayley_neumann = config.use_cayley_neumann
        self.neumann_terms = config.num_cayley_neumann_terms
        self.module_dropout = config.module_dropout
        stored = 1 if self.block_share else self.blocks
        size = self.block_size * (self.block_size - 1) // 2
        dtype = base_layer.weight.dtype if base_layer.weight.is_floating_point() else torch.float32
        self.oft_R = nn.Parameter(torch.zeros(stored, size, dtype=dtype))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(self.block_size, self.block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.add_bias_change(base_layer, config.bias != "none")

    def skew_blocks(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, b (b - 1) / 2) upper triangles -> (n, b, b) skew-symmetric blocks."""
        upper = vectors.new_zeros(vectors.shape[0], self.block_size, self.block_size)
        upper[:, self.rows, self.cols] = vectors
        return upper - upper.transpose(-2, -1)

    @torch.no_grad()
    def _project_coft(self) -> None:
        # ||Q_i||_F = sqrt(2) |v_i|; blocks above the bound are scaled back onto it (peft's _project_batch).
        bound = self.eps / math.sqrt(self.oft_R.shape[0])
        norms = math.sqrt(2) * self.oft_R.norm(dim=1, keepdim=True)
        scale = torch.where(norms <= bound, torch.ones_like(norms), bound / norms.clamp_min(torch.finfo(norms.dtype).tiny))
        self.oft_R.mul_(scale)

    def rotation_blocks(self) -> torch.Tensor:
        """The stored rotation blocks R_i: (stored blocks, b, b) in the parameter's dtype."""
        if self.coft:
            self._project_coft()
        skew = self.skew_blocks(self.oft_R)
        if self.use_cayley_neumann:
            return cayley_neumann(skew, self.neumann_terms)
        eye = torch.eye(self.block_size, dtype=skew.dtype, device=skew.device).expand_as(skew)
        return torch.linalg.solve(eye + skew, eye - skew)  # (I + Q)^-1 (I - Q) = (I - Q)(I + Q)^-1

    def _all_blocks(self, rotation: torch.Tensor) -> torch.Tensor:
        """(blocks, b, b): the shared block repeated, or the blocks as they are."""
        return rotation.expand(self.blocks, -1, -1) if rotation.shape[0] == 1 else rotation

    def _drop_blocks(self, rotation: torch.Tensor) -> torch.Tensor:
        # Multiplicative dropout, as peft documents it: int(p * blocks) random blocks become the identity.
        # (peft 0.21 builds this layer but never calls it in forward, so there it has no effect.)
        count = rotation.shape[0]
        dropped = int(self.module_dropout * count)
        if count == 1 or dropped == 0:
            return rotation
        mask = torch.zeros(count, 1, 1, dtype=rotation.dtype, device=rotation.device)
        mask[torch.randperm(count, device=rotation.device)[:dropped]] = 1
        eye = torch.eye(self.block_size, dtype=rotation.dtype, device=rotation.device)
        return (1 - mask) * rotation + mask * eye

    def transform_input(self, x):
        """x (..., in) -> x R, block by block: (..., r, b) times each R_i (b, b)."""
        rotation = self.rotation_blocks()
        if self.training and self.module_dropout > 0:
            rotation = self._drop_blocks(rotation)
        blocks = x.to(rotation.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        if rotation.shape[0] == 1:
            turned = blocks @ rotation[0]
        else:
            turned = torch.einsum("...rk,rkc->...rc", blocks, rotation)
        return turned.reshape(x.shape).to(x.dtype)

    def forward(self, x, base_output):
        if self.delta_bias is not None:
            return base_output + self.delta_bias.to(base_output.dtype)
        return base_output

    @torch.no_grad()
    def merge(self, base_layer):
        weight = base_layer.weight
        rotation = self._all_blocks(self.rotation_blocks().to(torch.float32))
        columns = weight.to(torch.float32).reshape(weight.shape[0], self.blocks, self.block_size)
        # y = x R W^T = x (W R^T)^T: block i of W's columns becomes W_i R_i^T.
        merged = torch.einsum("ork,rck->orc", columns, rotation)
        weight.copy_(merged.reshape(weight.shape).to(weight.dtype))
        self.merge_bias(base_layer)

    @torch.no_grad()
    def unmerge(self, base_layer):
        weight = base_layer.weight
        inverse = torch.linalg.inv(self._all_blocks(self.rotation_blocks().to(torch.float64)))
        columns = weight.to(torch.float64).reshape(weight.shape[0], self.blocks, self.block_size)
        restored = torch.einsum("ork,rck->orc", columns, inverse)
        weight.copy_(restored.reshape(weight.shape).to(weight.dtype))
        self.unmerge_bias(base_layer)

    def file_tensors(self, base_layer):
        return {"oft_R.weight": self.oft_R.detach()} | self.bias_file_tensors(base_layer)

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.oft_R.copy_(tensors["oft_R.weight"])
        self.assign_bias_file_tensor(tensors, base_layer)

    def extra_repr(self) -> str:
        kind = f"cayley_neumann({self.neumann_terms})" if self.use_cayley_neumann else "cayley"
        shared = ", block_share" if self.block_share else ""
        return f"blocks={self.blocks}, block_size={self.block_size}, {kind}{shared}, oft_R={tuple(self.oft_R.shape)}"


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    kind = type(module).__name__
    if kind == "Conv1D":
        reason = ("a transformers Conv1D (GPT-2 style), for which Hugging Face peft has no OFT layer either; use LoRA "
                  "for GPT-2's attention and MLP layers, or target other modules (e.g. lm_head)")
    elif isinstance(module, nn.Conv2d):
        reason = ("an nn.Conv2d; peftkit's OFT adapts only nn.Linear (peft's Conv2d OFT sums overlapping rotated "
                  "patches, which its merged weight does not reproduce)")
    else:
        reason = f"a {kind}; OFT adapts only nn.Linear"
    raise PeftkitError(f"module {name!r} is {reason}. Narrow target_modules (or use exclude_modules) to skip it.")


def add_adapter(model: nn.Module, config: OFTConfig, adapter_name: str, skip: list[str]) -> list[str]:
    """Attach OFT adapter `adapter_name` to the modules `config` selects; returns their paths."""
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        task_type=config.task_type, skip=skip,
    )
    modules = dict(iter_base_modules(model))
    for name in targets:  # refuse before attaching anything
        _check_supported(name, modules[name])
    for name in targets:
        attach_delta(model, name, adapter_name, lambda base_layer, name=name: OftDelta(base_layer, config, name))
    if config.bias == "all":
        for name in other_bias_modules(model, targets, skip):
            attach_delta(model, name, adapter_name, BiasDelta)
    return targets


# How `peftkit train` trains it: 32-wide rotation blocks on the input of every linear layer (peft's default
# block size); the rate is LoRA's, not yet tuned on sst2.
METHODS = (Method("oft", OFTConfig, dict(oft_block_size=32, target_modules="all-linear"), learning_rate=1e-3),)
