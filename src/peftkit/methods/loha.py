"""LoHa: the weight update is the Hadamard (element-wise) product of two low-rank matrices.

Delta W = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)   (Hyeon-Woo et al., FedPara, 2022; LyCORIS)

Two rank-r factors multiplied element-wise reach rank up to r^2 for twice LoRA's parameters. Layers:
nn.Linear, nn.Conv1d and nn.Conv2d, as in Hugging Face `peft` (`LoHaConfig`), whose file layout and
tensor names (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, and hada_t1 / hada_t2 for the effective
convolution) this follows. The default initialisation sets w2_b = 0, so the adapter starts at the base.

On a Linear layer the update is applied without building Delta W when that is cheaper: with the
row-wise Khatri-Rao products L = [w1_a[:, i] * w2_a[:, j]]_(i,j), (out, r^2), and
R = [w1_b[i] * w2_b[j]]_(i,j), (r^2, in), Delta W = L @ R, so x Delta W^T = (x R^T) L^T.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.methods import lycoris


@register_config
@dataclasses.dataclass
class LoHaConfig(PeftConfig):
    """Low-rank Hadamard product. Field names and meanings are those of Hugging Face `peft.LoHaConfig`.

    r: rank of each of the two factors. alpha: scale numerator (scale = alpha / r). rank_dropout:
    in training, the probability of dropping each output row of the update (kept rows are rescaled).
    module_dropout: in training, the probability of skipping the whole update for a forward.
    use_effective_conv2d: for convolutions with a kernel larger than 1, factor the kernel with a
    small core tensor (r, r, *kernel) per factor (FedPara's "Proposition 3") instead of flattening it.
    target_modules: names, a regex, or "all-linear". rank_pattern / alpha_pattern: per module
    overrides, keys are regexes matched against the end of the module path. init_weights: True
    (w2_b = 0, the adapter starts at the base) or False (all factors random; for tests).
    """

    peft_type = "LOHA"

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def validate(self):
        lycoris.module_sets_to_lists(self)
        super().validate()
        lycoris.validate_common(self)


class LohaDelta(lycoris.LycorisDelta):
    """LoHa on nn.Linear, nn.Conv1d or nn.Conv2d.

    Plain form (Linear, and convolutions unless effective): hada_w1_a, hada_w2_a (out, r);
    hada_w1_b, hada_w2_b (r, in / groups * kernel size); Delta W is reshaped to the weight's shape.
    Effective convolution: hada_w{1,2}_a (r, out), hada_w{1,2}_b (r, in / groups), and cores
    hada_t{1,2} (r, r, kh, kw), (r, r, k, 1) for Conv1d; each factor is
    W_i[o, c, ...] = sum_(p,q) t_i[p, q, ...] w_i_a[p, o] w_i_b[q, c].
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, config: LoHaConfig):
        super().__init__(base_layer, r, alpha, config.rank_dropout, config.module_dropout)
        out_features, in_per_group, *kernel = self.weight_shape
        dtype = base_layer.weight.dtype
        # A 1x1 kernel has nothing to factor: peft uses the plain form there, and so do we.
        self.effective_conv = bool(config.use_effective_conv2d and self.is_conv and math.prod(kernel) != 1)
        for factor in (1, 2):
            if self.effective_conv:
                core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
                setattr(self, f"hada_t{factor}", nn.Parameter(torch.empty(core, dtype=dtype)))
                setattr(self, f"hada_w{factor}_a", nn.Parameter(torch.empty(r, out_features, dtype=dtype)))
                setattr(self, f"hada_w{factor}_b", nn.Parameter(torch.empty(r, in_per_group, dtype=dtype)))
            else:
                columns = in_per_group * math.prod(kernel)
                setattr(self, f"hada_w{factor}_a", nn.Parameter(torch.empty(out_features, r, dtype=dtype)))
                setattr(self, f"hada_w{factor}_b", nn.Parameter(torch.empty(r, columns, dtype=dtype)))
        with torch.no_grad():
            for parameter in self._parameters.values():
                lycoris.kaiming_uniform(parameter)
            if config.init_weights:
                # One zero factor is enough for a zero product; the others keep their gradients alive.
                self.hada_w2_b.zero_()
        # Applying L and R (r^2 wide) beats building Delta W (out x in) when r^2 (in + out) < in * out.
        self.factored = not self.is_conv and r * r * (in_per_group + out_features) < in_per_group * out_features

    def _factor(self, factor: int) -> torch.Tensor:
        """w_a @ w_b (out, columns), or the effective-convolution factor (out, in / groups, kh, kw)."""
        a, b = self._parameters[f"hada_w{factor}_a"], self._parameters[f"hada_w{factor}_b"]
        if self.effective_conv:
            return torch.einsum("pqkl,po,qc->ockl", self._parameters[f"hada_t{factor}"], a, b)
        return a @ b

    def delta_weight(self) -> torch.Tensor:
        return (self._factor(1) * self._factor(2) * self.scaling).reshape(self.weight_shape)

    def linear_update(self, x):
        if not self.factored:
            return super().linear_update(x)
        out_features, in_features = self.weight_shape
        left = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(out_features, -1) * self.scaling
        right = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(-1, in_features)
        return F.linear(F.linear(x, right), left)


def add_adapter(model: nn.Module, config: LoHaConfig, adapter_name: str, skip: list[str]) -> list[str]:
    """Attach LoHa adapter `adapter_name` to the modules `config` selects; returns their paths."""
    return lycoris.attach(
        model, config, adapter_name, skip, "LoHa",
        lambda base_layer, r, alpha: LohaDelta(base_layer, r, alpha, config),
    )

# How `peftkit train` trains it: r=8, alpha=16 on every linear layer as for LoRA, with a higher rate: the
# update grows from zero more slowly than LoRA's (a product of two small factors).
METHODS = (Method("loha", LoHaConfig, dict(r=8, alpha=16, target_modules="all-linear"), learning_rate=2e-3),)
