"""Mixed-adapter batches: every example of a batch runs with its own LoRA adapter, in one pass.

`MixedLoraModel` keeps up to `capacity` LoRA adapters stacked, one tensor per layer and factor
(`lora_A` (capacity + 1, max_rank, in), `lora_B` (capacity + 1, out, max_rank)). A per-example
`adapter_ids` tensor (batch,) picks each example's adapter: each layer gathers its rows of the stack
and runs one batched matmul, forward and backward, instead of a Python loop over adapters.

- Slot 0 is all zeros and stands for "no adapter" (`BASE_ADAPTER`, peft's "__base__").
- Ranks differ between adapters: each is zero-padded to `max_rank`. Padding is exact (the padded rows
  of A and columns of B are zero, so they add nothing) and keeps one tensor shape for every adapter, so
  one gathered matmul serves the whole batch. We chose padding over grouping by rank because grouping
  brings back a loop over groups; the cost is compute for the padded rank, small for LoRA ranks.
- Loading, adding and removing an adapter copies into (or zeros) a slot; the layers are never
  replaced, so references to them, hooks and compiled graphs stay valid.
- A classification head (`head="classifier"`) can be stacked too: each adapter has its own head and
  number of labels; logits past an adapter's labels are -inf (the caller computes the loss).

`gathered_lora_update` is the kernel; `PeftModel(..., adapter_names=[...])` uses it as well.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftkit import io
from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdaptedModule, ReplacementDelta, adapted_modules
from peftkit.methods.lora import LoraConfig, LoraLinearDelta, _merge_pays, _merged_rows, _pattern_value, lora_scaling
from peftkit.targeting import ALL_LINEAR, CLASSIFIER_HEAD_NAMES, find_targets, layer_index, linear_types, name_matches

BASE_ADAPTER = "__base__"

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


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
    if adapter_ids.shape[0] != batch:
        if adapter_ids.shape[0] == 0 or batch % adapter_ids.shape[0]:
            raise PeftkitError(
                f"adapter ids were given for {adapter_ids.shape[0]} examples but a layer received a batch of "
                f"{batch} rows; pass one adapter id (or name) per example of the batch"
            )
        adapter_ids = adapter_ids.repeat_interleave(batch // adapter_ids.shape[0])
    out_features = lora_B.shape[1]
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
        # Every row has the same adapter: two plain matmuls, as an unmerged single LoRA computes.
        hidden = F.linear(x3, lora_A[single_id]) * scaling[single_id].to(x3.dtype)
        if in_place:
            base_output.view(-1, out_features).addmm_(hidden.view(-1, hidden.shape[-1]), lora_B[single_id].t())
            return base_output
        update = F.linear(hidden, lora_B[single_id]).reshape(*lead, out_features)
        return update if base_output is None else base_output + update.to(base_output.dtype)
    runs = _contiguous_runs(adapter_ids, layouts)
    if runs is not None:
        return _update_by_runs(x3, lora_A, lora_B, scaling, runs, base_output, lead, in_place)
    slots_used, most_rows, occurrence = _slot_layout(adapter_ids, layouts)
    tokens, rank = x3.shape[1], lora_A.shape[1]
    if slots_used * most_rows * tokens < batch * rank:
        # Slot-major: row b goes to (slot ids[b], occurrence[b]); the stacked factors are read where they lie.
        x_slots = x3.new_zeros(slots_used, most_rows, tokens, x3.shape[-1])
        x_slots[adapter_ids, occurrence] = x3
        hidden = torch.bmm(x_slots.view(slots_used, -1, x3.shape[-1]), lora_A[:slots_used].transpose(1, 2))
        hidden = hidden * scaling[:slots_used].to(hidden.dtype).view(-1, 1, 1)
        update = torch.bmm(hidden, lora_B[:slots_used].transpose(1, 2)).view(slots_used, most_rows, tokens, out_features)
        update = update[adapter_ids, occurrence]  # (batch, tokens, out)
        if base_output is None:
            return update.reshape(*lead, out_features)
        if in_place:
            base_output.view(batch, -1, out_features).add_(update)
            return base_output
        return base_output + update.reshape(base_output.shape).to(base_output.dtype)
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


# At most this many runs of rows sharing an adapter go through `_update_by_runs` (a loop of plain matmuls);
# batches cut into more runs (one adapter per example, say) take one gathered batched matmul instead.
MAX_RUNS = 8


def _contiguous_runs(adapter_ids: torch.Tensor, layouts: dict | None) -> list[tuple[int, int, int]] | None:
    """[(slot, first row, end row), ...] when the rows form at most MAX_RUNS runs of one slot each, else None."""
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


def _update_by_runs(x3: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor,
                    runs: list[tuple[int, int, int]], base_output: torch.Tensor | None, lead: torch.Size,
                    in_place: bool) -> torch.Tensor:
    """gathered_lora_update for rows in runs of one slot: each run's base rows plus s B A x."""
    out_features = lora_B.shape[1]
    if in_place:
        _runs_forward(x3, None, None, lora_A, lora_B, scaling.tolist(), runs, base_output.view(x3.shape[0], -1, out_features))
        return base_output
    output = _LoraRuns.apply(x3, None, None, base_output, lora_A, lora_B, scaling, runs)
    return output.reshape(*lead, out_features) if base_output is None else output.view(base_output.shape)


def _runs_forward(x3: torch.Tensor, weight_rows: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scales: list[float], runs: list[tuple[int, int, int]], output: torch.Tensor) -> None:
    """Write into output (batch, tokens, out), per run of slot k: x W^T + b + s_k B_k A_k x.

    With weight_rows None, output already holds the base rows and only the update is added. With the
    frozen weight, a run with more rows than the weight has, roughly, uses the merged W + s B A (one
    matmul), as `FusedLoraLinear` does. The rank-r product is taken as (r, N), the fast layout on CPU.
    """
    out_features, in_features = output.shape[-1], x3.shape[-1]
    for slot, start, end in runs:
        rows = x3[start:end].reshape(-1, in_features)
        target = output[start:end].view(-1, out_features)
        s = scales[slot]
        adapted = slot != 0 and s != 0  # slot 0 is BASE_ADAPTER
        if weight_rows is not None:
            merged = adapted and _merge_pays(rows.shape[0], in_features, out_features)
            weight = _merged_rows(weight_rows, lora_A[slot], lora_B[slot], s) if merged else weight_rows
            if bias is None:
                torch.mm(rows, weight.t(), out=target)
            else:
                torch.addmm(bias, rows, weight.t(), out=target)
            if merged:
                continue
        if adapted:
            target.addmm_(torch.mm(lora_A[slot], rows.t()).t(), lora_B[slot].t(), alpha=s)


class _LoraRuns(torch.autograd.Function):
    """Mixed LoRA over rows in runs that share a slot k, as one autograd node: per run, s_k B_k A_k x added to
    the base rows, where the base is base_output (or zeros) or, given the frozen weight_rows W (out, in)
    and bias, computed here (the layer's whole output, `FusedLoraLinear`'s computation per run).

    x: (batch, ..., in); lora_A: (slots, R, in); lora_B: (slots, out, R); scaling: (slots,); runs:
    [(slot, first row, end row), ...] covering the batch. Returns (batch, tokens, out). The rank-R
    products take R as the leading dimension ((R, N) results): on CPU, the (N, R) forms of autograd's
    own linear backward are several times slower. Gradients: x, base_output, the stacked factors (zero
    for slots not in the batch); never W or b.
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
        _runs_forward(x3, weight_rows, bias, lora_A, lora_B, scales, runs, output)
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
            rows = x3[start:end].reshape(-1, in_features)
            target = grad_x[start:end].view(-1, in_features) if needs_x else None
            s = ctx.scales[slot]
            adapted = slot != 0 and s != 0
            merged = False
            if weight_rows is not None and needs_x:
                merged = adapted and _merge_pays(rows.shape[0], in_features, out_features)
                weight = _merged_rows(weight_rows, lora_A[slot], lora_B[slot], s) if merged else weight_rows
                torch.mm(grad_rows, weight, out=target)
            if not adapted:
                continue
            grad_hidden_t = torch.mm(lora_B[slot].t(), grad_rows.t()).mul_(s)  # (R, N)
            if needs_x and not merged:
                target.addmm_(grad_hidden_t.t(), lora_A[slot])
            if needs_A:
                grad_A[slot].addmm_(grad_hidden_t, rows)
            if needs_B:
                hidden_t = torch.mm(lora_A[slot], rows.t())  # (R, N), recomputed rather than saved
                grad_B[slot].add_(torch.mm(hidden_t, grad_rows).t(), alpha=s)
        grad_base = None
        if ctx.base_shape is not None and ctx.needs_input_grad[3]:
            grad_base = grad_output.reshape(ctx.base_shape)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_base, grad_A, grad_B, None, None


def _slot_layout(adapter_ids: torch.Tensor, layouts: dict | None) -> tuple[int, int, torch.Tensor]:
    """(highest slot + 1, most rows sharing one slot, each row's index among the rows of its slot (batch,))."""
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


class AdapterSelection(threading.local):
    """Which slot each example of the running batch uses: set by MixedLoraModel around a forward or
    generate call and read by its layers (per thread, so threads can run batches of their own)."""

    adapter_ids: torch.Tensor | None = None  # (batch,)
    single_id: int | None = None  # set when every example uses the same slot
    layouts: dict | None = None  # rows arranged by slot, computed once per batch (see gathered_lora_update)


def _read_selection(selection: AdapterSelection, where: str) -> torch.Tensor:
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
        ids = _read_selection(self.selection, "a mixed LoRA layer")
        single = self.selection.single_id
        if single is not None and int(self.ranks[single]) == 0:  # "no adapter", or one that leaves this layer alone
            return self.base_layer(x)
        if single is not None and self._merging_pays(x):
            # One adapter for every row, no autograd, many rows: W + s B A costs less than the low-rank side path.
            weight = torch.addmm(self.base_layer.weight, self.lora_B[single], self.lora_A[single], alpha=float(self.scaling[single]))
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
        """The layer's whole output from `_LoraRuns` (training on rows in a few runs of one adapter each), or
        None where that path does not apply: rows repeated by generate, dropout in a slot of the batch, a
        cast, hooks or autocast, a base layer that is not a plain Linear / Conv1D (quantized, say)."""
        layer = self.base_layer
        if (ids.shape[0] != x.shape[0] or type(layer) not in linear_types() or x.dtype != self.lora_A.dtype
                or layer.weight.dtype != x.dtype or layer._forward_hooks or layer._forward_pre_hooks
                or "forward" in layer.__dict__ or torch.is_autocast_enabled(x.device.type)):
            return None
        runs = _contiguous_runs(ids, self.selection.layouts)
        if runs is None or (self.training and any(float(self.dropout[slot]) > 0 for slot, _, _ in runs)):
            return None
        weight_rows = layer.weight if isinstance(layer, nn.Linear) else layer.weight.T  # Conv1D stores (in, out)
        output = _LoraRuns.apply(x, weight_rows, layer.bias, None, self.lora_A, self.lora_B, self.scaling, runs)
        return output.view(*x.shape[:-1], self.out_features)

    def _merging_pays(self, x: torch.Tensor) -> bool:
        if type(self.base_layer) is not nn.Linear or x.dtype != self.lora_A.dtype or torch.is_grad_enabled() or self.training:
            return False
        rows = x.numel() // self.in_features
        return rows * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def extra_repr(self) -> str:
        slots, rank, _ = self.lora_A.shape
        return f"in={self.in_features}, out={self.out_features}, slots={slots}, max_rank={rank}"


class MixedClassifierHead(nn.Module):
    """A classification head per slot: weight (slots, max_labels, in), bias (slots, max_labels),
    num_labels (slots,). forward(x (batch, ..., in)) -> logits (batch, ..., max_labels), -inf past each
    example's adapter's labels. Slot 0 holds a copy of the base model's head."""

    def __init__(self, base_head: nn.Linear, slots: int, max_labels: int, selection: AdapterSelection):
        super().__init__()
        weight = base_head.weight
        base_labels, in_features = weight.shape
        if max_labels < base_labels:
            raise PeftkitError(f"max_labels={max_labels} is below the base head's {base_labels} labels; use max_labels >= {base_labels}")
        self.in_features = in_features
        self.base_layer = base_head
        self.weight = nn.Parameter(torch.zeros(slots, max_labels, in_features, dtype=weight.dtype, device=weight.device))
        self.bias = nn.Parameter(torch.zeros(slots, max_labels, dtype=weight.dtype, device=weight.device))
        self.register_buffer("num_labels", torch.zeros(slots, dtype=torch.long, device=weight.device))
        object.__setattr__(self, "selection", selection)
        self.reset_slot(0)
        # "No adapter" keeps the base head: no gradient may reach slot 0.
        for parameter in (self.weight, self.bias):
            parameter.register_hook(_zero_slot_zero)

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """Put a copy of the base head into `slot`."""
        labels = self.base_layer.weight.shape[0]
        self.weight[slot].zero_()
        self.bias[slot].zero_()
        self.weight[slot, :labels] = self.base_layer.weight
        if self.base_layer.bias is not None:
            self.bias[slot, :labels] = self.base_layer.bias
        self.num_labels[slot] = labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = _read_selection(self.selection, "the mixed classification head")
        batch = x.shape[0]
        if ids.shape[0] != batch:
            if batch % ids.shape[0]:
                raise PeftkitError(f"adapter ids were given for {ids.shape[0]} examples but the head received {batch} rows")
            ids = ids.repeat_interleave(batch // ids.shape[0])
        max_labels = self.weight.shape[1]
        x3 = x.reshape(batch, -1, x.shape[-1]).to(self.weight.dtype)
        logits = torch.baddbmm(self.bias[ids].unsqueeze(1), x3, self.weight[ids].transpose(1, 2))
        beyond = torch.arange(max_labels, device=x.device) >= self.num_labels[ids].view(batch, 1, 1)
        logits = logits.masked_fill(beyond, float("-inf"))
        return logits.reshape(*x.shape[:-1], max_labels)

    def extra_repr(self) -> str:
        slots, labels, features = self.weight.shape
        return f"in={features}, slots={slots}, max_labels={labels}"


def _zero_slot_zero(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[0] = 0
    return grad


def _replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    *parents, child = path.split(".")
    parent = model
    for part in parents:
        parent = getattr(parent, part)
    setattr(parent, child, module)


def _lora_layer_tensors(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split a peft-layout LoRA file into {module path: (A (r, in), B (out, r))} and the other tensors
    {key without prefix: tensor}."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            raise PeftkitError(f"{source} holds {key}; mixed batches hold LoRA on Linear / GPT-2 Conv1D layers only "
                               "(no embeddings, no DoRA): run this adapter with PeftModel")
        short = key[len(io.KEY_PREFIX):] if key.startswith(io.KEY_PREFIX) else key
        for suffix in _LORA_SUFFIXES:
            if short.endswith(suffix):
                factors.setdefault(short[: -len(suffix)], {})[suffix] = tensor
                break
        else:
            others[short] = tensor
    pairs = {}
    for path, found in factors.items():
        if len(found) != 2:
            missing = [s.lstrip(".") for s in _LORA_SUFFIXES if s not in found]
            raise PeftkitError(f"{source}: module {path} has no {missing[0]}; the adapter file is incomplete")
        a, b = found[".lora_A.weight"], found[".lora_B.weight"]
        if a.dim() != 2 or b.dim() != 2:
            raise PeftkitError(
                f"{source}: module {path} has LoRA factors of shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                "mixed batches hold LoRA on Linear / GPT-2 Conv1D layers only (not Conv2d)"
            )
        pairs[path] = (a, b)
    return pairs, others


class MixedLoraModel(nn.Module):
    """A frozen base model plus `capacity` LoRA adapter slots, stored stacked (see the module docstring).

    base_model: a transformers (or plain PyTorch) model; it is changed in place (its targeted layers are
    replaced once) and frozen. target_modules: names, a regex or "all-linear", as in LoraConfig; every
    adapter's targets must lie within them. head: module path of a classification head (nn.Linear, e.g.
    "classifier") to stack per adapter; max_labels: the most labels an adapter's head may have (default:
    the base head's).
    """

    def __init__(self, base_model: nn.Module, target_modules, capacity: int, max_rank: int,
                 head: str | None = None, max_labels: int | None = None):
        super().__init__()
        if isinstance(base_model, MixedLoraModel) or hasattr(base_model, "peft_config") or any(
                isinstance(m, AdaptedModule) for m in base_model.modules()):
            raise PeftkitError("MixedLoraModel needs the plain base model, without adapters attached "
                               "(for a PeftModel's adapters, call it with adapter_names=[...] instead)")
        if not isinstance(capacity, int) or capacity < 1:
            raise PeftkitError(f"capacity must be a positive number of adapter slots, got {capacity!r}")
        if not isinstance(max_rank, int) or max_rank < 1:
            raise PeftkitError(f"max_rank must be a positive integer, got {max_rank!r}")
        self.base_model = base_model
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.capacity, self.max_rank, self.head_path = capacity, max_rank, head
        self.selection = AdapterSelection()
        skip = [head] if head else []
        targets = find_targets(base_model, target_modules, supported_types=linear_types(),
                               task_type="SEQ_CLS" if head else None, skip=skip)
        self.layers: dict[str, MixedLoraLinear] = {}
        for path in targets:
            layer = MixedLoraLinear(base_model.get_submodule(path), capacity + 1, max_rank, self.selection)
            _replace_module(base_model, path, layer)
            self.layers[path] = layer
        self.head: MixedClassifierHead | None = None
        if head is not None:
            try:
                base_head = base_model.get_submodule(head)
            except AttributeError:
                raise PeftkitError(f"head={head!r} is not a module of {type(base_model).__name__}") from None
            if not isinstance(base_head, nn.Linear):
                raise PeftkitError(f"head={head!r} is a {type(base_head).__name__}; a stacked head must be an nn.Linear")
            max_labels = base_head.out_features if max_labels is None else max_labels
            self.head = MixedClassifierHead(base_head, capacity + 1, max_labels, self.selection)
            _replace_module(base_model, head, self.head)
        self._slots: dict[str, int] = {}  # adapter name -> slot (1..capacity)
        self._configs: dict[str, LoraConfig] = {}
        self.train(base_model.training)  # transformers loads models in eval mode; the new layers follow

    # -- construction from folders ---------------------------------------------------------------
    @classmethod
    def from_adapter_folders(cls, base_model: nn.Module, folders: dict[str, str | Path], capacity: int | None = None,
                             max_rank: int | None = None) -> MixedLoraModel:
        """A MixedLoraModel sized for these peft-layout LoRA folders ({name: folder}), with all of them loaded.

        Targets are the union of the adapters' modules, max_rank their largest rank, and a classification
        head is stacked when an adapter saves one (modules_to_save "classifier" or "score")."""
        if not folders:
            raise PeftkitError("from_adapter_folders needs at least one {name: folder}")
        targets: set[str] = set()
        rank, head, labels = 1, None, None
        read = {}
        for name, folder in folders.items():
            config, tensors = _read_lora_folder(folder)
            pairs, others = _lora_layer_tensors(tensors, os.fspath(folder))
            targets.update(pairs)
            rank = max([rank, *(a.shape[0] for a, _ in pairs.values())])
            saved = {key.rsplit(".", 1)[0] for key in others}
            if len(saved) == 1 and next(iter(saved)) in CLASSIFIER_HEAD_NAMES and others.get(next(iter(saved)) + ".weight") is not None:
                head = next(iter(saved))  # its own classification head; anything else is refused by load_adapter
                labels = max(labels or 0, others[head + ".weight"].shape[0])
            read[name] = (folder, tensors)
        if max_rank is not None and max_rank < rank:
            raise PeftkitError(f"max_rank={max_rank} is below the largest adapter rank {rank}; use max_rank >= {rank}")
        if head is not None:
            base_labels = base_model.get_submodule(head).weight.shape[0] if _has_module(base_model, head) else 0
            labels = max(labels, base_labels)
        model = cls(base_model, sorted(targets), capacity or len(folders), max_rank or rank, head=head, max_labels=labels)
        for name, (folder, tensors) in read.items():
            model.load_adapter(name, folder, tensors=tensors)
        return model

    # -- slots -----------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Loaded adapter names in slot order."""
        return sorted(self._slots, key=self._slots.get)

    def slot(self, name: str) -> int:
        """The slot that holds adapter `name` (0 for BASE_ADAPTER)."""
        if name == BASE_ADAPTER:
            return 0
        if name not in self._slots:
            raise PeftkitError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapter_names) or 'none'} "
                               f"(and {BASE_ADAPTER!r} for the base model)")
        return self._slots[name]

    def adapter_ids(self, names: Sequence[str]) -> torch.Tensor:
        """Slot ids (batch,) for one adapter name per example; BASE_ADAPTER -> 0."""
        if isinstance(names, str):
            raise PeftkitError("adapter_names must be a list with one adapter name per example, not a string")
        return torch.tensor([self.slot(n) for n in names], dtype=torch.long, device=self._device())

    def num_labels(self, name: str) -> int | None:
        """Number of labels of the adapter's head; None without a stacked head."""
        slot = self.slot(name)
        return None if self.head is None else int(self.head.num_labels[slot])

    def config(self, name: str) -> LoraConfig:
        """The adapter's LoraConfig (target_modules resolved to module paths)."""
        self.slot(name)
        return self._configs[name]

    def adapter_bytes(self, name: str) -> int:
        """Bytes of the adapter's own tensors (unpadded factors, and its head)."""
        slot = self.slot(name)
        total = 0
        for layer in self.layers.values():
            total += int(layer.ranks[slot]) * (layer.in_features + layer.out_features) * layer.lora_A.element_size()
        if self.head is not None and self._has_own_head(name):
            labels = int(self.head.num_labels[slot])
            total += labels * (self.head.in_features + 1) * self.head.weight.element_size()
        return total

    def slot_parameters(self) -> list[nn.Parameter]:
        """The stacked trainable tensors, dim 0 = slot (lora_A, lora_B of each layer, then the head's)."""
        parameters = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        if self.head is not None:
            parameters += [self.head.weight, self.head.bias]
        return parameters

    def _free_slot(self, name: str) -> int:
        io.check_adapter_name(name)
        if name == BASE_ADAPTER:
            raise PeftkitError(f"{BASE_ADAPTER!r} is reserved for 'no adapter'; pick another name")
        if name in self._slots:
            raise PeftkitError(f"adapter {name!r} is already loaded (slot {self._slots[name]}); remove_adapter it first or pick another name")
        used = set(self._slots.values())
        for slot in range(1, self.capacity + 1):
            if slot not in used:
                return slot
        raise PeftkitError(
            f"all {self.capacity} adapter slots are taken ({', '.join(self.adapter_names)}); remove_adapter one, "
            "or build the MixedLoraModel with a larger capacity"
        )

    def load_adapter(self, name: str, folder: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None) -> int:
        """Copy the LoRA adapter saved in `folder` (peftkit's or peft's layout) into a free slot; returns it.

        tensors: the contents of the folder's adapter_model.safetensors when already in memory (keys as in
        the file); the config is read from the folder. Nothing is changed when the adapter does not fit.
        """
        slot = self._free_slot(name)
        folder = os.fspath(folder)
        config, file_tensors = _read_lora_folder(folder, read_tensors=tensors is None)
        file_tensors = file_tensors if tensors is None else tensors
        pairs, others = _lora_layer_tensors(file_tensors, folder)
        unknown = sorted(set(pairs) - set(self.layers))
        if unknown:
            raise PeftkitError(
                f"{folder} adapts {unknown[:5]}{' ...' if len(unknown) > 5 else ''}, which this MixedLoraModel does not "
                f"target (it targets {len(self.layers)} modules, e.g. {list(self.layers)[:3]}); build it with "
                "target_modules covering the adapter's (or use MixedLoraModel.from_adapter_folders)"
            )
        for path, (a, b) in pairs.items():
            layer = self.layers[path]
            expected_a, expected_b = (a.shape[0], layer.in_features), (layer.out_features, a.shape[0])
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise PeftkitError(
                    f"{folder}: module {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} but this base model "
                    f"needs lora_A {expected_a} and lora_B {expected_b}: the adapter was made for another base model"
                )
            if a.shape[0] > self.max_rank:
                raise PeftkitError(
                    f"{folder}: rank {a.shape[0]} at {path} > max_rank {self.max_rank} of this MixedLoraModel; build it "
                    f"with max_rank >= {a.shape[0]}"
                )
        head = self._check_head_tensors(others, config, folder)
        scalings = {}
        for path, (a, _) in pairs.items():
            rank = _pattern_value(path, config.rank_pattern, config.r)
            if rank != a.shape[0]:
                raise PeftkitError(f"{folder}: module {path} holds rank {a.shape[0]} but the config says r={rank}")
            alpha = _pattern_value(path, config.alpha_pattern, config.lora_alpha)
            scalings[path] = lora_scaling(alpha, rank, config.use_rslora)
        with torch.no_grad():
            for path, layer in self.layers.items():
                if path in pairs:
                    a, b = pairs[path]
                    self._fill_layer_slot(layer, slot, a, b, scalings[path], config.lora_dropout)
                else:
                    self._clear_layer_slot(layer, slot)
            if self.head is not None:
                if head is None:
                    self.head.reset_slot(slot)
                else:
                    self._fill_head_slot(slot, *head)
        self._slots[name] = slot
        self._configs[name] = config.replace(target_modules=sorted(pairs), inference_mode=True)
        return slot

    def add_adapter(self, name: str, config: LoraConfig, num_labels: int | None = None) -> int:
        """A fresh trainable adapter in a free slot, initialised as LoRA (A kaiming-uniform or gaussian, B = 0).

        config.target_modules selects among this model's targeted layers. num_labels: give this adapter its
        own head with that many labels (random, std = the model's initializer_range or 0.02); None copies
        the base head. Returns the slot."""
        slot = self._free_slot(name)
        if not isinstance(config, LoraConfig):
            raise PeftkitError(f"MixedLoraModel holds LoRA adapters only; got a {type(config).__name__}")
        _refuse_lora_variants(config, f"adapter {name!r}")
        paths = self._select_layers(config)
        ranks = {p: _pattern_value(p, config.rank_pattern, config.r) for p in paths}
        too_big = {p: r for p, r in ranks.items() if r > self.max_rank}
        if too_big:
            path, rank = next(iter(too_big.items()))
            raise PeftkitError(f"rank {rank} at {path} > max_rank {self.max_rank} of this MixedLoraModel; use r <= {self.max_rank}")
        if num_labels is not None:
            if self.head is None:
                raise PeftkitError("num_labels needs a stacked head: build the MixedLoraModel with head='classifier' (or 'score')")
            if not 1 <= num_labels <= self.head.weight.shape[1]:
                raise PeftkitError(f"num_labels={num_labels} is outside 1..max_labels={self.head.weight.shape[1]} of this model")
        with torch.no_grad():
            for path, layer in self.layers.items():
                if path not in paths:
                    self._clear_layer_slot(layer, slot)
                    continue
                rank = ranks[path]
                a = torch.empty(rank, layer.in_features, dtype=torch.float32)
                if config.init_lora_weights == "gaussian":
                    nn.init.normal_(a, std=1 / rank)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b = torch.zeros(layer.out_features, rank)
                if config.init_lora_weights is False:  # a model that changes at once (for tests)
                    nn.init.normal_(b, std=0.02)
                alpha = _pattern_value(path, config.alpha_pattern, config.lora_alpha)
                self._fill_layer_slot(layer, slot, a, b, lora_scaling(alpha, rank, config.use_rslora), config.lora_dropout)
            if self.head is not None:
                if num_labels is None:
                    self.head.reset_slot(slot)
                else:
                    std = getattr(getattr(self.base_model, "config", None), "initializer_range", 0.02)
                    weight = torch.randn(num_labels, self.head.in_features) * std
                    self._fill_head_slot(slot, weight, torch.zeros(num_labels))
        self._slots[name] = slot
        modules_to_save = [self.head_path] if num_labels is not None else None
        self._configs[name] = config.replace(target_modules=sorted(paths), modules_to_save=modules_to_save,
                                             task_type="SEQ_CLS" if num_labels is not None else config.task_type)
        return slot

    def remove_adapter(self, name: str) -> None:
        """Zero the adapter's slot and free it (the layers stay in place)."""
        if name == BASE_ADAPTER:
            raise PeftkitError(f"{BASE_ADAPTER!r} is the base model itself and cannot be removed")
        slot = self.slot(name)
        with torch.no_grad():
            for layer in self.layers.values():
                self._clear_layer_slot(layer, slot)
            if self.head is not None:
                self.head.reset_slot(slot)
        del self._slots[name]
        del self._configs[name]

    def save_adapter(self, name: str, folder: str | os.PathLike) -> None:
        """Write the adapter in the peft layout (adapter_config.json + adapter_model.safetensors) into `folder`,
        loadable by PeftModel.load_adapter, Hugging Face peft and `peftkit eval`."""
        slot = self.slot(name)
        config = self._configs[name]
        tensors = {}
        for path, layer in self.layers.items():
            rank = int(layer.ranks[slot])
            if rank:
                tensors[f"{io.KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A[slot, :rank]
                tensors[f"{io.KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B[slot, :, :rank]
        if self.head is not None and self._has_own_head(name):
            labels = int(self.head.num_labels[slot])
            tensors[f"{io.KEY_PREFIX}{self.head_path}.weight"] = self.head.weight[slot, :labels]
            tensors[f"{io.KEY_PREFIX}{self.head_path}.bias"] = self.head.bias[slot, :labels]
        data = config.to_dict()
        data["inference_mode"] = True
        if not data.get("base_model_name_or_path"):
            model_config = getattr(self.base_model, "config", None)
            data["base_model_name_or_path"] = getattr(model_config, "_name_or_path", None) or None
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        io.write_tensors(os.path.join(folder, io.WEIGHTS_NAME), tensors)
        io.write_json(os.path.join(folder, io.CONFIG_NAME), data)

    # -- running ---------------------------------------------------------------------------------
    def forward(self, *args, adapter_ids: torch.Tensor | None = None, adapter_names: Sequence[str] | None = None, **kwargs):
        """The base model's output with each example run by its own adapter (one id or name per example)."""
        if self.head is not None and kwargs.get("labels") is not None:
            raise PeftkitError(
                "a stacked head gives each adapter its own number of labels, so the base model cannot compute the "
                "loss: call without labels and use torch.nn.functional.cross_entropy(output.logits, labels) "
                "(the -inf logits past an adapter's labels drop out of it)"
            )
        with self._selected(adapter_ids, adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_ids: torch.Tensor | None = None, adapter_names: Sequence[str] | None = None, **kwargs):
        """The base model's generate with each row decoded by its own adapter; other arguments pass through."""
        with self._selected(adapter_ids, adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def _selected(self, adapter_ids, adapter_names):
        if (adapter_ids is None) == (adapter_names is None):
            raise PeftkitError("pass exactly one of adapter_ids (a (batch,) tensor of slots) or adapter_names "
                               f"(one name per example; {BASE_ADAPTER!r} for none)")
        ids = self.adapter_ids(adapter_names) if adapter_names is not None else self._check_ids(adapter_ids)
        return _Selecting(self.selection, ids)

    def _check_ids(self, adapter_ids) -> torch.Tensor:
        ids = torch.as_tensor(adapter_ids, device=self._device())
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise PeftkitError(f"adapter_ids must be a 1-D integer tensor (batch,), got {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.capacity):
            raise PeftkitError(f"adapter_ids must lie in 0..{self.capacity} (slots of this model), got {ids.tolist()}")
        return ids.long()

    # -- inside ----------------------------------------------------------------------------------
    def _select_layers(self, config: LoraConfig) -> list[str]:
        target = config.target_modules
        if target is None:
            raise PeftkitError("target_modules is not set: give module names, a regex, or 'all-linear'")
        paths = list(self.layers)
        if not (isinstance(target, str) and target.lower() == ALL_LINEAR):
            paths = [p for p in paths if name_matches(p, target)]
        if config.layers_to_transform is not None:
            wanted = {config.layers_to_transform} if isinstance(config.layers_to_transform, int) else set(config.layers_to_transform)
            paths = [p for p in paths if layer_index(p, config.layers_pattern) in wanted]
        if config.exclude_modules:
            paths = [p for p in paths if not name_matches(p, config.exclude_modules)]
        if not paths:
            raise PeftkitError(f"target_modules={target!r} selects none of this MixedLoraModel's {len(self.layers)} targeted "
                               f"layers (e.g. {list(self.layers)[:3]}); build it with target_modules covering the adapter's")
        return paths

    def _check_head_tensors(self, others: dict[str, torch.Tensor], config: LoraConfig, folder: str):
        """(weight, bias) of the adapter's own head, or None; refuses any other saved module."""
        if not others:
            return None
        if self.head is None or any(not k.startswith(self.head_path + ".") for k in others):
            modules = sorted({k.rsplit(".", 1)[0] for k in others})
            where = f"a stacked head only (head={self.head_path!r})" if self.head is not None else "no stacked head"
            raise PeftkitError(
                f"{folder} also saves modules {modules} (modules_to_save or trained biases); this MixedLoraModel has "
                f"{where}. Mixed batches hold LoRA factors plus one classification head per adapter: build it with "
                "head='<head module>', or run this adapter with PeftModel"
            )
        weight = others.get(self.head_path + ".weight")
        if weight is None or weight.dim() != 2 or weight.shape[1] != self.head.in_features:
            raise PeftkitError(f"{folder}: head {self.head_path}.weight has shape {None if weight is None else tuple(weight.shape)} "
                               f"but this model's head needs (num_labels, {self.head.in_features}): the adapter was made for "
                               "another base model")
        if weight.shape[0] > self.head.weight.shape[1]:
            raise PeftkitError(f"{folder}: the head has {weight.shape[0]} labels > max_labels {self.head.weight.shape[1]} "
                               f"of this MixedLoraModel; build it with max_labels >= {weight.shape[0]}")
        bias = others.get(self.head_path + ".bias", torch.zeros(weight.shape[0]))
        return weight, bias

    def _has_own_head(self, name: str) -> bool:
        return bool(self._configs[name].modules_to_save)

    @staticmethod
    def _fill_layer_slot(layer: MixedLoraLinear, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        rank = a.shape[0]
        layer.lora_A[slot].zero_()
        layer.lora_B[slot].zero_()
        layer.lora_A[slot, :rank] = a.to(layer.lora_A)
        layer.lora_B[slot, :, :rank] = b.to(layer.lora_B)
        layer.scaling[slot] = scaling
        layer.dropout[slot] = dropout
        layer.ranks[slot] = rank

    @staticmethod
    def _clear_layer_slot(layer: MixedLoraLinear, slot: int) -> None:
        layer.lora_A[slot].zero_()
        layer.lora_B[slot].zero_()
        layer.scaling[slot] = 0
        layer.dropout[slot] = 0
        layer.ranks[slot] = 0

    def _fill_head_slot(self, slot: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        labels = weight.shape[0]
        self.head.weight[slot].zero_()
        self.head.bias[slot].zero_()
        self.head.weight[slot, :labels] = weight.to(self.head.weight)
        self.head.bias[slot, :labels] = bias.to(self.head.bias)
        self.head.num_labels[slot] = labels

    def _device(self) -> torch.device:
        for parameter in self.base_model.parameters():
            return parameter.device
        return torch.device("cpu")


class _Selecting:
    """Context manager: the selection holds these ids inside the block and is cleared after, even on error."""

    def __init__(self, selection: AdapterSelection, ids: torch.Tensor):
        self.selection, self.ids = selection, ids

    def __enter__(self):
        ids = self.ids
        first = int(ids[0]) if ids.numel() else 0
        self.selection.adapter_ids = ids
        self.selection.layouts = {}
        self.selection.single_id = first if ids.numel() and bool((ids == first).all()) else None
        return self

    def __exit__(self, *exc):
        self.selection.adapter_ids = None
        self.selection.layouts = None
        self.selection.single_id = None
        return False


def _refuse_lora_variants(config: LoraConfig, source: str) -> None:
    if config.use_dora:
        raise PeftkitError(f"{source} is a DoRA adapter (use_dora=True); mixed batches hold plain LoRA only. "
                           "Run it with PeftModel, or merge_and_unload it into its own base model")
    if config.init_lora_weights == "pissa":
        raise PeftkitError(f"{source} uses PiSSA (init_lora_weights='pissa'), which changes the base weights; "
                           "save it with peftkit (which writes the equivalent plain LoRA) and load that")
    if config.bias != "none":
        raise PeftkitError(f"{source} trains biases (bias={config.bias!r}), which change the shared base; mixed "
                           "batches hold LoRA factors only: run it with PeftModel")
    if config.fan_in_fan_out:
        raise PeftkitError(f"{source} sets fan_in_fan_out=True; mixed batches read the layout from the layer itself: "
                           "save the adapter with fan_in_fan_out=False")


def _read_lora_folder(folder, read_tensors: bool = True) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    folder = os.fspath(folder)
    config = load_config(folder)
    if not isinstance(config, LoraConfig):
        raise PeftkitError(f"{folder} holds a {config.peft_type} adapter; mixed batches hold LoRA adapters only: "
                           "run it with PeftModel.load_adapter")
    _refuse_lora_variants(config, folder)
    tensors = io.read_tensors(os.path.join(folder, io.WEIGHTS_NAME)) if read_tensors else {}
    return config, tensors


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


# -- PeftModel(..., adapter_names=[...]) ----------------------------------------------------------------

# The block below installs hooks on the shared modules, so two threads inside it at once would mix their
# batches' adapters; calls with adapter_names therefore take turns (threads of one process, any model).
_ADAPTER_NAMES_LOCK = threading.RLock()


@contextmanager
def running_adapter_names(peft_model, adapter_names: Sequence[str]) -> Iterator[None]:
    """Inside this block, each example of a PeftModel's batch runs with its own named LoRA adapter.

    adapter_names: one adapter name per example, BASE_ADAPTER for none (Hugging Face peft's keyword).
    Every adapted module computes its base output and adds the example's LoRA update with
    `gathered_lora_update` over the named adapters' factors stacked (zero-padded to the largest rank);
    a `modules_to_save` copy (a classification head) replaces the rows of its own adapter's examples.
    Without gradients the stacks are kept and reused while the adapters' weights are unchanged.
    Only plain LoRA on Linear / GPT-2 Conv1D (plus modules_to_save) can be mixed, as in peft.
    Calls from several threads take turns (a lock); a plain forward of the same model from another
    thread while one runs is not safe, as for any module whose state is changing.
    """
    with _ADAPTER_NAMES_LOCK:
        yield from _running_adapter_names(peft_model, adapter_names)


def _running_adapter_names(peft_model, adapter_names: Sequence[str]) -> Iterator[None]:
    names = _checked_names(peft_model, adapter_names)
    used = [n for n in dict.fromkeys(names) if n != BASE_ADAPTER]
    example_slots = torch.tensor([0 if n == BASE_ADAPTER else 1 + used.index(n) for n in names], dtype=torch.long)
    modules = list(adapted_modules(peft_model.base_model))
    hooks, disabled = [], []
    layouts: dict = {}  # rows arranged by slot, shared by every layer of this call
    try:
        for path, module in modules:
            running = _module_runner(peft_model, path, module, used, example_slots, layouts)
            disabled.append((module, module.disabled))
            module.disabled = True  # the base layer alone; the hook adds each example's adapter
            if running is not None:
                hooks.append(module.register_forward_hook(running, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, was_disabled in disabled:
            module.disabled = was_disabled


def _checked_names(peft_model, adapter_names) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise PeftkitError("adapter_names must be a list with one adapter name (str) per example, "
                           f"{BASE_ADAPTER!r} for the base model")
    names = list(adapter_names)
    if not names:
        raise PeftkitError("adapter_names is empty; give one adapter name per example")
    if getattr(peft_model, "_disabled", False):
        raise PeftkitError("adapter_names cannot be used inside disable_adapter(); use the name "
                           f"{BASE_ADAPTER!r} for examples that should run without an adapter")
    for name in dict.fromkeys(names):
        if name == BASE_ADAPTER:
            continue
        if name not in peft_model.peft_config:
            known = ", ".join(peft_model.peft_config) or "none"
            raise PeftkitError(f"no adapter named {name!r}; adapters on this model: {known} (and {BASE_ADAPTER!r})")
        config = peft_model.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise PeftkitError(f"adapter {name!r} is {config.peft_type}; adapter_names mixes LoRA adapters only. "
                               "Run it with set_adapter in a batch of its own")
        try:
            _refuse_lora_variants(config, f"adapter {name!r}")
        except PeftkitError as error:
            raise PeftkitError(f"{error} (or run it with set_adapter in a batch of its own)") from None
        if name in peft_model.model_adapters:
            raise PeftkitError(f"adapter {name!r} holds model-level state; adapter_names mixes plain LoRA adapters only")
    for _, module in adapted_modules(peft_model.base_model):
        if module.merged_adapters:
            raise PeftkitError(f"adapters {module.merged_adapters} are merged into the base weights; unmerge_adapter() "
                               "before running a batch with adapter_names")
    return names


def _module_runner(peft_model, path: str, module: AdaptedModule, used: list[str], example_slots: torch.Tensor,
                   layouts: dict):
    """The forward hook that adds each example's adapter to this module's base output, or None."""
    present = [n for n in used if n in module.adapters]
    if not present:
        return None
    for name in present:
        delta = module.adapters[name]
        plain = type(delta) is LoraLinearDelta and not delta.pissa and delta.delta_bias is None
        if not plain and not isinstance(delta, ReplacementDelta):
            raise PeftkitError(f"adapter {name!r} on {path} is a {type(delta).__name__}; adapter_names mixes LoRA on "
                               "Linear / GPT-2 Conv1D layers (and modules_to_save) only. Run it with set_adapter in a "
                               "batch of its own")
    lora_names = [n for n in present if isinstance(module.adapters[n], LoraLinearDelta)]
    replacements = {1 + used.index(n): module.adapters[n] for n in present if isinstance(module.adapters[n], ReplacementDelta)}
    stacks = _stacked_factors(peft_model, path, module, used, lora_names) if lora_names else None

    def hook(_module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        ids = example_slots.to(x.device)
        if stacks is not None:
            lora_A, lora_B, scaling, dropout, local = stacks
            output = gathered_lora_update(x, lora_A, lora_B, scaling, local.to(x.device)[ids], output,
                                          dropout if module.training else None, layouts=layouts)
        if replacements:
            if len(args) + len(kwargs) != 1:
                raise PeftkitError(f"modules_to_save module {path} takes several inputs; it cannot be mixed per example")
            rows = ids.repeat_interleave(x.shape[0] // ids.shape[0]) if x.shape[0] != ids.shape[0] else ids
            for slot, delta in replacements.items():
                chosen = (rows == slot).nonzero().flatten()
                if chosen.numel():
                    output = output.index_put((chosen,), delta(x[chosen]).to(output.dtype))
        return output

    return hook


def _stacked_factors(peft_model, path: str, module: AdaptedModule, used: list[str], lora_names: list[str]):
    """(lora_A (n, R, in), lora_B (n, out, R), scaling (n,), dropout (n,), local (len(used) + 1,)) for one module:
    slot 0 is zeros; `local` maps an example's slot (0 = base, 1 + index in `used`) to a row of the stack."""
    if torch.is_grad_enabled() and any(module.adapters[n].lora_A.requires_grad for n in lora_names):
        stacked = _stack([module.adapters[n] for n in lora_names])  # differentiable, only the named ones
        order = lora_names
    else:
        # Without gradients: a stack of all this module's plain LoRA adapters, kept while their weights stay.
        order = [n for n, d in module.adapters.items() if type(d) is LoraLinearDelta and not d.pissa and d.delta_bias is None]
        deltas = [module.adapters[n] for n in order]
        key = tuple((n, id(d.lora_A), id(d.lora_B), d.lora_A._version, d.lora_B._version, d.scaling,
                     d.dropout.p if isinstance(d.dropout, nn.Dropout) else 0.0) for n, d in zip(order, deltas))
        cache = peft_model.__dict__.setdefault("_mixed_stacks", {})
        if path not in cache or cache[path][0] != key:
            with torch.no_grad():
                cache[path] = (key, _stack(deltas))
        stacked = cache[path][1]
    local = torch.zeros(len(used) + 1, dtype=torch.long)
    for name in lora_names:
        local[1 + used.index(name)] = 1 + order.index(name)
    return (*stacked, local)


def _stack(deltas: list[LoraLinearDelta]):
    rank = max(d.lora_A.shape[0] for d in deltas)
    first = deltas[0].lora_A
    zeros_A = first.new_zeros(1, rank, first.shape[1])
    zeros_B = first.new_zeros(1, deltas[0].lora_B.shape[0], rank)
    lora_A = torch.cat([zeros_A, *(F.pad(d.lora_A, (0, 0, 0, rank - d.lora_A.shape[0])).unsqueeze(0) for d in deltas)])
    lora_B = torch.cat([zeros_B, *(F.pad(d.lora_B, (0, rank - d.lora_B.shape[1])).unsqueeze(0) for d in deltas)])
    scaling = torch.tensor([0.0, *(d.scaling for d in deltas)], device=first.device)
    dropout = torch.tensor([0.0, *(d.dropout.p if isinstance(d.dropout, nn.Dropout) else 0.0 for d in deltas)], device=first.device)
    return lora_A, lora_B, scaling, dropout
