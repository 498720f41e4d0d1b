"""Many LoRA adapters in one batch: each example's rows get their own adapter's update, in one pass.

The adapters of a layer are stacked, `lora_A` (slots, R, in) and `lora_B` (slots, out, R), ranks
zero-padded to R; slot 0 is all zeros and stands for "no adapter" (`BASE_ADAPTER`, peft's "__base__").
A per-example `adapter_ids` (batch,) picks each example's slot. `gathered_lora_update` is the kernel
`MixedLoraModel` and `PeftModel(..., adapter_names=[...])` both use; rows that come in a few runs of
one adapter each (co-training) go through `LoraRuns`, which runs the fused LoRA kernels of
`peftkit.methods.lora.kernels` per run. `MixedLoraLinear` is the layer `MixedLoraModel` puts in place of
each targeted Linear / Conv1D; `AdapterSelection` tells it which slot each example of the batch uses.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.lora.kernels import (
    base_weight_rows,
    fusable_call,
    linear_rows,
    lora_linear_backward,
    lora_linear_forward,
    merged_rows,
    merging_pays,
)
from peftkit.targeting import linear_types

BASE_ADAPTER = "__base__"

# At most this many runs of rows sharing an adapter go through `LoraRuns` (a loop of plain matmuls);
# batches cut into more runs (one adapter per example, say) take one gathered batched matmul instead.
MAX_RUNS = 8


def gathered_lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                         adapter_ids: torch.Tensor, base_output: torch.Tensor | None = None,
                         dropout: torch.Tensor | None = None, single_id: int | None = None,
                         layouts: dict | None = None) -> torch.Tensor:
    """base_output + scaling[ids] * B[ids] A[ids] x, one adapter per example.

    x: (batch, ..., in); lora_A: (slots, R, in); lora_B: (slots, out, R); scaling: (slots,);
    adapter_ids: (ids_batch,) slot per example, where batch is a multiple of ids_batch (generate repeats
    each example's rows for beams and num_return_sequences, each row with its example's adapter);
    base_output: (batch, ..., out) or None (then the update alone is returned); dropout: (slots,)
    dropout probability per slot, applied to x per example (pass it only in training mode);
    single_id: every row uses this slot (a plain matmul, no gather); layouts: a dict the caller keeps
    for one batch, where the rows' arrangement by slot is computed once and reused by every layer.
    Returns (batch, ..., out).

    When the rows come in a few runs of one adapter each (co-training puts each task's batch in one
    run), each run is two plain matmuls with its adapter's factors, as a single LoRA computes: no copy
    of factors or activations, and no scatter of gradients into the stack in backward. Otherwise, two
    ways to line rows up with their adapters, picked by the bytes they move: gather each row's
    factors (A[ids], B[ids]: batch x R x (in + out) copied), or, when rows carry few tokens (decoding),
    put each row's activations at its slot and multiply the stack in place (slots x tokens x (in + out)
    copied, no weight copy; slots nobody uses up to the highest id cost compute on zero rows).
    """
    batch = x.shape[0]
    adapter_ids = ids_per_row(adapter_ids, batch)
    lead = x.shape[:-1]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(lora_A.dtype)
    if dropout is not None:
        probability = dropout[adapter_ids].to(x3.dtype).view(batch, 1, 1)
        if bool((probability > 0).any()):
            keep = torch.rand_like(x3) >= probability
            x3 = x3 * keep / (1 - probability)
    # Without autograd the update is added into the base output in place (no second (batch, tokens, out) buffer).
    in_place = base_output is not None and base_output.dtype == x3.dtype and base_output.is_contiguous() and not (
        torch.is_grad_enabled() and (base_output.requires_grad or lora_A.requires_grad or lora_B.requires_grad))
    if single_id is not None:
        return _single_update(x3, lora_A[single_id], lora_B[single_id], scaling[single_id], base_output, lead, in_place)
    runs = contiguous_runs(adapter_ids, layouts)
    if runs is not None:
        return _update_by_runs(x3, lora_A, lora_B, scaling, runs, base_output, lead, in_place)
    slots_used, most_rows, occurrence = slot_layout(adapter_ids, layouts)
    if slots_used * most_rows * x3.shape[1] < batch * lora_A.shape[1]:
        update = _slot_major_update(x3, lora_A, lora_B, scaling, adapter_ids, slots_used, most_rows, occurrence)
        if base_output is None:
            return update.reshape(*lead, update.shape[-1])
        if in_place:
            base_output.view(update.shape).add_(update)
            return base_output
        return base_output + update.reshape(base_output.shape).to(base_output.dtype)
    return _gathered_update(x3, lora_A, lora_B, scaling, adapter_ids, base_output, lead, in_place)


def ids_per_row(adapter_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """adapter_ids (ids_batch,) repeated to one id per row (batch,), batch a multiple of ids_batch (generate
    repeats each example's rows for beams and num_return_sequences)."""
    if adapter_ids.shape[0] == batch:
        return adapter_ids
    if adapter_ids.shape[0] == 0 or batch % adapter_ids.shape[0]:
        raise PeftkitError(
            f"adapter ids were given for {adapter_ids.shape[0]} examples but a layer received a batch of "
            f"{batch} rows; pass one adapter id (or name) per example of the batch"
        )
    return adapter_ids.repeat_interleave(batch // adapter_ids.shape[0])


def _single_update(x3, lora_A, lora_B, scaling, base_output, lead, in_place):
    """Every row has the same adapter, lora_A (R, in), lora_B (out, R): two plain matmuls, as an unmerged
    single LoRA computes."""
    out_features = lora_B.shape[0]
    hidden = F.linear(x3, lora_A) * scaling.to(x3.dtype)
    if in_place:
        base_output.view(-1, out_features).addmm_(hidden.view(-1, hidden.shape[-1]), lora_B.t())
        return base_output
    update = F.linear(hidden, lora_B).reshape(*lead, out_features)
    return update if base_output is None else base_output + update.to(base_output.dtype)


def _slot_major_update(x3, lora_A, lora_B, scaling, adapter_ids, slots_used, most_rows, occurrence):
    """The update (batch, tokens, out) with row b placed at (slot ids[b], occurrence[b]): the stacked factors
    are read where they lie, no gather of weights."""
    tokens, in_features, out_features = x3.shape[1], x3.shape[2], lora_B.shape[1]
    x_slots = x3.new_zeros(slots_used, most_rows, tokens, in_features)
    x_slots[adapter_ids, occurrence] = x3
    hidden = torch.bmm(x_slots.view(slots_used, -1, in_features), lora_A[:slots_used].transpose(1, 2))
    hidden = hidden * scaling[:slots_used].to(hidden.dtype).view(-1, 1, 1)
    update = torch.bmm(hidden, lora_B[:slots_used].transpose(1, 2)).view(slots_used, most_rows, tokens, out_features)
    return update[adapter_ids, occurrence]


def _gathered_update(x3, lora_A, lora_B, scaling, adapter_ids, base_output, lead, in_place):
    """Each row's factors gathered (A[ids], B[ids]) and one batched matmul pair."""
    batch, out_features = x3.shape[0], lora_B.shape[1]
    hidden = torch.bmm(x3, lora_A[adapter_ids].transpose(1, 2))  # (batch, tokens, R)
    hidden = hidden * scaling[adapter_ids].to(hidden.dtype).view(batch, 1, 1)
    gathered_B = lora_B[adapter_ids].transpose(1, 2)  # (batch, R, out)
    if base_output is None:
        return torch.bmm(hidden, gathered_B).reshape(*lead, out_features)
    if in_place:
        base_output.view(batch, -1, out_features).baddbmm_(hidden, gathered_B)
        return base_output
    if base_output.dtype == hidden.dtype:
        # One fused op: base + hidden @ B^T.
        return torch.baddbmm(base_output.reshape(batch, -1, out_features), hidden, gathered_B).reshape(base_output.shape)
    return base_output + torch.bmm(hidden, gathered_B).reshape(base_output.shape).to(base_output.dtype)


def contiguous_runs(adapter_ids: torch.Tensor, layouts: dict | None) -> list[tuple[int, int, int]] | None:
    """[(slot, first row, end row), ...] when the rows form at most MAX_RUNS runs of one slot each, else None.

    adapter_ids: (batch,); layouts: the per-batch dict of `gathered_lora_update` (the answer is kept there)."""
    key = ("runs", adapter_ids.shape[0], adapter_ids.device, tuple(adapter_ids.tolist())) if layouts is not None else None
    if key is not None and key in layouts:
        return layouts[key]
    ids = adapter_ids.tolist()
    starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    runs = None
    if len(starts) <= MAX_RUNS:
        ends = starts[1:] + [len(ids)]
        runs = [(ids[a], a, b) for a, b in zip(starts, ends)]
    if key is not None:
        layouts[key] = runs
    return runs


def slot_layout(adapter_ids: torch.Tensor, layouts: dict | None) -> tuple[int, int, torch.Tensor]:
    """(highest slot + 1, most rows sharing one slot, each row's index among the rows of its slot (batch,))
    for adapter_ids (batch,); kept in `layouts` when given."""
    key = (adapter_ids.shape[0], adapter_ids.device, tuple(adapter_ids.tolist())) if layouts is not None else None
    if key is not None and key in layouts:
        return layouts[key]
    counts = torch.bincount(adapter_ids)
    order = torch.argsort(adapter_ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    occurrence = torch.empty_like(adapter_ids)
    occurrence[order] = torch.arange(adapter_ids.shape[0], device=adapter_ids.device) - starts[adapter_ids[order]]
    layout = (counts.shape[0], int(counts.max()), occurrence)
    if key is not None:
        layouts[key] = layout
    return layout


def _update_by_runs(x3: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                    runs: list[tuple[int, int, int]], base_output: torch.Tensor | None, lead: torch.Size,
                    in_place: bool) -> torch.Tensor:
    """gathered_lora_update for rows in runs of one slot: each run's base rows plus s B A x."""
    out_features = lora_B.shape[1]
    if in_place:
        runs_forward(x3, None, None, lora_A, lora_B, scaling.tolist(), runs, base_output.view(x3.shape[0], -1, out_features))
        return base_output
    output = LoraRuns.apply(x3, None, None, base_output, lora_A, lora_B, scaling, runs)
    return output.reshape(*lead, out_features) if base_output is None else output.view(base_output.shape)


def runs_forward(x3: torch.Tensor, weight_rows: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scales: list[float], runs: list[tuple[int, int, int]], output: torch.Tensor) -> None:
    """Write into output (batch, tokens, out), per run of slot k: x W^T + b + s_k B_k A_k x (`lora_linear_forward`).

    x3: (batch, tokens, in); lora_A: (slots, R, in); lora_B: (slots, out, R); scales: one float per slot.
    With weight_rows None, output already holds the base rows and only the update is added; slot 0
    (BASE_ADAPTER) and slots of scale 0 add nothing.
    """
    out_features, in_features = output.shape[-1], x3.shape[-1]
    for slot, start, end in runs:
        rows = x3[start:end].reshape(-1, in_features)
        target = output[start:end].view(-1, out_features)
        s = scales[slot]
        if slot != 0 and s != 0:
            lora_linear_forward(rows, weight_rows, bias, lora_A[slot], lora_B[slot], s, out=target)
        elif weight_rows is not None:
            linear_rows(rows, weight_rows, bias, out=target)


class LoraRuns(torch.autograd.Function):
    """Mixed LoRA over rows in runs that share a slot k, as one autograd node: per run, s_k B_k A_k x added to
    the base rows, where the base is base_output (or zeros) or, given the frozen weight_rows W (out, in)
    and bias, computed here (the layer's whole output, `FusedLoraLinear`'s computation per run).

    x: (batch, ..., in); lora_A: (slots, R, in); lora_B: (slots, out, R); scaling: (slots,); runs:
    [(slot, first row, end row), ...] covering the batch. Returns (batch, tokens, out). Each run is
    `lora_linear_forward` / `lora_linear_backward` with its slot's factors. Gradients: x, base_output,
    the stacked factors (zero for slots not in the batch); never W or b.
    """

    @staticmethod
    def forward(ctx, x, weight_rows, bias, base_output, lora_A, lora_B, scaling, runs):
        scales = scaling.tolist()  # one read of the scalings, not one per run
        ctx.save_for_backward(x, weight_rows, lora_A, lora_B)
        ctx.scales, ctx.runs = scales, runs
        ctx.base_shape = None if base_output is None else base_output.shape
        out_features, in_features = lora_B.shape[1], x.shape[-1]
        x3 = x.reshape(x.shape[0], -1, in_features)
        if weight_rows is not None:
            output = x3.new_empty(x3.shape[0], x3.shape[1], out_features)
        elif base_output is not None:
            output = base_output.reshape(x3.shape[0], -1, out_features).clone()
        else:
            output = x3.new_zeros(x3.shape[0], x3.shape[1], out_features)
        runs_forward(x3, weight_rows, bias, lora_A, lora_B, scales, runs, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight_rows, lora_A, lora_B = ctx.saved_tensors
        out_features, in_features = lora_B.shape[1], x.shape[-1]
        x3 = x.reshape(x.shape[0], -1, in_features)
        grad = grad_output.reshape(x3.shape[0], -1, out_features)
        needs_x, needs_A, needs_B = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        grad_x = None
        if needs_x:  # every run writes its rows when the frozen matmul is here; else only adapted runs add
            grad_x = torch.empty_like(x3) if weight_rows is not None else torch.zeros_like(x3)
        grad_A = torch.zeros_like(lora_A) if needs_A else None
        grad_B = torch.zeros_like(lora_B) if needs_B else None
        for slot, start, end in ctx.runs:
            grad_rows = grad[start:end].reshape(-1, out_features)
            target = grad_x[start:end].view(-1, in_features) if needs_x else None
            s = ctx.scales[slot]
            if slot != 0 and s != 0:
                lora_linear_backward(grad_rows, x3[start:end].reshape(-1, in_features), weight_rows, lora_A[slot],
                                     lora_B[slot], s, needs_x=needs_x, needs_A=needs_A, needs_B=needs_B, grad_x=target,
                                     grad_A=grad_A[slot] if needs_A else None, grad_B=grad_B[slot] if needs_B else None)
            elif weight_rows is not None and needs_x:
                torch.mm(grad_rows, weight_rows, out=target)
        grad_base = None
        if ctx.base_shape is not None and ctx.needs_input_grad[3]:
            grad_base = grad_output.reshape(ctx.base_shape)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_base, grad_A, grad_B, None, None


class AdapterSelection(threading.local):
    """Which slot each example of the running batch uses: set by MixedLoraModel around a forward or
    generate call and read by its layers (per thread, so threads can run batches of their own)."""

    adapter_ids: torch.Tensor | None = None  # (batch,)
    single_id: int | None = None  # set when every example uses the same slot
    layouts: dict | None = None  # rows arranged by slot, computed once per batch (see gathered_lora_update)


def read_selection(selection: AdapterSelection, where: str) -> torch.Tensor:
    if selection.adapter_ids is None:
        raise PeftkitError(
            f"{where} ran without adapter ids: call the MixedLoraModel itself (model(..., adapter_ids=...) or "
            "adapter_names=[...]), not its base model. Recomputing activations in backward (gradient "
            "checkpointing) is not supported by mixed batches."
        )
    return selection.adapter_ids


class MixedLoraLinear(nn.Module):
    """A frozen nn.Linear (or GPT-2 Conv1D) plus stacked LoRA slots.

    lora_A: (slots, max_rank, in), lora_B: (slots, out, max_rank), scaling: (slots,), dropout: (slots,).
    forward(x (batch, ..., in)) -> (batch, ..., out) with each example's slot read from the selection.
    """

    def __init__(self, base_layer: nn.Module, slots: int, max_rank: int, selection: AdapterSelection):
        super().__init__()
        weight = base_layer.weight
        transposed = not isinstance(base_layer, nn.Linear)  # GPT-2's Conv1D stores (in, out)
        self.in_features, self.out_features = weight.shape if transposed else weight.shape[::-1]
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(torch.zeros(slots, max_rank, self.in_features, dtype=weight.dtype, device=weight.device))
        # Stored as (slots, max_rank, out) in memory and seen as (slots, out, max_rank): the batched matmul
        # reads B^T contiguously, which decodes faster, while each slot keeps peft's (out, r) layout.
        self.lora_B = nn.Parameter(
            torch.zeros(slots, max_rank, self.out_features, dtype=weight.dtype, device=weight.device).transpose(1, 2))
        self.register_buffer("scaling", torch.zeros(slots, device=weight.device))
        self.register_buffer("dropout", torch.zeros(slots, device=weight.device))
        # Rank of each slot's adapter here (0: the adapter leaves this layer alone); a buffer, so it travels
        # with state_dict like the factors.
        self.register_buffer("ranks", torch.zeros(slots, dtype=torch.long, device=weight.device))
        object.__setattr__(self, "selection", selection)  # shared state, not a submodule

    def __getattr__(self, name: str):
        # Code around the model may read `.weight`, `.nf`, ... from the module it replaced.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = read_selection(self.selection, "a mixed LoRA layer")
        single = self.selection.single_id
        if single is not None and int(self.ranks[single]) == 0:  # "no adapter", or one that leaves this layer alone
            return self.base_layer(x)
        if single is not None and self._merging_pays(x):
            # One adapter for every row, no autograd, many rows: W + s B A costs less than the low-rank side path.
            weight = merged_rows(self.base_layer.weight, self.lora_A[single], self.lora_B[single], float(self.scaling[single]))
            return F.linear(x, weight, self.base_layer.bias)
        if single is None and torch.is_grad_enabled():
            fused = self._fused_runs(x, ids)
            if fused is not None:
                return fused
        base_output = self.base_layer(x)
        dropout = self.dropout if self.training else None
        return gathered_lora_update(x, self.lora_A, self.lora_B, self.scaling, ids, base_output, dropout, single,
                                    self.selection.layouts)

    def _fused_runs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The layer's whole output from `LoraRuns` (training on rows in a few runs of one adapter each), or
        None where that path does not apply: rows repeated by generate, dropout in a slot of the batch, a
        cast, hooks or autocast, a base layer that is not a plain Linear / Conv1D (quantized, say)."""
        layer = self.base_layer
        if ids.shape[0] != x.shape[0] or type(layer) not in linear_types() or not fusable_call(layer, x, self.lora_A.dtype):
            return None
        runs = contiguous_runs(ids, self.selection.layouts)
        if runs is None or (self.training and any(float(self.dropout[slot]) > 0 for slot, _, _ in runs)):
            return None
        output = LoraRuns.apply(x, base_weight_rows(layer), layer.bias, None, self.lora_A, self.lora_B, self.scaling, runs)
        return output.view(*x.shape[:-1], self.out_features)

    def _merging_pays(self, x: torch.Tensor) -> bool:
        if type(self.base_layer) is not nn.Linear or x.dtype != self.lora_A.dtype or torch.is_grad_enabled() or self.training:
            return False
        return merging_pays(x.numel() // self.in_features, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        slots, rank, _ = self.lora_A.shape
        return f"in={self.in_features}, out={self.out_features}, slots={slots}, max_rank={rank}"
