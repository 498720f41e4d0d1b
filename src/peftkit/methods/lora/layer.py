"""LoRA layers: y = W x + (alpha / r) * B A x on a frozen W, for nn.Linear, GPT-2's Conv1D, nn.Conv2d and
nn.Embedding, with their merge, file tensors (peft's keys) and PiSSA.

PiSSA here keeps the base untouched: the adapter computes s * (B A - B0 A0), where B0 A0 is its
frozen starting point, which is the same function and the same gradients as PiSSA's residual base
W - s B0 A0, but leaves the base shared with other adapters. Saved files hold the equivalent plain
LoRA of rank 2r, [B, -B0] [A; A0], which loads on the original base in peftkit and in `peft`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import WeightDelta, check_shape
from peftkit.methods.lora.kernels import (
    FusedLoraLinear,
    base_weight_rows,
    draw_dropout_seed,
    fusable_call,
    fused_lora_output,
)
from peftkit.targeting import linear_types


@torch.no_grad()
def init_lora_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, init) -> None:
    """LoRA's starting point, in place: lora_A (r, ...) and lora_B (out, r, ...), for init_lora_weights True
    (A kaiming-uniform, B = 0), "gaussian" (A normal with std 1 / r, B = 0) or False (A kaiming-uniform, B
    normal with std 0.02: the model changes at once; for tests). B = 0 makes the adapted model start at the
    base. Every LoRA layer and MixedLoraModel's trainable slots start here."""
    if init is True or init is False:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
    else:
        raise PeftkitError(f"unknown init_lora_weights={init!r}; use True, 'gaussian', 'pissa' or False")
    if init is False:
        nn.init.normal_(lora_B, std=0.02)
    else:
        lora_B.zero_()


class LoraLinearDelta(WeightDelta):
    """LoRA on nn.Linear or GPT-2 Conv1D. lora_A: (r, in_features), lora_B: (out_features, r).

    On a plain nn.Linear or Conv1D (not PiSSA, not a subclass such as DoRA) the whole layer runs as
    `FusedLoraLinear` when this adapter is the only one running on it (`computes_base_output`).
    """

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float, init, train_bias: bool):
        super().__init__()
        weight = base_layer.weight
        # GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in).
        self.transposed = not isinstance(base_layer, nn.Linear)
        in_features, out_features = (weight.shape if self.transposed else weight.shape[::-1])
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=weight.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.add_bias_change(base_layer, train_bias)
        self.pissa = init == "pissa"
        self._initialise(init, weight)
        # Fusing needs the layer's own math (plain Linear or Conv1D, nothing overriding it) and plain LoRA.
        self.fusable = type(self) is LoraLinearDelta and not self.pissa and type(base_layer) in linear_types()
        self.computes_base_output = self.fusable

    @torch.no_grad()
    def _initialise(self, init, weight):
        if init != "pissa":
            init_lora_factors(self.lora_A, self.lora_B, init)
            return
        matrix = (weight.T if self.transposed else weight).float()  # (out, in)
        if self.r > min(matrix.shape):
            raise PeftkitError(f"PiSSA needs r <= min{tuple(matrix.shape)} of the weight, got r={self.r}")
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scaling)
        self.lora_A.copy_(root[:, None] * vh[: self.r])
        self.lora_B.copy_(u[:, : self.r] * root[None, :])
        # The starting point, subtracted so that the adapted model starts exactly at the base.
        self.register_buffer("start_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("start_B", self.lora_B.detach().clone(), persistent=False)

    def forward(self, x, base_output):
        x = self.dropout(x.to(self.lora_A.dtype))
        output = base_output + self.update(x).to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + self.delta_bias
        return output

    def forward_with_base(self, base_layer, x):
        if not fusable_call(base_layer, x, self.lora_A.dtype):
            return None  # the unfused path handles casts, hooks and autocast
        dropout = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        if dropout and torch.compiler.is_compiling():
            # The fused mask comes from a seed read as a Python int and a torch.Generator, which torch.compile
            # cannot trace (three graph breaks per layer); nn.Dropout on the unfused path it compiles, and
            # the compiler then fuses that path itself.
            return None
        seed = draw_dropout_seed() if dropout else 0
        arguments = (x, base_weight_rows(base_layer), base_layer.bias, self.lora_A, self.lora_B, self.delta_bias, self.scaling, dropout, seed)
        if torch.is_grad_enabled():
            return FusedLoraLinear.apply(*arguments)
        return fused_lora_output(*arguments)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A x for x (..., in_features) -> (..., out_features); dropout is the caller's."""
        update = F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)
        if self.pissa:
            update = update - F.linear(F.linear(x, self.start_A) * self.scaling, self.start_B)
        return update

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}" + (", pissa" if self.pissa else "")

    def delta_weight(self) -> torch.Tensor:
        """The full update s * B A in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        if self.pissa:
            delta = delta - (self.start_B @ self.start_A) * self.scaling
        return delta.T if self.transposed else delta

    def file_tensors(self, base_layer):
        if self.pissa:  # the plain rank-2r LoRA with the same update on the original base
            a = torch.cat([self.lora_A, self.start_A])
            b = torch.cat([self.lora_B, -self.start_B], dim=1)
        else:
            a, b = self.lora_A, self.lora_B
        tensors = {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}
        return tensors | self.bias_file_tensors(base_layer)

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        if self.pissa:
            a, start_a = a[: self.r], a[self.r :]
            b, start_b = b[:, : self.r], -b[:, self.r :]
            self.start_A.copy_(start_a)
            self.start_B.copy_(start_b)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.assign_bias_file_tensor(tensors, base_layer)

    def load_file_tensors(self, tensors, base_layer, where):
        expected = self.file_tensors(base_layer)
        for suffix, target in expected.items():
            check_shape(f"{where}.{suffix}", tensors[suffix], target)
        self._assign_file_tensors(tensors, base_layer)


class LoraConv2dDelta(WeightDelta):
    """LoRA on nn.Conv2d: lora_A is a conv with the base kernel (r, in, kh, kw), lora_B a 1x1 conv (out, r, 1, 1)."""

    def __init__(self, base_layer: nn.Conv2d, r: int, scaling: float, dropout: float, init, train_bias: bool):
        super().__init__()
        if base_layer.groups != 1:
            raise PeftkitError(f"LoRA on a grouped Conv2d (groups={base_layer.groups}) is not supported")
        weight = base_layer.weight
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, *weight.shape[1:], dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, 1, 1, dtype=weight.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.stride, self.padding, self.dilation = base_layer.stride, base_layer.padding, base_layer.dilation
        self.padding_mode = base_layer.padding_mode
        self.add_bias_change(base_layer, train_bias)
        if not (init is True or init is False or init == "gaussian"):
            raise PeftkitError(f"init_lora_weights={init!r} is supported on Linear layers only, not Conv2d")
        init_lora_factors(self.lora_A, self.lora_B, init)

    def forward(self, x, base_output):
        x = self.dropout(x.to(self.lora_A.dtype))
        output = base_output + self.update(x).to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + self.delta_bias.view(1, -1, 1, 1)
        return output

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A(x)) for x (batch, in, h, w) -> (batch, out, h', w'); dropout is the caller's."""
        if self.padding_mode != "zeros":
            raise PeftkitError(f"LoRA on Conv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        hidden = F.conv2d(x, self.lora_A, None, self.stride, self.padding, self.dilation)
        return F.conv2d(hidden, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, kernel={tuple(self.lora_A.shape[1:])}"

    def delta_weight(self) -> torch.Tensor:
        """s * B A as a conv kernel (out, in, kh, kw)."""
        out_channels = self.lora_B.shape[0]
        return (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view(out_channels, *self.lora_A.shape[1:]) * self.scaling

    def file_tensors(self, base_layer):
        tensors = {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}
        return tensors | self.bias_file_tensors(base_layer)

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.lora_A.copy_(tensors["lora_A.weight"])
        self.lora_B.copy_(tensors["lora_B.weight"])
        self.assign_bias_file_tensor(tensors, base_layer)


class LoraEmbeddingDelta(WeightDelta):
    """LoRA on nn.Embedding: lora_embedding_A (r, num_embeddings), lora_embedding_B (embedding_dim, r).

    As in `peft`, A starts at zero and B is random, and no dropout is applied to token ids.
    """

    def __init__(self, base_layer: nn.Embedding, r: int, scaling: float, dropout: float, init, train_bias: bool):
        super().__init__()
        if init == "pissa":
            raise PeftkitError("init_lora_weights='pissa' is supported on Linear layers only, not Embedding")
        weight = base_layer.weight
        self.r, self.scaling = r, scaling
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, weight.shape[0], dtype=weight.dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(weight.shape[1], r, dtype=weight.dtype))
        with torch.no_grad():
            nn.init.normal_(self.lora_embedding_B)
            if init is False:
                nn.init.normal_(self.lora_embedding_A, std=0.02)
        self.lookup = dict(
            padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
            scale_grad_by_freq=base_layer.scale_grad_by_freq, sparse=base_layer.sparse,
        )

    def forward(self, x, base_output):
        hidden = F.embedding(x, self.lora_embedding_A.T, **self.lookup)
        return base_output + ((hidden @ self.lora_embedding_B.T) * self.scaling).to(base_output.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, num_embeddings={self.lora_embedding_A.shape[1]}"

    def delta_weight(self) -> torch.Tensor:
        """s * (B A)^T in the embedding table's layout (num_embeddings, embedding_dim)."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def file_tensors(self, base_layer):
        return {"lora_embedding_A": self.lora_embedding_A.detach(), "lora_embedding_B": self.lora_embedding_B.detach()}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.lora_embedding_A.copy_(tensors["lora_embedding_A"])
        self.lora_embedding_B.copy_(tensors["lora_embedding_B"])


def set_lora_fused(model: nn.Module, enabled: bool = True) -> int:
    """Turn the fused LoRA layer (`FusedLoraLinear`, on by default) on or off for every LoRA layer of
    `model` that can use it; returns how many layers can. Off, each layer runs the base layer, then
    the low-rank path as separate autograd operations (the reference computation)."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinearDelta) and module.fusable:
            module.computes_base_output = enabled
            count += 1
    return count
