"""AdaLoRA: LoRA in SVD form whose ranks move during training to the modules that need them most.

Each adapted weight W gets an update in the shape of a singular value decomposition,
y = W x + s * P diag(E) Q x, with Q = lora_A (r, in), E = lora_E (r, 1), P = lora_B (out, r) and
s = lora_alpha / (init_r + 1e-5) (Hugging Face `peft` divides by its `ranknum`, which stays init_r).
Every module starts with rank init_r. During training a rank allocator scores each triplet
(row of Q, value of E, column of P) by sensitivity |w * dL/dw|, smoothed by an exponential moving
average (beta1) and multiplied by an uncertainty term (beta2), and zeroes the values E of the least
important triplets until the total rank meets a budget that falls from init_r * modules to
target_r * modules along a cubic curve between steps tinit and total_step - tfinal. An orthogonal
regulariser (orth_reg_weight) keeps P and Q close to orthonormal.

The allocator is a `ModelAdapter`: the training loop calls `on_optimizer_step` after each optimizer
step (peft's `update_and_allocate`), and `forward` adds the regulariser to the loss in training.
The wrapper keeps the allocator's own copy of the config (returned as `Attached.config`). When
training starts the allocator records the run's total_step there, and at the final allocation the
kept triplets (`rank_pattern`, {"<module path>.lora_E": [bool per initial rank]}, as peft saves it).
From then on each delta masks its dropped triplets in forward, saved files hold only the kept ones,
and loading a file with a rank_pattern builds each module at its pruned rank (no reallocation), so
files move both ways between peftkit and peft. Importance scores are not part of training
checkpoints: a run resumed during the allocation starts scoring afresh; one resumed after it reads
the kept triplets from the zeroed values of E.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
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
    check_shape,
)
from peftkit.targeting import find_targets, linear_types, other_bias_modules

# peft divides the update by (ranknum + this), so the same constant keeps outputs identical.
RANK_EPSILON = 1e-5
RANK_PATTERN_SUFFIX = ".lora_E"


@register_config
@dataclasses.dataclass
class AdaLoraConfig(PeftConfig):
    """Adaptive-rank LoRA. Field names and meanings are those of Hugging Face `peft.AdaLoraConfig`.

    init_r: rank every module starts with. target_r: average rank per module at the end.
    tinit: steps of warmup before ranks shrink; tfinal: steps at the end with ranks fixed; either may
    also be a share of the run in [0, 1) (peftkit's addition: 0.1 = the first 10% of the steps),
    written as whole steps in saved files. deltaT: steps between two reallocations. beta1, beta2:
    smoothing of sensitivity and of its uncertainty. orth_reg_weight: weight of the orthogonal
    regulariser added to the training loss. total_step: length of the run in optimizer steps; None
    takes the training loop's (written here when training starts). rank_pattern: the kept triplets,
    {"<module path>.lora_E": [bool] * init_r}; written by the allocator at the end of the schedule,
    read when loading (modules are then built at their pruned ranks and not reallocated).
    lora_alpha: scale numerator (scale = lora_alpha / init_r). bias, target_modules, exclude_modules,
    layers_to_transform, layers_pattern, modules_to_save: as in LoraConfig. init_lora_weights: True
    (E = 0, A and B normal with std 0.02) or False (all standard normal; the model changes at once).
    fan_in_fan_out: accepted for peft files; the layout is read from the module type.
    """

    peft_type = "ADALORA"
    # peft's AdaLoraConfig inherits every LoraConfig field; these play no part in AdaLoRA ("r" is
    # ignored by peft too: init_r sets the rank).
    peft_neutral_fields = {
        "r": 8, "use_rslora": False, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
        "layer_replication": None, "loftq_config": {}, "megatron_config": None, "megatron_core": "megatron.core",
        "use_qalora": False, "qalora_group_size": 16, "target_parameters": None, "trainable_token_indices": None,
        "ensure_weight_tying": False,
    }

    target_r: int = 8
    init_r: int = 12
    tinit: int | float = 0
    tfinal: int | float = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False

    def validate(self):
        for field in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, field), (set, frozenset)):
                setattr(self, field, sorted(getattr(self, field)))
        super().validate()
        if self.init_r <= 0:
            raise PeftkitError(f"AdaLoraConfig.init_r must be a positive integer (the starting rank), got {self.init_r}")
        if self.target_r < 1:
            raise PeftkitError(f"AdaLoraConfig.target_r must be a positive integer (the final average rank), got {self.target_r}")
        # A file saved for inference may carry any target_r (peft writes its default 8 whatever init_r).
        if not self.inference_mode:
            check_target_rank(self)
        if self.deltaT < 1:
            raise PeftkitError(f"AdaLoraConfig.deltaT must be at least 1 (steps between reallocations), got {self.deltaT}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise PeftkitError(f"AdaLoraConfig.{name} must be strictly between 0 and 1, got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise PeftkitError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.lora_alpha <= 0:
            raise PeftkitError(f"AdaLoraConfig.lora_alpha must be positive (the update is scaled by lora_alpha / init_r), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PeftkitError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0 <= value < 1:
                raise PeftkitError(
                    f"AdaLoraConfig.{name}={value}: a float is a share of the run and must be in [0, 1); "
                    "give whole steps as an int"
                )
            if isinstance(value, int) and value < 0:
                raise PeftkitError(f"AdaLoraConfig.{name} must be >= 0 steps, got {value}")
        if self.total_step is not None:
            if self.total_step < 1:
                raise PeftkitError(f"AdaLoraConfig.total_step must be a positive number of steps or None, got {self.total_step}")
            check_schedule(self, self.total_step)
        if self.layers_pattern and self.layers_to_transform is None:
            raise PeftkitError("AdaLoraConfig.layers_pattern needs layers_to_transform (the block indices to adapt)")
        for key, mask in (self.rank_pattern or {}).items():
            if not key.endswith(RANK_PATTERN_SUFFIX):
                raise PeftkitError(
                    f"AdaLoraConfig.rank_pattern key {key!r} must be '<module path>{RANK_PATTERN_SUFFIX}' (the form peft saves)"
                )
            if len(mask) != self.init_r:
                raise PeftkitError(
                    f"AdaLoraConfig.rank_pattern[{key!r}] has {len(mask)} entries; it needs init_r={self.init_r} "
                    "(one per starting rank)"
                )


def check_target_rank(config: AdaLoraConfig) -> None:
    if config.target_r > config.init_r:
        raise PeftkitError(
            f"AdaLoraConfig.target_r={config.target_r} is above init_r={config.init_r}: ranks only shrink from "
            "init_r to target_r; lower target_r or raise init_r"
        )


def schedule_steps(config: AdaLoraConfig, total_step: int) -> tuple[int, int]:
    """(tinit, tfinal) in whole steps of a run of `total_step` steps (shares are rounded)."""
    def steps(value):
        return round(value * total_step) if isinstance(value, float) else value
    return steps(config.tinit), steps(config.tfinal)


def check_schedule(config: AdaLoraConfig, total_step: int) -> None:
    """Raise when tinit and tfinal leave no step in a run of `total_step` steps to shrink the ranks in."""
    tinit, tfinal = schedule_steps(config, total_step)
    if tinit >= total_step - tfinal:
        raise PeftkitError(
            f"AdaLoraConfig: tinit={config.tinit} and tfinal={config.tfinal} leave no step of a {total_step}-step run "
            f"to reallocate ranks in (it needs tinit < total_step - tfinal, here {tinit} >= {total_step - tfinal}); "
            "lower tinit or tfinal, or train for more steps"
        )


def budget_schedule(step: int, *, initial_budget: int, target_budget: int, tinit: int, tfinal: int,
                    total_step: int, deltaT: int) -> tuple[int, bool]:
    """(total rank allowed after `step`, whether to reallocate at this step); the formula of peft.

    Warmup (step <= tinit) keeps the initial budget; the last tfinal steps keep the target; between
    them the budget falls as target + (initial - target) * (1 - progress)^3, reallocated every deltaT steps.
    """
    if step <= tinit:
        return initial_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((initial_budget - target_budget) * (remaining**3) + target_budget)
    return budget, step % deltaT == 0


class SvdDelta(WeightDelta):
    """The update s * B diag(E) A on nn.Linear, GPT-2 Conv1D or nn.Conv2d.

    lora_A: (r, in_features) (for Conv2d in_channels * kernel height * kernel width), lora_E: (r, 1),
    lora_B: (out_features, r); ranknum: (1,), the starting rank, which fixes the scale as in peft.
    `kept` (r,) bool, once the allocator has finished, masks the triplets it dropped.
    """

    # ranknum is a parameter in peft (so it counts in the model's size) but never trains.
    frozen_parameters = ("ranknum",)

    def __init__(self, base_layer: nn.Module, r: int, init_r: int, lora_alpha: float, dropout: float,
                 init: bool, train_bias: bool):
        super().__init__()
        weight = base_layer.weight
        self.kind = "conv2d" if isinstance(base_layer, nn.Conv2d) else "linear"
        # GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in).
        self.transposed = self.kind == "linear" and not isinstance(base_layer, nn.Linear)
        if self.kind == "conv2d":
            if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
                raise PeftkitError(
                    f"AdaLoRA adapts Conv2d with groups=1 and padding_mode='zeros' only; this one has "
                    f"groups={base_layer.groups}, padding_mode={base_layer.padding_mode!r}"
                )
            out_features, in_features = weight.shape[0], weight[0].numel()
            self.conv = dict(stride=base_layer.stride, padding=base_layer.padding, dilation=base_layer.dilation)
            self.weight_shape = tuple(weight.shape)
        else:
            in_features, out_features = weight.shape if self.transposed else weight.shape[::-1]
        self.r, self.init_r, self.scaling = r, init_r, lora_alpha
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=weight.dtype))
        self.lora_E = nn.Parameter(torch.empty(r, 1, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=weight.dtype))
        self.ranknum = nn.Parameter(torch.full((1,), float(init_r), dtype=weight.dtype), requires_grad=False)
        self.register_buffer("kept", None, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.add_bias_change(base_layer, train_bias)
        with torch.no_grad():
            if init:
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
            else:
                for parameter in (self.lora_A, self.lora_E, self.lora_B):
                    nn.init.normal_(parameter)

    def singular_values(self) -> torch.Tensor:
        """E (r, 1) with the dropped triplets at zero."""
        return self.lora_E if self.kept is None else self.lora_E * self.kept[:, None].to(self.lora_E.dtype)

    def _scale(self) -> torch.Tensor:
        return self.scaling / (self.ranknum + RANK_EPSILON)

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(E) A in the base weight's layout: (out, in), (in, out) for Conv1D, or the conv kernel."""
        delta = (self.lora_B @ (self.lora_A * self.singular_values())) * self._scale()
        if self.kind == "conv2d":
            return delta.reshape(self.weight_shape)
        return delta.T if self.transposed else delta

    def forward(self, x, base_output):
        x = self.dropout(x.to(self.lora_A.dtype))
        if self.kind == "conv2d":
            update = F.conv2d(x, self.delta_weight(), None, **self.conv)
        else:
            update = F.linear(F.linear(x, self.lora_A * self.singular_values()), self.lora_B) * self._scale()
        output = base_output + update.to(base_output.dtype)
        if self.delta_bias is not None:
            output = output + (self.delta_bias.view(1, -1, 1, 1) if self.kind == "conv2d" else self.delta_bias)
        return output

    def extra_repr(self) -> str:
        rank = self.r if self.kept is None else int(self.kept.sum())
        return f"rank={rank} of {self.r}, init_r={self.init_r}, scaling={self.scaling:g}/{self.init_r}"

    def file_tensors(self, base_layer):
        # Files hold the kept triplets only, as peft saves them next to the rank_pattern.
        rows = slice(None) if self.kept is None else self.kept
        tensors = {
            "lora_A": self.lora_A[rows].detach(),
            "lora_E": self.lora_E[rows].detach(),
            "lora_B": self.lora_B[:, rows].detach(),
        }
        return tensors | self.bias_file_tensors(base_layer)

    @torch.no_grad()
    def _assign_file_tensors(self, tensors, base_layer):
        if self.kept is None:
            self.lora_A.copy_(tensors["lora_A"])
            self.lora_E.copy_(tensors["lora_E"])
            self.lora_B.copy_(tensors["lora_B"])
        else:
            for parameter in (self.lora_A, self.lora_E, self.lora_B):
                parameter.zero_()
            self.lora_A[self.kept] = tensors["lora_A"].to(self.lora_A)
            self.lora_E[self.kept] = tensors["lora_E"].to(self.lora_E)
            self.lora_B[:, self.kept] = tensors["lora_B"].to(self.lora_B)
        self.assign_bias_file_tensor(tensors, base_layer)

    def load_file_tensors(self, tensors, base_layer, where):
        for suffix, target in self.file_tensors(base_layer).items():
            check_shape(f"{where}.{suffix}", tensors[suffix], target)
        self._assign_file_tensors(tensors, base_layer)


class RankAllocator(ModelAdapter):
    """The whole-model part of AdaLoRA: importance scores, the rank budget, the orthogonal regulariser.

    Holds the adapter's config (the wrapper's own object, so the final rank_pattern it writes is
    what `save_pretrained` saves) and the adapter's SvdDelta of every module, in model order.
    """

    intercepts_forward = True

    def __init__(self, config: AdaLoraConfig, deltas: list[tuple[str, SvdDelta]]):
        super().__init__()
        self.config = config
        # A plain list: the deltas belong to their modules; registering them here would list them twice.
        self.deltas = list(deltas)
        # Built at the ranks of a given rank_pattern: the allocation is over, ranks stay as they are.
        self.finished = config.rank_pattern is not None
        self.reset_scores()

    def reset_scores(self) -> None:
        # Per delta and per factor ("A", "E", "B"): latest sensitivity, its moving average, its uncertainty.
        self.sensitivity: dict[tuple[int, str], torch.Tensor] = {}
        self.average_sensitivity: dict[tuple[int, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[int, str], torch.Tensor] = {}

    # -- forward: the orthogonal regulariser --------------------------------------------------------
    def forward(self, model: nn.Module, *args, **kwargs):
        output = model(*args, **kwargs)
        weight = self.config.orth_reg_weight
        if not (model.training and weight > 0 and self._training_this_adapter()):
            return output
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            total = loss + weight * self.orthogonal_regulariser()
            if isinstance(output, dict):  # transformers' ModelOutput is a dict and keeps .loss in step
                output["loss"] = total
            else:
                output.loss = total
        return output

    def generate(self, model: nn.Module, **kwargs):
        return model.generate(**kwargs)

    def _training_this_adapter(self) -> bool:
        return any(delta.lora_A.requires_grad for _, delta in self.deltas)

    def orthogonal_regulariser(self) -> torch.Tensor:
        """Mean over every A and B of ||A A^T - I||_F and ||B^T B - I||_F (peft's regulariser)."""
        norms = []
        for _, delta in self.deltas:
            for gram in (delta.lora_A @ delta.lora_A.T, delta.lora_B.T @ delta.lora_B):
                identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                norms.append(torch.linalg.matrix_norm(gram - identity, ord="fro"))
        return torch.stack(norms).mean()

    # -- the rank allocation, after every optimizer step ---------------------------------------------
    @property
    def initial_budget(self) -> int:
        return sum(delta.r for _, delta in self.deltas)

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.deltas)

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        """peft's update_and_allocate: score, shrink to the budget, and fix the ranks at the end."""
        if self.finished:
            self._apply_kept()
            return
        check_target_rank(self.config)
        total = self._total_step(total_steps)
        tinit, tfinal = schedule_steps(self.config, total)
        final_step = total - tfinal
        if step == 1:
            self.reset_scores()
        if step < final_step:
            self._update_scores()
            budget, reallocate = budget_schedule(
                step, initial_budget=self.initial_budget, target_budget=self.target_budget, tinit=tinit,
                tfinal=tfinal, total_step=total, deltaT=self.config.deltaT,
            )
            if reallocate:
                self._mask_to_budget(budget)
        elif step == final_step:
            self._finish(self._mask_to_budget(self.target_budget))
        else:
            # Past the final allocation without having made it: a run resumed from a checkpoint. The
            # dropped triplets were zeroed after every step since, so E tells which were kept.
            self._finish([(delta.lora_E.detach().view(-1) != 0) for _, delta in self.deltas])

    def _total_step(self, loop_total_steps: int) -> int:
        if self.config.total_step is None:
            check_schedule(self.config, loop_total_steps)
            # Recorded in the config, so that the saved file carries the schedule (peft requires it).
            self.config.total_step = loop_total_steps
        elif self.config.total_step - schedule_steps(self.config, self.config.total_step)[1] > loop_total_steps:
            warnings.warn(
                f"AdaLoraConfig.total_step={self.config.total_step} but the run has {loop_total_steps} steps: "
                "the final rank allocation will not be reached and the adapter keeps init_r everywhere",
                stacklevel=3,
            )
        return self.config.total_step

    @torch.no_grad()
    def _update_scores(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for index, (_, delta) in enumerate(self.deltas):
            for factor, parameter in (("A", delta.lora_A), ("E", delta.lora_E), ("B", delta.lora_B)):
                key = (index, factor)
                if key not in self.sensitivity:
                    self.average_sensitivity[key] = torch.zeros_like(parameter)
                    self.uncertainty[key] = torch.zeros_like(parameter)
                # A module the batch never reached has no gradient: it is not sensitive at all.
                gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                sensitivity = (parameter * gradient).abs()
                self.sensitivity[key] = sensitivity
                average = beta1 * self.average_sensitivity[key] + (1 - beta1) * sensitivity
                self.average_sensitivity[key] = average
                self.uncertainty[key] = beta2 * self.uncertainty[key] + (1 - beta2) * (sensitivity - average).abs()

    def _score(self, index: int, factor: str) -> torch.Tensor:
        key = (index, factor)
        if key not in self.average_sensitivity:  # no step scored yet
            return torch.zeros_like(getattr(self.deltas[index][1], f"lora_{factor}"))
        return self.average_sensitivity[key] * self.uncertainty[key]

    def triplet_scores(self) -> list[torch.Tensor]:
        """Importance (r,) of each triplet of each module: its E score plus the mean scores of its A row and B column."""
        scores = []
        for index in range(len(self.deltas)):
            row_of_a = self._score(index, "A").mean(dim=1)
            column_of_b = self._score(index, "B").mean(dim=0)
            # This order of additions is peft's, so that equal inputs give bit-equal scores.
            scores.append(self._score(index, "E").view(-1) + (row_of_a + column_of_b))
        return scores

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> list[torch.Tensor]:
        """Zero E of the least important triplets so that `budget` remain; returns the keep masks."""
        scores = self.triplet_scores()
        dropped = self.initial_budget - budget
        if dropped <= 0:
            return [torch.ones_like(s, dtype=torch.bool) for s in scores]
        threshold = torch.kthvalue(torch.cat(scores), k=dropped).values.item()
        masks = []
        for (_, delta), score in zip(self.deltas, scores):
            keep = score > threshold
            delta.lora_E.masked_fill_(~keep[:, None], 0.0)
            masks.append(keep)
        return masks

    def _finish(self, masks: list[torch.Tensor]) -> None:
        """Fix the ranks: each delta keeps its mask, the config records it for saving."""
        pattern = {}
        for (path, delta), keep in zip(self.deltas, masks):
            delta.kept = keep.to(delta.lora_E.device)
            pattern[path + RANK_PATTERN_SUFFIX] = [bool(v) for v in keep.tolist()]
        self.config.rank_pattern = pattern
        self.finished = True
        self.reset_scores()
        self._apply_kept()

    @torch.no_grad()
    def _apply_kept(self) -> None:
        # As peft does after the final allocation: dropped values stay at zero in the stored tensors.
        for _, delta in self.deltas:
            if delta.kept is not None:
                delta.lora_E.masked_fill_(~delta.kept[:, None], 0.0)

    def ranks(self) -> dict[str, int]:
        """Rank of each module: its kept triplets once allocated, else its size (init_r, or a loaded pattern's)."""
        return {path: int(delta.kept.sum()) if delta.kept is not None else delta.r for path, delta in self.deltas}


def supported_types() -> tuple[type, ...]:
    return (*linear_types(), nn.Conv2d)


def add_adapter(model: nn.Module, config: AdaLoraConfig, adapter_name: str, skip: list[str]) -> Attached:
    """Attach AdaLoRA adapter `adapter_name` to the modules `config` selects, with its rank allocator."""
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        supported_types=supported_types(), task_type=config.task_type, skip=skip,
    )
    # The allocator writes the schedule and the final ranks into the config; a copy of its own, kept
    # by the wrapper (Attached.config) and saved, leaves the caller's object untouched.
    config = copy.deepcopy(config)
    pattern = config.rank_pattern or {}
    unknown = sorted(k for k in pattern if k[: -len(RANK_PATTERN_SUFFIX)] not in targets)
    if unknown:
        raise PeftkitError(
            f"AdaLoraConfig.rank_pattern names modules this adapter does not adapt: {unknown[:3]}"
            + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else "")
            + f"; adapted modules: {targets[:3]}{' ...' if len(targets) > 3 else ''}"
        )
    deltas = []
    for name in targets:
        mask = pattern.get(name + RANK_PATTERN_SUFFIX)
        r = sum(bool(v) for v in mask) if mask is not None else config.init_r

        def make(base_layer, r=r):
            return SvdDelta(base_layer, r, config.init_r, config.lora_alpha, config.lora_dropout,
                            config.init_lora_weights, config.bias != "none")

        deltas.append((name, attach_delta(model, name, adapter_name, make)))

    if config.bias == "all":
        for name in other_bias_modules(model, targets, skip):
            attach_delta(model, name, adapter_name, BiasDelta)
    return Attached(targets, RankAllocator(config, deltas), config=config)


def export_config(config: AdaLoraConfig) -> AdaLoraConfig:
    """The config to save: a whole-step schedule with a total_step, which peft requires."""
    total = config.total_step
    if total is None:
        # Saved before any training: the shortest run the schedule fits; it plays no part at inference.
        total = 1
        while schedule_steps(config, total)[0] >= total - schedule_steps(config, total)[1]:
            total += 1
    tinit, tfinal = schedule_steps(config, total)
    return config.replace(total_step=total, tinit=tinit, tfinal=tfinal)

# How `peftkit train` trains it: ranks 12 -> 8 on average (scale 24/12 = LoRA's 16/8); warmup 10% of the
# steps, ranks fixed for the last half (the paper's sst2 run: 44%), so every end-of-epoch evaluation sees the
# final ranks. Its update starts smaller than LoRA's (E = 0, small A and B), hence the higher rate.
METHODS = (
    Method("adalora", AdaLoraConfig, dict(init_r=12, target_r=8, lora_alpha=24, target_modules="all-linear", tinit=0.1,
                                          tfinal=0.5, deltaT=10, orth_reg_weight=0.1), learning_rate=2e-3),
)
