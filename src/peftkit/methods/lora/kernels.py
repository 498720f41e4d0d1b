"""LoRA's shared math: the fused linear kernel (forward and backward on rows), the rule for when merging
pays, the dropout mask the fused path regenerates, and per-module rank / scale helpers.

The single-adapter fused layer (`FusedLoraLinear`) and the mixed-batch run kernel
(`peftkit.methods.lora.mixed_batch.LoraRuns`) both call `lora_linear_forward` and
`lora_linear_backward`, so the fused math exists once. Shapes: N rows, `in` and `out` features, rank r;
`weight_rows` W is the frozen weight as (out, in) (a transposed view for GPT-2's Conv1D).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn


def pattern_value(module_name: str, patterns: dict, default):
    """The value of the first pattern (a regex) that matches the end of `module_name` (peft's rule for
    rank_pattern / alpha_pattern), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """The LoRA scale s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
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


def merged_rows(weight_rows: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s B A: weight_rows (out, in), lora_A (r, in), lora_B (out, r) -> (out, in)."""
    return torch.addmm(weight_rows, lora_B, lora_A, alpha=scaling)


def merging_pays(rows: int, in_features: int, out_features: int) -> bool:
    """Whether N = `rows` rows run faster through the merged weight W + s B A than through W plus the
    separate low-rank path.

    W + s B A costs an (out, in) pass, the low-rank path an (N, out) one (plus N (in + out) r multiply-adds):
    merge when the batch has more rows than the weight has, roughly.
    """
    return rows * (in_features + out_features) >= in_features * out_features


def base_weight_rows(base_layer: nn.Module) -> torch.Tensor:
    """The frozen weight of an nn.Linear or GPT-2 Conv1D as (out, in) (a view for Conv1D, which stores (in, out))."""
    weight = base_layer.weight
    return weight if isinstance(base_layer, nn.Linear) else weight.T


def fusable_call(base_layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a fused kernel may compute `base_layer`'s output for input x with LoRA factors of `dtype`:
    no cast (x, the frozen weight and the factors share one dtype), no hooks or patched forward on the
    base layer, no autocast. The unfused path handles everything else. The caller checks the layer's type."""
    return not (x.dtype != dtype or base_layer.weight.dtype != dtype or base_layer._forward_hooks
                or base_layer._forward_pre_hooks or "forward" in base_layer.__dict__
                # A meta tensor (peftkit.estimate's weightless forward) has no autocast state: the path is the CPU one.
                or (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)))


def lora_linear_forward(x_rows: torch.Tensor, weight_rows: torch.Tensor | None, bias: torch.Tensor | None,
                        lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, keep: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b + s * ((x * keep) A^T) B^T for rows: x_rows (N, in) -> (N, out).

    weight_rows W: (out, in), or None: then `out` (N, out) already holds the base rows and only the
    low-rank update is added to it. bias: (out,) or None. lora_A: (r, in); lora_B: (out, r). keep: the
    dropout keep mask (N, in) applied to the low-rank input only (fold 1 / keep probability into s), or
    None. out: (N, out) to write into, or None for a new tensor. Without dropout, when merging pays, one
    matmul with W + s B A. The rank-r product is taken as (r, N), the fast layout on CPU.
    """
    if weight_rows is not None:
        out_features, in_features = weight_rows.shape
        if keep is None and merging_pays(x_rows.shape[0], in_features, out_features):
            return linear_rows(x_rows, merged_rows(weight_rows, lora_A, lora_B, scaling), bias, out)
        out = linear_rows(x_rows, weight_rows, bias, out)
    lora_input = x_rows if keep is None else x_rows * keep
    hidden_t = torch.mm(lora_A, lora_input.t())  # (r, N)
    return out.addmm_(hidden_t.t(), lora_B.t(), alpha=scaling)


def linear_rows(x_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for x_rows (N, in), weight (out, in), bias (out,) or None -> (N, out), into `out` when given."""
    if out is None:
        return F.linear(x_rows, weight, bias)
    if bias is None:
        return torch.mm(x_rows, weight.t(), out=out)
    return torch.addmm(bias, x_rows, weight.t(), out=out)


def lora_linear_backward(grad_rows: torch.Tensor, x_rows: torch.Tensor, weight_rows: torch.Tensor | None,
                         lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, keep: torch.Tensor | None = None,
                         needs_x: bool = True, needs_A: bool = True, needs_B: bool = True,
                         grad_x: torch.Tensor | None = None, grad_A: torch.Tensor | None = None,
                         grad_B: torch.Tensor | None = None):
    """Gradients of `lora_linear_forward` (same arguments) for grad_rows (N, out): (grad_x, grad_A, grad_B).

    grad_x (N, in): written into the buffer when one is given (with weight_rows None, the low-rank part is
    added to it instead: the base path's gradient is the caller's), else a new tensor. grad_A (r, in) and
    grad_B (out, r): added into the buffers when given (a slot shared by several runs), else new tensors.
    An entry is None where not needed. Never a gradient for W or b.

    The rank-r products are taken with r as the leading dimension ((r, N) results): on CPU, MKL is up to
    25x slower for the (N, r) forms autograd's own linear backward uses (g^T h, g B).
    """
    rows = grad_rows.shape[0]
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    merged = (needs_x and keep is None and weight_rows is not None
              and merging_pays(rows, in_features, out_features))
    # d loss / d(dropped x A^T), transposed: (r, N)
    grad_hidden_t = torch.mm(lora_B.t(), grad_rows.t()).mul_(scaling) if (needs_x and not merged) or needs_A else None
    if needs_x:
        if merged:
            grad_x = torch.mm(grad_rows, merged_rows(weight_rows, lora_A, lora_B, scaling), out=grad_x)
        elif keep is None and grad_x is not None:
            if weight_rows is not None:
                torch.mm(grad_rows, weight_rows, out=grad_x)
            grad_x.addmm_(grad_hidden_t.t(), lora_A)
        else:
            low_rank = torch.mm(grad_hidden_t.t(), lora_A)  # (N, in)
            if keep is not None:
                low_rank.mul_(keep)
            if weight_rows is not None:
                low_rank.addmm_(grad_rows, weight_rows)
            if grad_x is None:
                grad_x = low_rank
            elif weight_rows is None:
                grad_x.add_(low_rank)
            else:
                grad_x.copy_(low_rank)
    else:
        grad_x = None
    dropped = x_rows if keep is None or not (needs_A or needs_B) else x_rows * keep
    if needs_A:
        grad_A = torch.mm(grad_hidden_t, dropped) if grad_A is None else grad_A.addmm_(grad_hidden_t, dropped)
    else:
        grad_A = None
    if needs_B:
        hidden_t = torch.mm(lora_A, dropped.t())  # (r, N), recomputed rather than saved
        if grad_B is None:
            grad_B = torch.mm(hidden_t, grad_rows).mul_(scaling).t().contiguous()
        else:
            grad_B.add_(torch.mm(hidden_t, grad_rows).t(), alpha=scaling)
    else:
        grad_B = None
    return grad_x, grad_A, grad_B


class FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T as one autograd node.

    x: (..., in), weight_rows W: (out, in) (a view for GPT-2 Conv1D), bias b: (out,) or None, lora_A
    A: (r, in), lora_B B: (out, r), delta_bias: (out,) or None (trained bias change). Without dropout the
    output and the input gradient use the merged weight W + s B A (one matmul each) when merging pays;
    with dropout p the keep mask is drawn from `seed` in forward and drawn again in backward. Saved for
    backward: x and the weights only. Gradients: x (when it needs one), A, B, delta_bias; never W or b.
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
        out_features, in_features = weight_rows.shape
        grad_rows = grad_output.reshape(-1, out_features)
        x_rows = x.reshape(-1, in_features)
        scaling, keep = ctx.scaling, None
        if ctx.dropout:
            # Inverted dropout's 1 / keep factor is folded into s, so it multiplies (r, N) tensors only.
            scaling = scaling / lora_dropout_keep_probability(ctx.dropout)
            keep = lora_dropout_keep_mask(x_rows, ctx.dropout, ctx.seed)
        grad_x, grad_A, grad_B = lora_linear_backward(
            grad_rows, x_rows, weight_rows, lora_A, lora_B, scaling, keep,
            needs_x=ctx.needs_input_grad[0], needs_A=ctx.needs_input_grad[3], needs_B=ctx.needs_input_grad[4])
        grad_delta_bias = grad_rows.sum(0) if ctx.has_delta_bias and ctx.needs_input_grad[5] else None
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_A, grad_B, grad_delta_bias, None, None, None


def fused_lora_output(x, weight_rows, bias, lora_A, lora_B, delta_bias, scaling: float, dropout: float, seed: int):
    """The forward of `FusedLoraLinear` without autograd (also the no-grad path): (..., in) -> (..., out)."""
    if delta_bias is not None:
        bias = bias + delta_bias
    out_features, in_features = weight_rows.shape
    x_rows = x.reshape(-1, in_features)
    keep = None
    if dropout:
        keep = lora_dropout_keep_mask(x_rows, dropout, seed)
        scaling = scaling / lora_dropout_keep_probability(dropout)
    output = lora_linear_forward(x_rows, weight_rows, bias, lora_A, lora_B, scaling, keep)
    return output.view(*x.shape[:-1], out_features)
