"""LoKr: the weight update is the Kronecker product of two small matrices.

Delta W = alpha / r * kron(w1, w2)   (Edalati et al., KronA, 2022; LyCORIS)

The output and input sizes are each split into two factors, out = a * b and in = c * d, exactly as
Hugging Face `peft`'s `factorization` does (so shapes match peft's files): w1 is (a, c), w2 is
(b, d) (times the kernel for a convolution). Either factor is stored whole (lokr_w1, lokr_w2) or as
a rank-r product (lokr_w1_a @ lokr_w1_b, lokr_w2_a @ lokr_w2_b), by peft's rule: w2 is low-rank when
r < max(b, d) / 2, w1 only with decompose_both and r < max(a, c) / 2. As in peft (unlike the LyCORIS
repository), the scale is alpha / r even when both factors are stored whole.

On a Linear layer the update is applied without building Delta W: with x viewed as X (c, d),
kron(w1, w2) x = vec(w1 X w2^T), two small matrix products.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods import lycoris


@register_config
@dataclasses.dataclass
class LoKrConfig(PeftConfig):
    """Low-rank Kronecker product. Field names and meanings are those of Hugging Face `peft.LoKrConfig`.

    r: rank of the factors stored as low-rank products. alpha: scale numerator (scale = alpha / r).
    rank_dropout: in training, the probability of dropping each output row of the update;
    rank_dropout_scale: rescale the kept rows by 1 / their share. module_dropout: in training, the
    probability of skipping the whole update for a forward. use_effective_conv2d: for convolutions
    with a kernel larger than 1 and a low-rank w2, factor w2's kernel with a core (r, r, *kernel).
    decompose_both: store w1 as a rank-r product too (when r is small enough). decompose_factor: -1
    splits each size into two factors near its square root; a positive f gives (f, size / f) when f
    divides the size, else the closest split with the smaller factor at most f. init_weights: True
    (w1 = 0: the adapter starts at the base), "lycoris" (w2 = 0, as the LyCORIS repository), or False
    (all random; for tests).
    """

    peft_type = "LOKR"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | Literal["lycoris"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def validate(self):
        lycoris.module_sets_to_lists(self)
        super().validate()
        lycoris.validate_common(self)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise PeftkitError(
                f"LoKrConfig.decompose_factor must be -1 (split sizes near their square root) or a positive "
                f"integer (the preferred smaller factor), got {self.decompose_factor}"
            )


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m * n = dimension, with the same result as peft's `factorization`.

    factor > 0 dividing `dimension`: (factor, dimension / factor), in that order. Otherwise walk up
    the divisors m of `dimension`, stopping before one exceeds `factor` (no bound for -1), until m
    reaches dimension / m; return the pair sorted. With no bound this is the split nearest the
    square root: 384 -> (16, 24), 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    while m < dimension // m:
        next_divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if next_divisor > bound:
            break
        m = next_divisor
    n = dimension // m
    return min(m, n), max(m, n)


class LokrDelta(lycoris.LycorisDelta):
    """LoKr on nn.Linear, nn.Conv1d or nn.Conv2d, with out = a * b and in / groups = c * d.

    w1 (a, c): lokr_w1, or lokr_w1_a (a, r) @ lokr_w1_b (r, c).
    w2: lokr_w2 (b, d, *kernel); or the effective-convolution form lokr_t2 (r, r, kh, kw) with
    lokr_w2_a (r, b), lokr_w2_b (r, d); or lokr_w2_a (b, r) @ lokr_w2_b (r, d * kernel size).
    Delta W = alpha / r * kron(w1, w2), reshaped to the base weight's shape.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, config: LoKrConfig):
        super().__init__(base_layer, r, alpha, config.rank_dropout, config.module_dropout)
        self.rescale_rank_dropout = config.rank_dropout_scale
        out_features, in_per_group, *kernel = self.weight_shape
        dtype = base_layer.weight.dtype
        a, b = factorization(out_features, config.decompose_factor)
        c, d = factorization(in_per_group, config.decompose_factor)
        self.out_split, self.in_split = (a, b), (c, d)
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = not (r < max(b, d) / 2)
        # A 1x1 kernel has nothing to factor: peft uses the plain form there, and so do we.
        self.effective_conv = bool(config.use_effective_conv2d and self.is_conv and math.prod(kernel) != 1 and not full_w2)

        def parameter(*shape):
            return nn.Parameter(torch.empty(shape, dtype=dtype))

        if full_w1:
            self.lokr_w1 = parameter(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = parameter(a, r), parameter(r, c)
        if full_w2:
            self.lokr_w2 = parameter(b, d, *kernel)
        elif self.effective_conv:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            self.lokr_t2 = parameter(*core)
            self.lokr_w2_a, self.lokr_w2_b = parameter(r, b), parameter(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = parameter(b, r), parameter(r, d * math.prod(kernel))
        self._initialise(config.init_weights)

    @torch.no_grad()
    def _initialise(self, init_weights) -> None:
        for parameter in self._parameters.values():
            lycoris.kaiming_uniform(parameter)
        # One zero factor makes the product zero: w1 (or its first half) by default, w2 as in LyCORIS.
        if init_weights is True:
            (self.lokr_w1 if "lokr_w1" in self._parameters else self.lokr_w1_a).zero_()
        elif init_weights == "lycoris":
            (self.lokr_w2 if "lokr_w2" in self._parameters else self.lokr_w2_b).zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """w1 (a, c) and w2: (b, d) for Linear, (b, d * kernel size) or (b, d, *kernel) for convolutions."""
        p = self._parameters
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = torch.einsum("pqkl,pb,qd->bdkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        if w2.dim() == 4:  # a kernel-shaped w2: w1 acts on the channel dimensions only
            w1 = w1[:, :, None, None]
        # torch.kron views its operands; the effective form's einsum can return size-1 dimensions with
        # strides it cannot view (Conv1d with r=1, where peft's own forward fails), so lay w2 out afresh.
        w2 = w2.clone(memory_format=torch.contiguous_format)
        return (torch.kron(w1, w2) * self.scaling).reshape(self.weight_shape)

    def linear_update(self, x):
        w1, w2 = self.factors()
        (a, b), (c, d) = self.out_split, self.in_split
        # x as X (c, d): kron(w1, w2) x = vec(w1 X w2^T); never builds the (out, in) update.
        # Two plain 2-D products: a broadcast matmul would pick its kernel by requires_grad, so a
        # trainable and a loaded adapter would differ in the last bit.
        lead = x.shape[:-1]
        hidden = x.reshape(-1, d) @ (w2.T * self.scaling)  # (tokens * c, b)
        hidden = hidden.view(-1, c, b).transpose(1, 2).reshape(-1, c)  # (tokens * b, c)
        out = (hidden @ w1.T).view(-1, b, a).transpose(1, 2)  # (tokens, a, b)
        return out.reshape(*lead, a * b)


def add_adapter(model: nn.Module, config: LoKrConfig, adapter_name: str, skip: list[str]) -> list[str]:
    """Attach LoKr adapter `adapter_name` to the modules `config` selects; returns their paths."""
    return lycoris.attach(
        model, config, adapter_name, skip, "LoKr",
        lambda base_layer, r, alpha: LokrDelta(base_layer, r, alpha, config),
    )

# How `peftkit train` trains it: as LoHa (r=8, alpha=16, every linear layer, a higher rate than LoRA's).
METHODS = (Method("lokr", LoKrConfig, dict(r=8, alpha=16, target_modules="all-linear"), learning_rate=2e-3),)
