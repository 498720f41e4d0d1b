"""LoRA: a frozen weight W plus a trained low-rank update, y = W x + (alpha / r) * B A x.

Layers for nn.Linear, transformers' GPT-2 Conv1D, nn.Conv2d and nn.Embedding. Options follow
Hugging Face `peft` (`LoraConfig`): rank and alpha per module by pattern, rsLoRA scaling
alpha / sqrt(r), dropout on the LoRA input, trained biases, and initialisation with B = 0 (default),
gaussian A, or PiSSA (A and B from the principal singular vectors of W).

PiSSA here keeps the base untouched: the adapter computes s * (B A - B0 A0), where B0 A0 is its
frozen starting point, which is the same function and the same gradients as PiSSA's residual base
W - s B0 A0, but leaves the base shared with other adapters. Saved files hold the equivalent plain
LoRA of rank 2r, [B, -B0] [A; A0], which loads on the original base in peftkit and in `peft`.

Training on nn.Linear and GPT-2 Conv1D is fused by default (`FusedLoraLinear`): one autograd
function computes the frozen matmul and the low-rank path together, keeps no dropout mask (it is
regenerated in backward from a seed) and computes no gradient for the frozen weight. It runs when the
LoRA adapter is the only unmerged one active on the layer; `set_lora_fused(model, False)` opts out.

DoRA (`use_dora=True`, Liu et al., 2024) splits the adapted weight into a trained magnitude per
output channel and a direction: W' = m * (W + s B A) / ||W + s B A||, with the norm treated as a
constant in backward. Its math, dropout handling and file keys (`lora_magnitude_vector`) follow
`peft`; DoRA on an embedding layer is refused at wrap time.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdapterDelta, BiasDelta, attach_delta, check_shape, iter_base_modules, shadow_parameter
from peftkit.targeting import find_targets, linear_types, name_matches


@register_config
@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation. Field names and meanings are those of Hugging Face `peft.LoraConfig`.

    r: rank of the update. lora_alpha: scale numerator (scale = alpha / r, or alpha / sqrt(r) with
    use_rslora). target_modules: names, a regex, or "all-linear". rank_pattern / alpha_pattern: per
    module overrides, keys are regexes matched against the end of the module path. bias: "none",
    "all" (train every bias) or "lora_only" (biases of adapted modules). init_lora_weights: True (B=0,
    A kaiming-uniform), "gaussian" (B=0, A normal), "pissa" (principal singular vectors), or False
    (random A and B; only for tests: the model changes at once). use_dora: weight-decomposed LoRA
    (DoRA) on Linear, GPT-2 Conv1D and Conv2d layers, W' = m * (W + s B A) / ||W + s B A|| with a
    trained magnitude m per output channel.
    """

    peft_type = "LORA"
    peft_neutral_fields = {
        "lora_bias": False, "layer_replication": None, "loftq_config": {},
        "megatron_config": None, "megatron_core": "megatron.core", "use_qalora": False,
        "qalora_group_size": 16, "target_parameters": None, "trainable_token_indices": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | Literal["gaussian", "pissa"] = True
    fan_in_fan_out: bool = False
    use_dora: bool = False

    def validate(self):
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)
        super().validate()
        if self.r <= 0:
            raise PeftkitError(f"LoraConfig.r must be a positive integer (the rank), got {self.r}")
        for pattern, rank in self.rank_pattern.items():
            if rank <= 0:
                raise PeftkitError(f"LoraConfig.rank_pattern[{pattern!r}] must be positive, got {rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftkitError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_rslora and self.init_lora_weights == "pissa":
            pass  # allowed: the scale enters the PiSSA split exactly as in peft


def _pattern_value(module_name: str, patterns: dict, default):
    """The value of the first pattern that matches the end of `module_name` (peft's rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_dropout_keep_mask(like: torch.Tensor, dropout: float, seed: int) -> torch.Tensor:
    """The keep mask (bool, shape of `like`) that fused LoRA dropout draws from `seed`.

    Forward and backward both call this, so the mask is regenerated rather than stored. Each element
    reads 16 random bits (four per 64-bit draw of a generator seeded with `seed`, on `like`'s device),
    which is an order of magnitude faster on CPU than `bernoulli_`; the dropout probability is
    therefore rounded to a multiple of 2^-16 (`lora_dropout_keep_probability`).
    """
    count = like.numel()
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator)  # every 64-bit pattern equally likely
    lanes = words.view(torch.int16)[:count]
    return (lanes >= -(2**15) + round(dropout * 2**16)).view(like.shape)


def lora_dropout_keep_probability(dropout: float) -> float:
    """The exact probability that `lora_dropout_keep_mask` keeps an element: 1 - p rounded to 2^-16."""
    return 1.0 - round(dropout * 2**16) / 2**16


def draw_dropout_seed() -> int:
    """A seed for one fused dropout mask, drawn from torch's global CPU generator: a seeded run repeats
    its masks, and gradient checkpointing (which restores that generator) recomputes the same ones."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


def _merged_rows(weight_rows: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s B A as (out_features, in_features)."""
    return torch.addmm(weight_rows, lora_B, lora_A, alpha=scaling)


def _merge_pays(rows: int, in_features: int, out_features: int) -> bool:
    # W + s B A costs an (out, in) pass, the separate low-rank path an (N, out) one (plus N (in + out) r
    # multiply-adds): merge when the batch has more rows than the weight has, roughly.
    return rows * (in_features + out_features) >= in_features * out_features


class FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T as one autograd node.

    x: (..., in), weight_rows W: (out, in) (a view for GPT-2 Conv1D), bias b: (out,) or None, lora_A
    A: (r, in), lora_B B: (out, r), delta_bias: (out,) or None (trained bias change). Without dropout the
    output and the input gradient use the merged weight W + s B A (one matmul each); with dropout p the
    keep mask is drawn from `seed` in forward and drawn again in backward. Saved for backward: x and the
    weights only. Gradients: x (when it needs one), A, B, delta_bias; never W or b.
    """

    @staticmethod
    def forward(ctx, x, weight_rows, bias, lora_A, lora_B, delta_bias, scaling: float, dropout: float, seed: int):
        ctx.save_for_backward(x, weight_rows, lora_A, lora_B)
        ctx.scaling, ctx.dropout, ctx.seed = scaling, dropout, seed
        ctx.has_delta_bias = delta_bias is not None
        return fused_lora_output(x, weight_rows, bias, lora_A, lora_B, delta_bias, scaling, dropout, seed)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight_rows, lora_A, lora_B = ctx.saved_tensors
        scaling, dropout = ctx.scaling, ctx.dropout
        out_features, in_features = weight_rows.shape
        grad_rows = grad_output.reshape(-1, out_features)
        x_rows = x.reshape(-1, in_features)
        needs_x, needs_A, needs_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_x = grad_A = grad_B = grad_delta_bias = None
        if dropout:
            # Inverted dropout's 1 / keep factor is folded into s, so it multiplies (r, N) tensors only.
            scaling = scaling / lora_dropout_keep_probability(dropout)
        # The rank-r products are taken with r as the leading dimension ((r, N) results): on CPU, MKL is
        # up to 25x slower for the (N, r) forms autograd's own linear backward uses (g^T h, g B).
        # d loss / d(dropped x A^T), transposed: (r, N)
        grad_hidden_t = torch.mm(lora_B.t(), grad_rows.t()).mul_(scaling) if needs_x or needs_A else None
        if not dropout:
            dropped = x_rows
            if needs_x:
                if _merge_pays(x_rows.shape[0], in_features, out_features):
                    grad_x = torch.mm(grad_rows, _merged_rows(weight_rows, lora_A, lora_B, scaling))
                else:
                    grad_x = torch.mm(grad_hidden_t.t(), lora_A).addmm_(grad_rows, weight_rows)
        else:
            keep = lora_dropout_keep_mask(x_rows, dropout, ctx.seed)
            if needs_x:
                grad_x = torch.mm(grad_hidden_t.t(), lora_A).mul_(keep).addmm_(grad_rows, weight_rows)
            dropped = x_rows * keep if needs_A or needs_B else None
        if needs_A:
            grad_A = torch.mm(grad_hidden_t, dropped)
        if needs_B:
            hidden_t = torch.mm(lora_A, dropped.t())  # (r, N), recomputed rather than saved
            grad_B = torch.mm(hidden_t, grad_rows).mul_(scaling).t().contiguous()
        if ctx.has_delta_bias and ctx.needs_input_grad[5]:
            grad_delta_bias = grad_rows.sum(0)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_A, grad_B, grad_delta_bias, None, None, None


def fused_lora_output(x, weight_rows, bias, lora_A, lora_B, delta_bias, scaling: float, dropout: float, seed: int):
    """The forward of `FusedLoraLinear` without autograd (also the no-grad path): (..., in) -> (..., out)."""
    if delta_bias is not None:
        bias = bias + delta_bias
    out_features, in_features = weight_rows.shape
    x_rows = x.reshape(-1, in_features)
    if not dropout and _merge_pays(x_rows.shape[0], in_features, out_features):
        return F.linear(x, _merged_rows(weight_rows, lora_A, lora_B, scaling), bias)
    output = F.linear(x, weight_rows, bias)
    if dropout:
        x_rows = x_rows * lora_dropout_keep_mask(x_rows, dropout, seed)
        scaling = scaling / lora_dropout_keep_probability(dropout)
    hidden_t = torch.mm(lora_A, x_rows.t())  # (r, N): the fast layout, as in backward
    output.view(-1, out_features).addmm_(hidden_t.t(), lora_B.t(), alpha=scaling)
    return output


class LoraLinearDelta(AdapterDelta):
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
        self.delta_bias = None
        if train_bias and getattr(base_layer, "bias", None) is not None:
            self.delta_bias = shadow_parameter(torch.zeros_like(base_layer.bias))
        self.pissa = init == "pissa"
        self._initialise(init, weight)
        # Fusing needs the layer's own math (plain Linear or Conv1D, nothing overriding it) and plain LoRA.
        self.fusable = type(self) is LoraLinearDelta and not self.pissa and type(base_layer) in linear_types()
        self.computes_base_output = self.fusable

    @torch.no_grad()
    def _initialise(self, init, weight):
        if init is True:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        elif init is False:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.normal_(self.lora_B, std=0.02)
        elif init == "pissa":
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
        else:
            raise PeftkitError(f"unknown init_lora_weights={init!r}; use True, 'gaussian', 'pissa' or False")

    def forward(self, x, base_output):
        x = self.dropout(x.to(self.lora_A.dtype))
        output = base_output + self.update(x).to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + self.delta_bias
        return output

    def forward_with_base(self, base_layer, x):
        weight = base_layer.weight
        dtype = self.lora_A.dtype
        if (x.dtype != dtype or weight.dtype != dtype or base_layer._forward_hooks or base_layer._forward_pre_hooks
                or "forward" in base_layer.__dict__ or torch.is_autocast_enabled(x.device.type)):
            return None  # the unfused path handles casts, hooks and autocast
        weight_rows = weight.T if self.transposed else weight
        dropout = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        if dropout and torch.compiler.is_compiling():
            # The fused mask comes from a seed read as a Python int and a torch.Generator, which torch.compile
            # cannot trace (three graph breaks per layer); nn.Dropout on the unfused path it compiles, and
            # the compiler then fuses that path itself.
            return None
        seed = draw_dropout_seed() if dropout else 0
        arguments = (x, weight_rows, base_layer.bias, self.lora_A, self.lora_B, self.delta_bias, self.scaling, dropout, seed)
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

    @torch.no_grad()
    def merge(self, base_layer):
        base_layer.weight.add_(self.delta_weight().to(base_layer.weight.dtype))
        if self.delta_bias is not None:
            base_layer.bias.add_(self.delta_bias.to(base_layer.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer):
        base_layer.weight.sub_(self.delta_weight().to(base_layer.weight.dtype))
        if self.delta_bias is not None:
            base_layer.bias.sub_(self.delta_bias.to(base_layer.bias.dtype))

    def file_tensors(self, base_layer):
        if self.pissa:  # the plain rank-2r LoRA with the same update on the original base
            a = torch.cat([self.lora_A, self.start_A])
            b = torch.cat([self.lora_B, -self.start_B], dim=1)
        else:
            a, b = self.lora_A, self.lora_B
        tensors = {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}
        if self.delta_bias is not None:
            tensors["base_layer.bias"] = (base_layer.bias + self.delta_bias).detach()
        return tensors

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
        if self.delta_bias is not None:
            self.delta_bias.copy_(tensors["base_layer.bias"].to(self.delta_bias) - base_layer.bias)

    def load_file_tensors(self, tensors, base_layer, where):
        expected = self.file_tensors(base_layer)
        for suffix, target in expected.items():
            check_shape(f"{where}.{suffix}", tensors[suffix], target)
        self._assign_file_tensors(tensors, base_layer)


class LoraConv2dDelta(AdapterDelta):
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
        self.delta_bias = None
        if train_bias and base_layer.bias is not None:
            self.delta_bias = shadow_parameter(torch.zeros_like(base_layer.bias))
        with torch.no_grad():
            if init is True or init is False:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / r)
            else:
                raise PeftkitError(f"init_lora_weights={init!r} is supported on Linear layers only, not Conv2d")
            if init is False:
                nn.init.normal_(self.lora_B, std=0.02)

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

    @torch.no_grad()
    def merge(self, base_layer):
        base_layer.weight.add_(self.delta_weight().to(base_layer.weight.dtype))
        if self.delta_bias is not None:
            base_layer.bias.add_(self.delta_bias)

    @torch.no_grad()
    def unmerge(self, base_layer):
        base_layer.weight.sub_(self.delta_weight().to(base_layer.weight.dtype))
        if self.delta_bias is not None:
            base_layer.bias.sub_(self.delta_bias)

    def file_tensors(self, base_layer):
        tensors = {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}
        if self.delta_bias is not None:
            tensors["base_layer.bias"] = (base_layer.bias + self.delta_bias).detach()
        return tensors

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.lora_A.copy_(tensors["lora_A.weight"])
        self.lora_B.copy_(tensors["lora_B.weight"])
        if self.delta_bias is not None:
            self.delta_bias.copy_(tensors["base_layer.bias"] - base_layer.bias)


class LoraEmbeddingDelta(AdapterDelta):
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

    @torch.no_grad()
    def merge(self, base_layer):
        base_layer.weight.add_(self.delta_weight().to(base_layer.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer):
        base_layer.weight.sub_(self.delta_weight().to(base_layer.weight.dtype))

    def file_tensors(self, base_layer):
        return {"lora_embedding_A": self.lora_embedding_A.detach(), "lora_embedding_B": self.lora_embedding_B.detach()}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        self.lora_embedding_A.copy_(tensors["lora_embedding_A"])
        self.lora_embedding_B.copy_(tensors["lora_embedding_B"])


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
        _remember_base_layer(self, base_layer)
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
        weight = base_layer.weight
        reference = weight if unmerged_weight is None else unmerged_weight
        factor = self.lora_magnitude_vector / self._direction_norm(reference)
        # Kept for unmerge: the norm depends on the weight before merging, which is gone afterwards.
        self._merged_factor = self._factor_in_layout(factor)
        delta = self.delta_weight().to(weight.dtype)
        weight.copy_((self._merged_factor * (weight + delta)).to(weight.dtype))
        if self.delta_bias is not None:
            base_layer.bias.add_(self.delta_bias.to(base_layer.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base_layer):
        weight = base_layer.weight
        weight.copy_((weight / self._merged_factor - self.delta_weight().to(weight.dtype)).to(weight.dtype))
        del self._merged_factor
        if self.delta_bias is not None:
            base_layer.bias.sub_(self.delta_bias.to(base_layer.bias.dtype))

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
        _remember_base_layer(self, base_layer)
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
        weight = base_layer.weight
        reference = weight if unmerged_weight is None else unmerged_weight
        # Kept for unmerge: the norm depends on the weight before merging, which is gone afterwards.
        self._merged_factor = (self.lora_magnitude_vector / self._direction_norm(reference)).view(-1, 1, 1, 1)
        delta = self.delta_weight().to(weight.dtype)
        weight.copy_((self._merged_factor * (weight + delta)).to(weight.dtype))
        if self.delta_bias is not None:
            base_layer.bias.add_(self.delta_bias)

    @torch.no_grad()
    def unmerge(self, base_layer):
        weight = base_layer.weight
        weight.copy_((weight / self._merged_factor - self.delta_weight().to(weight.dtype)).to(weight.dtype))
        del self._merged_factor
        if self.delta_bias is not None:
            base_layer.bias.sub_(self.delta_bias)

    def file_tensors(self, base_layer):
        magnitude = self.lora_magnitude_vector.detach().view(1, -1, 1, 1)
        return {**super().file_tensors(base_layer), "lora_magnitude_vector": magnitude}

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        super()._assign_file_tensors(tensors, base_layer)
        self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"].flatten())


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


def _remember_base_layer(delta: AdapterDelta, base_layer: nn.Module) -> None:
    # DoRA's forward reads the base weight (for its norm). A plain attribute, not a submodule: the base
    # layer's weights must not be listed, counted or saved as the adapter's own.
    object.__setattr__(delta, "_base_layer", base_layer)


def _delta_class(base_layer: nn.Module, use_dora: bool = False):
    if isinstance(base_layer, linear_types()):
        return DoraLinearDelta if use_dora else LoraLinearDelta
    if isinstance(base_layer, nn.Conv2d):
        return DoraConv2dDelta if use_dora else LoraConv2dDelta
    if isinstance(base_layer, nn.Embedding) and not use_dora:
        return LoraEmbeddingDelta
    return None


def _refuse_dora_on_embeddings(model: nn.Module, targets: list[str]) -> None:
    # peft's DoRA on an embedding normalises each embedding dimension over the whole vocabulary and
    # rescales the output of any adapter that ran before it; peftkit leaves that variant out.
    modules = dict(iter_base_modules(model))
    embeddings = [name for name in targets if isinstance(modules[name], nn.Embedding)]
    if embeddings:
        raise PeftkitError(
            f"use_dora=True cannot adapt {embeddings[0]!r} (an Embedding"
            + (f", as are {embeddings[1:]}" if len(embeddings) > 1 else "")
            + "): DoRA in peftkit supports Linear, GPT-2 Conv1D and Conv2d layers. Leave the embedding out of "
            "target_modules (or exclude_modules it), or use plain LoRA (use_dora=False) for it in a second adapter."
        )


def supported_types() -> tuple[type, ...]:
    return (*linear_types(), nn.Conv2d, nn.Embedding)


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, skip: list[str]) -> list[str]:
    """Attach LoRA adapter `adapter_name` to the modules `config` selects; returns their paths."""
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        supported_types=supported_types(), task_type=config.task_type, skip=skip,
    )
    if config.use_dora:
        _refuse_dora_on_embeddings(model, targets)
    for name in targets:
        r = _pattern_value(name, config.rank_pattern, config.r)
        alpha = _pattern_value(name, config.alpha_pattern, config.lora_alpha)
        scaling = lora_scaling(alpha, r, config.use_rslora)

        def make(base_layer, r=r, scaling=scaling):
            return _delta_class(base_layer, config.use_dora)(
                base_layer, r, scaling, config.lora_dropout, config.init_lora_weights, config.bias != "none"
            )

        attach_delta(model, name, adapter_name, make)

    if config.bias == "all":
        # Every other bias of the model trains too, as in peft (LayerNorm biases included).
        covered = set(targets)
        for name, module in list(iter_base_modules(model)):
            if not name or name in covered or any(name_matches(name, [s]) or name.startswith(s + ".") for s in skip):
                continue
            if isinstance(module.__dict__.get("_parameters", {}).get("bias"), nn.Parameter):
                attach_delta(model, name, adapter_name, BiasDelta)
    return targets


def export_config(config: LoraConfig) -> LoraConfig:
    """The config to write next to the saved tensors (PiSSA is saved as the equivalent plain LoRA)."""
    if config.init_lora_weights != "pissa":
        return config
    factor = math.sqrt(2) if config.use_rslora else 2  # keeps alpha / r (or alpha / sqrt r) unchanged
    return config.replace(
        r=2 * config.r, lora_alpha=config.lora_alpha * factor, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )

# How `peftkit train` trains it (peftkit.registry collects this). r=8 on every linear layer (attention and
# feed-forward) reaches 87.5% on sst2 in the default 2 epochs, where query,value alone stays near 86.5% even
# in 3. No LoRA dropout: on CPU it costs about a third of the step time, for a difference within noise
# (benchmarks/default_job.py). On a causal LM: r=16 on every attention and MLP projection ("all-linear"
# leaves the LM head out).
METHODS = (
    Method("lora", LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"), learning_rate=1e-3,
           causal_defaults=dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"), causal_learning_rate=5e-4),
    Method("dora", LoraConfig, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", use_dora=True),
           learning_rate=1e-3, causal_defaults=dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                    use_dora=True), causal_learning_rate=5e-4),
)
