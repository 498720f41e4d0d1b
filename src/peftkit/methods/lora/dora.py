"""DoRA (`use_dora=True`, Liu et al., 2024): LoRA plus a trained magnitude per output channel.

The adapted weight is split into a magnitude and a direction: W' = m * (W + s B A) / ||W + s B A||, with
the norm treated as a constant in backward. Its math, dropout handling and file keys
(`lora_magnitude_vector`) follow `peft`; DoRA on an embedding layer is refused at wrap time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.methods.base import AdapterDelta
from peftkit.methods.lora.layer import LoraConv2dDelta, LoraLinearDelta


def remember_base_layer(delta: AdapterDelta, base_layer: nn.Module) -> None:
    """Give `delta` a reference to its base layer, `delta._base_layer`: DoRA's forward reads the base weight
    (for its norm). A plain attribute, not a submodule: the base layer's weights must not be listed,
    counted or saved as the adapter's own."""
    object.__setattr__(delta, "_base_layer", base_layer)


@torch.no_grad()
def merge_dora(delta: LoraLinearDelta | LoraConv2dDelta, base_layer: nn.Module, factor: torch.Tensor) -> None:
    """Merge a DoRA delta into `base_layer`: W <- factor * (W + s B A), with factor = m / ||W + s B A|| (shaped to
    scale W in its own layout), and the bias change. The factor is kept for unmerge: the norm depends on the
    weight before merging, which is gone afterwards."""
    weight = base_layer.weight
    delta._merged_factor = factor
    weight.copy_((factor * (weight + delta.delta_weight().to(weight.dtype))).to(weight.dtype))
    delta.merge_bias(base_layer)


@torch.no_grad()
def unmerge_dora(delta: LoraLinearDelta | LoraConv2dDelta, base_layer: nn.Module) -> None:
    """Take a merged DoRA delta out of `base_layer`: divide by the factor kept at merge, subtract the update."""
    weight = base_layer.weight
    weight.copy_((weight / delta._merged_factor - delta.delta_weight().to(weight.dtype)).to(weight.dtype))
    del delta._merged_factor
    delta.unmerge_bias(base_layer)


class DoraLinearDelta(LoraLinearDelta):
    """DoRA on nn.Linear or GPT-2 Conv1D: y = m * (W + s B A) x / ||W + s B A|| + bias.

    The norm is taken per output channel (each row of W as (out_features, in_features)), and the
    trained magnitude lora_magnitude_vector m: (out_features,) starts at that norm, so the adapter
    starts where plain LoRA starts. As in the DoRA paper (section 4.3) and `peft`, the norm is a
    constant for backward: gradients reach m and the direction through B A, not through the norm.
    """

    merge_reads_base_weight = True

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float, init, train_bias: bool):
        super().__init__(base_layer, r, scaling, dropout, init, train_bias)
        remember_base_layer(self, base_layer)
        with torch.no_grad():
            norm = self._direction_norm(base_layer.weight)
        self.lora_magnitude_vector = nn.Parameter(norm.to(base_layer.weight.dtype))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base layer's layout as (out_features, in_features)."""
        return weight.T if self.transposed else weight

    def _direction_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output channel: (out_features,), without gradient."""
        combined = base_weight + self.delta_weight().detach().to(base_weight.dtype)
        return torch.linalg.norm(self._rows(combined), dim=1).detach()

    def forward(self, x, base_output):
        base_layer = self._base_layer
        x = x.to(self.lora_A.dtype)
        factor = self.lora_magnitude_vector / self._direction_norm(base_layer.weight.to(x.dtype))
        if self.training and not isinstance(self.dropout, nn.Identity):
            # As in peft: with dropout the direction W x is recomputed on the dropped-out input, so that
            # the base and low-rank parts of (W + s B A) x see the same x.
            x = self.dropout(x)
            direction = F.linear(x, self._rows(base_layer.weight).to(x.dtype))
        else:
            bias = getattr(base_layer, "bias", None)
            direction = base_output if bias is None else base_output - bias
        change = (factor - 1) * direction + factor * self.update(x)
        output = base_output + change.to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + self.delta_bias
        return output

    def _factor_in_layout(self, factor: torch.Tensor) -> torch.Tensor:
        """The per-output factor (out_features,) shaped to scale the base weight in its own layout."""
        return factor[None, :] if self.transposed else factor[:, None]

    @torch.no_grad()
    def merge(self, base_layer, unmerged_weight=None):
        reference = base_layer.weight if unmerged_weight is None else unmerged_weight
        merge_dora(self, base_layer, self._factor_in_layout(self.lora_magnitude_vector / self._direction_norm(reference)))

    def unmerge(self, base_layer):
        unmerge_dora(self, base_layer)

    def file_tensors(self, base_layer):
        return {**super().file_tensors(base_layer), "lora_magnitude_vector": self.lora_magnitude_vector.detach()}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        super()._assign_file_tensors(tensors, base_layer)
        self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])


class DoraConv2dDelta(LoraConv2dDelta):
    """DoRA on nn.Conv2d: y = conv(x, m * (W + s B A) / ||W + s B A||) + bias.

    The norm is taken per output channel over (in, kh, kw); lora_magnitude_vector m: (out_channels,),
    saved with peft's shape (1, out_channels, 1, 1). The norm is a constant for backward, as for Linear.
    """

    merge_reads_base_weight = True

    def __init__(self, base_layer: nn.Conv2d, r: int, scaling: float, dropout: float, init, train_bias: bool):
        super().__init__(base_layer, r, scaling, dropout, init, train_bias)
        remember_base_layer(self, base_layer)
        self.groups = base_layer.groups
        with torch.no_grad():
            norm = self._direction_norm(base_layer.weight)
        self.lora_magnitude_vector = nn.Parameter(norm.to(base_layer.weight.dtype))

    def _direction_norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output channel: (out_channels,), without gradient."""
        combined = base_weight + self.delta_weight().detach().to(base_weight.dtype)
        return torch.linalg.norm(combined.flatten(1), dim=1).detach()

    def forward(self, x, base_output):
        base_layer = self._base_layer
        x = x.to(self.lora_A.dtype)
        factor = (self.lora_magnitude_vector / self._direction_norm(base_layer.weight.to(x.dtype))).view(1, -1, 1, 1)
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)  # the direction is recomputed on the dropped-out input, as in peft
            direction = F.conv2d(x, base_layer.weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
        else:
            bias = base_layer.bias
            direction = base_output if bias is None else base_output - bias.view(1, -1, 1, 1)
        change = (factor - 1) * direction + factor * self.update(x)
        output = base_output + change.to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + self.delta_bias.view(1, -1, 1, 1)
        return output

    @torch.no_grad()
    def merge(self, base_layer, unmerged_weight=None):
        reference = base_layer.weight if unmerged_weight is None else unmerged_weight
        merge_dora(self, base_layer, (self.lora_magnitude_vector / self._direction_norm(reference)).view(-1, 1, 1, 1))

    def unmerge(self, base_layer):
        unmerge_dora(self, base_layer)

    def file_tensors(self, base_layer):
        magnitude = self.lora_magnitude_vector.detach().view(1, -1, 1, 1)
        return {**super().file_tensors(base_layer), "lora_magnitude_vector": magnitude}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        super()._assign_file_tensors(tensors, base_layer)
        self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"].flatten())
