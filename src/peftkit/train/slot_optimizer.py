"""Optimizing stacked adapter slots one slot at a time: `SlotAdamW` (an AdamW per slot of tensors whose
dim 0 is the slot) and `clip_slot_gradients` (gradient clipping per slot). Co-training trains one
LoRA adapter per task in the slots of one MixedLoraModel with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from peftkit.errors import PeftkitError


class SlotAdamW:
    """AdamW on stacked tensors whose dim 0 is the adapter slot: an independent AdamW per slot.

    torch optimizers take whole Parameters, not slices, so one stacked tensor (slots, ...) cannot have
    a learning rate, step count or moments per slot there. Here each slot has its own: `step` takes a
    learning rate per slot and the slots to update; the others keep their values and their moments
    (no decay of a slot that saw no example). The update of a slot is torch.optim.AdamW's (decoupled
    weight decay, bias correction by the slot's own step count).

    params: tensors (slots, ...) with .grad; weight decay applies to those with 2+ dimensions per slot
    (weights, not biases), as the single-task loop does.
    """

    def __init__(self, params: Sequence[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise PeftkitError("SlotAdamW needs at least one stacked tensor")
        self.num_slots = self.params[0].shape[0]
        for p in self.params:
            if p.dim() < 2 or p.shape[0] != self.num_slots:
                raise PeftkitError(f"SlotAdamW: every tensor needs dim 0 = slots ({self.num_slots}); got shape {tuple(p.shape)}")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.num_slots, dtype=torch.long)  # optimizer steps taken, per slot

    @torch.no_grad()
    def step(self, learning_rates: Sequence[float] | torch.Tensor, active: Sequence[bool] | torch.Tensor) -> None:
        """One AdamW step for each slot s with active[s], at learning rate learning_rates[s]."""
        rates = torch.as_tensor(learning_rates, dtype=torch.float64).tolist()
        chosen = torch.as_tensor(active, dtype=torch.bool).nonzero().flatten()
        if len(rates) != self.num_slots or torch.as_tensor(active).numel() != self.num_slots:
            raise PeftkitError(f"SlotAdamW.step needs one learning rate and one active flag per slot ({self.num_slots})")
        if chosen.numel() == 0:
            return
        beta1, beta2 = self.betas
        self.steps[chosen] += 1
        # Per-slot scalars exactly as torch's AdamW computes them (Python floats), then one tensor each.
        slot_rates = [rates[s] for s in chosen.tolist()]
        slot_steps = self.steps[chosen].tolist()
        step_size = [lr / (1 - beta1**n) for lr, n in zip(slot_rates, slot_steps)]
        correction2_sqrt = [(1 - beta2**n) ** 0.5 for n in slot_steps]
        decay_factor = [1 - lr * self.weight_decay for lr in slot_rates]
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            as_column = lambda values, p=p, shape=shape: torch.tensor(values, dtype=p.dtype, device=p.device).view(shape)  # noqa: E731
            index = chosen.to(p.device)
            grad = p.grad.index_select(0, index)
            value = p.index_select(0, index)
            if self.weight_decay and p.dim() > 2:
                value = value * as_column(decay_factor)
            m = exp_avg.index_select(0, index).lerp_(grad, 1 - beta1)
            v = exp_avg_sq.index_select(0, index).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / as_column(correction2_sqrt)).add_(self.eps)
            value = value - as_column(step_size) * (m / denom)
            exp_avg.index_copy_(0, index, m)
            exp_avg_sq.index_copy_(0, index, v)
            p.index_copy_(0, index, value)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Moments and step counts as named tensors (for safetensors)."""
        tensors = {"steps": self.steps.clone()}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            tensors[f"exp_avg.{i}"], tensors[f"exp_avg_sq.{i}"] = m, v
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):
            for key, target in ((f"exp_avg.{i}", m), (f"exp_avg_sq.{i}", v)):
                if key not in tensors or tensors[key].shape != target.shape:
                    raise PeftkitError(f"{where}: optimizer state {key} is missing or has another shape; it was written "
                                       "by a run with other tasks or another model")
                target.copy_(tensors[key])
        self.steps.copy_(tensors["steps"])


@torch.no_grad()
def clip_slot_gradients(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each slot's gradient (over all `params`, dim 0 = slot) to norm `max_norm`, as
    torch.nn.utils.clip_grad_norm_ does for one model. Returns the norms before clipping, (slots,)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads])  # (tensors, slots)
    norms = torch.linalg.vector_norm(per_tensor, 2, dim=0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype))
    return norms
