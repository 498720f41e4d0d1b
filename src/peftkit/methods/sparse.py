"""Sparse fine-tuning: train a small, chosen set of entries of the frozen weights.

For each targeted weight W (nn.Linear, GPT-2's Conv1D, or a pointwise (1x1, stride 1, ungrouped)
nn.Conv2d, whose weight (out, in, 1, 1) acts on every pixel's channels as a linear layer) the adapter
holds `indices`, flat positions into W as stored (row-major), and trained `values` at those positions:

    y = base(x) + x @ D^T,   D = zeros_like(W) with D.view(-1)[indices] = values

(for Conv1D, whose weight is stored (in, out), y = base(x) + x @ D; for a pointwise conv the channel
dimension of x plays the role of the features). Merging is exact:
W.view(-1)[indices] += values.

Which entries train is chosen by an importance score over the targeted weights, keeping the top
`budget` of them: "magnitude" |W| (chosen at wrap time, no data needed), "gradient" |sum of the
loss gradients| over a few calibration batches, or "fisher" the sum of squared gradients (the
empirical Fisher information). The last two need data: `PeftModel.prepare_training(batches)` (the
training loop calls it before the first step) runs the calibration passes and picks the entries.
`scope="global"` keeps one top-k over all targeted weights, so modules with more important entries
get more of them; `scope="per_module"` gives every module a share proportional to its size.

The number of trained values is fixed when the adapter is attached (from the budget and the weight
sizes alone), so an optimizer can be built before the entries are chosen: every module's values are
a slice of one vector, `values`, held by the model-level adapter (`SparseModelAdapter`). With a
global scope the split of that vector across modules is known only after scoring.

Files hold, for each adapted module, `base_model.model.<path>.sparse_indices` (int32 where the
weight has fewer than 2**31 entries, else int64) and `base_model.model.<path>.sparse_values`, so an
adapter file's size is proportional to the budget. Hugging Face `peft` has no such method; this
layout is peftkit's own.

The forward pass, on CPU in float32/float64, multiplies by D as a CSR sparse matrix built from the
k values (torch's autograd takes the gradient to the values). Measured on CPU (one thread, a
minilm-sized BERT, 0.5% budget, batch 32 x 48 tokens, forward + backward): 2.08 s with CSR, 2.43 s
with the alternative of writing the values into a zero matrix (index_put over k entries) and one
dense F.linear; COO sparse and a gather/index_add formulation were no faster than the dense one
per layer. Torch has no CPU CSR matmul for bfloat16/float16, so those use the dense D, as do GPUs
(not measured). Both paths cost more than the entry count suggests: full fine-tuning of the same
model took 1.54 s and LoRA r=8 1.47 s; one matmul with W + D instead of base(x) + x @ D^T would cost
about what full fine-tuning does, but needs a delta that replaces the base computation.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdapterDelta, Attached, ModelAdapter, attach_delta, iter_base_modules, shadow_parameter
from peftkit.targeting import find_targets, linear_types

IMPORTANCE_KINDS = ("magnitude", "gradient", "fisher")
SCOPES = ("global", "per_module")
INT32_LIMIT = 2**31 - 1
# dtypes whose CSR matmul torch implements on CPU; others (bfloat16, float16) and GPUs use a dense D
SPARSE_MATMUL_DTYPES = (torch.float32, torch.float64)


@register_config
@dataclasses.dataclass
class SparseConfig(PeftConfig):
    """Sparse fine-tuning of chosen weight entries (peftkit's own method; peft has none).

    budget: a float in (0, 1] is the share of the targeted weights' entries that train; an int >= 1
    is their count. importance: "magnitude" (|W|, chosen at wrap time), "gradient" (|accumulated
    gradient| over the calibration batches) or "fisher" (accumulated squared gradients).
    num_calibration_batches: batches scored by "gradient" / "fisher" in prepare_training.
    scope: "global" (one top-k over all targeted weights) or "per_module" (the budget split across
    modules in proportion to their size). target_modules: names, a regex, or "all-linear" (every
    Linear / Conv1D but the output layer). modules_to_save: modules trained whole (a new classifier head).
    """

    peft_type = "SPARSE"

    budget: float | int = 0.01
    importance: Literal["magnitude", "gradient", "fisher"] = "gradient"
    num_calibration_batches: int = 8
    scope: Literal["global", "per_module"] = "global"
    target_modules: list[str] | str | None = "all-linear"
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self):
        if isinstance(self.importance, str) and self.importance not in IMPORTANCE_KINDS:
            raise PeftkitError(
                f"SparseConfig.importance must be one of {', '.join(map(repr, IMPORTANCE_KINDS))}, got {self.importance!r}"
            )
        if isinstance(self.scope, str) and self.scope not in SCOPES:
            raise PeftkitError(f"SparseConfig.scope must be one of {', '.join(map(repr, SCOPES))}, got {self.scope!r}")
        super().validate()
        if isinstance(self.budget, int):
            if self.budget < 1:
                raise PeftkitError(
                    f"SparseConfig.budget must be > 0: a share in (0, 1] (a float) or a count >= 1 (an int), got {self.budget}"
                )
        elif self.budget > 1.0:
            raise PeftkitError(
                f"SparseConfig.budget={self.budget} is a sparse budget above 100% of the targeted weights; as a float "
                "it is a share in (0, 1]. For a count of entries give an int (budget=1000)."
            )
        elif not self.budget > 0:
            raise PeftkitError(
                f"SparseConfig.budget must be > 0: a share in (0, 1] (a float) or a count >= 1 (an int), got {self.budget}"
            )
        if self.num_calibration_batches < 1:
            raise PeftkitError(f"SparseConfig.num_calibration_batches must be >= 1, got {self.num_calibration_batches}")


def entry_counts(sizes: list[int], budget: float | int, scope: str) -> tuple[int, list[int] | None]:
    """(total trained entries, per-module counts) for weights of `sizes` entries.

    The per-module counts are None for a global scope (scores decide them). For per_module, counts
    are proportional to the sizes and add up to the total (largest remainders get the leftovers).
    """
    available = sum(sizes)
    if isinstance(budget, int):
        total = budget
        if total > available:
            raise PeftkitError(
                f"SparseConfig.budget={budget} entries is more than the targeted weights hold ({available:,d}); "
                "lower the budget or target more modules"
            )
    else:
        total = min(available, max(1, round(budget * available)))
    if scope == "global":
        return total, None
    counts = [total * size // available for size in sizes]
    remainders = [total * size % available for size in sizes]
    leftover = total - sum(counts)
    for position in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[:leftover]:
        counts[position] += 1
    return total, counts


def top_entries(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Sorted positions of the `count` largest entries of 1-D `scores`; ties go to lower positions."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    threshold = torch.topk(scores, count, sorted=False).values.min()
    above = (scores > threshold).nonzero().squeeze(1)
    tied = (scores == threshold).nonzero().squeeze(1)[: count - above.numel()]
    return torch.cat([above, tied]).sort().values


class SparseDelta(AdapterDelta):
    """The trained entries of one weight: `indices` (k,) int64 flat positions into the weight as
    stored, values = the slice [offset, offset + k) of the model-level adapter's `values`."""

    def __init__(self, base_layer: nn.Module, owner: SparseModelAdapter):
        super().__init__()
        weight = base_layer.weight
        # A pointwise conv's weight (out, in, 1, 1) is a linear layer's (out, in) over the channels.
        self.pointwise = isinstance(base_layer, nn.Conv2d)
        # GPT-2's Conv1D stores its weight as (in, out) and computes x @ W; nn.Linear stores (out, in).
        self.transposed = not isinstance(base_layer, (nn.Linear, nn.Conv2d))
        self.weight_shape = tuple(weight.shape[:2])
        self.register_buffer("indices", torch.zeros(0, dtype=torch.int64, device=weight.device))
        self.offset = 0
        # A plain list, not a submodule: the values belong to the model-level adapter, listed once.
        self._owner = [owner]
        self._loaded_values: torch.Tensor | None = None
        self._csr_cache = None

    @property
    def owner(self) -> SparseModelAdapter:
        return self._owner[0]

    @property
    def count(self) -> int:
        return self.indices.numel()

    def values(self) -> torch.Tensor:
        """This module's trained values, (k,), a view of the shared vector (gradients flow to it)."""
        return self.owner.values[self.offset : self.offset + self.count]

    def delta_weight(self) -> torch.Tensor:
        """D in the base weight's layout, with the values at `indices` and zeros elsewhere."""
        values = self.values()
        flat = values.new_zeros(self.weight_shape[0] * self.weight_shape[1])
        return flat.index_put((self.indices,), values).view(self.weight_shape)

    def forward(self, x, base_output):
        owner = self.owner
        if not owner.chosen and self.training and torch.is_grad_enabled() and owner.values.requires_grad:
            raise PeftkitError(owner.not_chosen_message())
        if self.count == 0:
            return base_output
        values = self.values()
        x = x.to(values.dtype)
        if self.pointwise:  # channels last, so the update is a linear map of each pixel's channels
            x = x.movedim(1, -1)
        if values.device.type == "cpu" and values.dtype in SPARSE_MATMUL_DTYPES:
            update = self._sparse_update(x, values)
        else:
            delta = self.delta_weight()
            update = F.linear(x, delta.T if self.transposed else delta)
        if self.pointwise:
            update = update.movedim(-1, 1)
        return base_output + update.to(base_output.dtype)

    def _sparse_update(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x @ D^T through a CSR matrix D (out, in): x (..., in) -> (..., out)."""
        row_starts, columns, order = self._csr_layout()
        out_features = row_starts.numel() - 1
        in_features = x.shape[-1]
        with warnings.catch_warnings():  # torch calls its CSR support "beta" once per process
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(row_starts, columns, values[order], (out_features, in_features),
                                             check_invariants=False)
            flat = x.reshape(-1, in_features)
            return (matrix @ flat.T).T.reshape(*x.shape[:-1], out_features)

    def _csr_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row starts (out + 1,), column of each entry (k,), order of the values (k,)) of D as (out, in),
        computed once per set of indices."""
        cached = self._csr_cache
        if cached is not None and cached[0] is self.indices and cached[1] == self.indices._version:
            return cached[2]
        rows, columns = self.indices // self.weight_shape[1], self.indices % self.weight_shape[1]
        out_features, in_features = self.weight_shape
        if self.transposed:  # stored (in, out): the stored row is the input, the column the output
            rows, columns, out_features, in_features = columns, rows, in_features, out_features
        order = (rows * in_features + columns).argsort()
        row_starts = torch.zeros(out_features + 1, dtype=torch.int64, device=rows.device)
        row_starts[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        layout = (row_starts, columns[order], order)
        self._csr_cache = (self.indices, self.indices._version, layout)
        return layout

    def extra_repr(self) -> str:
        return f"entries={self.count}, weight={self.weight_shape}"

    @torch.no_grad()
    def merge(self, base_layer):
        # put_ indexes the weight as if flattened row-major, whatever its strides.
        base_layer.weight.put_(self.indices, self.values().to(base_layer.weight.dtype), accumulate=True)

    @torch.no_grad()
    def unmerge(self, base_layer):
        base_layer.weight.put_(self.indices, -self.values().to(base_layer.weight.dtype), accumulate=True)

    def file_tensors(self, base_layer):
        fits = self.weight_shape[0] * self.weight_shape[1] <= INT32_LIMIT
        return {
            "sparse_indices": self.indices.to(torch.int32 if fits else torch.int64),
            "sparse_values": self.values().detach(),
        }

    def load_file_tensors(self, tensors, base_layer, where):
        """Take indices and values from a file; the model-level adapter then gathers the values."""
        indices, values = tensors["sparse_indices"], tensors["sparse_values"]
        size = self.weight_shape[0] * self.weight_shape[1]
        if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
            raise PeftkitError(
                f"{where}: sparse_indices {tuple(indices.shape)} and sparse_values {tuple(values.shape)} must be "
                "1-D and of the same length"
            )
        if indices.is_floating_point() or indices.is_complex():
            raise PeftkitError(f"{where}.sparse_indices must hold integers, found {indices.dtype}")
        indices = indices.to(device=self.indices.device, dtype=torch.int64)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
            raise PeftkitError(
                f"{where}.sparse_indices holds positions outside the weight's {size:,d} entries "
                f"{self.weight_shape}: this adapter was made for another base model"
            )
        order = indices.argsort()
        indices, values = indices[order], values.to(self.indices.device)[order]
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise PeftkitError(f"{where}.sparse_indices lists a position twice; the file is damaged")
        self.indices = indices
        self._loaded_values = values


class SparseModelAdapter(ModelAdapter):
    """Holds `values`, the trained entries of every targeted weight (total,), and chooses them.

    Each module's SparseDelta reads its slice. Until the entries are chosen every slice is empty, so
    the model computes exactly the base; training in that state raises (see `not_chosen_message`).
    """

    def __init__(self, config: SparseConfig, adapter_name: str, total: int, counts: list[int] | None,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = config
        self.adapter_name = adapter_name
        self.counts = counts  # per-module counts, fixed for scope="per_module"
        # Changes of existing weights: counted as trainable, not as extra parameters of the model.
        self.values = shadow_parameter(torch.zeros(total, dtype=dtype, device=device))
        self.chosen = False
        self.deltas: list[tuple[str, SparseDelta, nn.Module]] = []  # (path, delta, base layer)

    def extra_repr(self) -> str:
        return (f"entries={self.values.numel()}, importance={self.config.importance!r}, "
                f"scope={self.config.scope!r}, chosen={self.chosen}")

    def not_chosen_message(self) -> str:
        return (
            f"sparse adapter {self.adapter_name!r} has not chosen which weight entries to train yet "
            f"(importance={self.config.importance!r} scores them on data): call "
            "model.prepare_training(batches) with a few training batches before training (peftkit.train "
            "does this for you), or use importance='magnitude', which chooses when the adapter is attached"
        )

    # -- choosing ----------------------------------------------------------------------------------
    def prepare_training(self, model, batches) -> None:
        """Choose the entries from `batches` unless they are chosen already (magnitude, a loaded file)."""
        if not self.chosen:
            self.choose_entries(model, batches)

    def choose_entries(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]] | None = None) -> None:
        """Score the targeted weights, keep the top entries, and start their values at zero.

        `model` is the base model with its adapters (PeftModel.base_model); `batches` (dicts for
        model(**batch), with labels) are needed for "gradient" and "fisher" importance. Overwrites
        entries chosen before.
        """
        self._assign([torch.zeros(0, dtype=torch.int64, device=self.values.device)] * len(self.deltas))
        self.chosen = False
        flat_scores = self._scores(model, batches)  # (total targeted entries,) float32
        sizes = [delta.weight_shape[0] * delta.weight_shape[1] for _, delta, _ in self.deltas]
        starts = [0, *itertools.accumulate(sizes)]
        if not torch.isfinite(flat_scores).all():
            raise PeftkitError(
                f"sparse adapter {self.adapter_name!r}: the importance scores are not finite (the calibration "
                "loss is inf or nan); check the batches and the model before choosing entries"
            )
        if self.counts is None:  # one top-k over every targeted weight
            chosen = top_entries(flat_scores, self.values.numel())
            bounds = torch.searchsorted(chosen, torch.tensor(starts, device=chosen.device))
            per_module = [chosen[bounds[i] : bounds[i + 1]] - starts[i] for i in range(len(sizes))]
        else:
            per_module = [top_entries(flat_scores[starts[i] : starts[i + 1]], self.counts[i]) for i in range(len(sizes))]
        del flat_scores
        self._assign(per_module)
        with torch.no_grad():
            self.values.zero_()
        self.chosen = True

    def _assign(self, per_module: list[torch.Tensor]) -> None:
        offset = 0
        for (_, delta, _), indices in zip(self.deltas, per_module):
            delta.indices = indices.to(device=delta.indices.device, dtype=torch.int64)
            delta.offset = offset
            offset += indices.numel()

    def _scores(self, model: nn.Module, batches) -> torch.Tensor:
        """Importance of every entry of the targeted weights, concatenated in module order."""
        weights = [base_layer.weight for _, _, base_layer in self.deltas]
        sizes = [weight.numel() for weight in weights]
        scores = torch.zeros(sum(sizes), dtype=torch.float32, device=self.values.device)
        views = list(torch.split(scores, sizes))
        if self.config.importance == "magnitude":
            for view, weight in zip(views, weights):
                view.copy_(weight.detach().reshape(-1).abs())
            return scores
        batches = self._calibration_batches(model, batches)
        fisher = self.config.importance == "fisher"
        # Only the targeted base weights collect gradients, and only for these passes.
        parameters = list(model.parameters()) + [self.values]
        requires_grad = [p.requires_grad for p in parameters]
        unique_weights = list({id(w): w for w in weights}.values())
        saved_grads = [w.grad for w in unique_weights]
        modes = [(module, module.training) for module in model.modules()]
        try:
            for parameter in parameters:
                parameter.requires_grad_(False)
            for weight in unique_weights:
                weight.requires_grad_(True)
                weight.grad = None
            # Evaluation mode: no dropout, so the choice depends on the batches alone.
            model.eval()
            with torch.enable_grad():
                for batch in batches:
                    _loss_of(model(**batch), self.adapter_name).backward()
                    # Summed into the float32 scores (squared for Fisher); the gradients go at once.
                    for view, weight in zip(views, weights):
                        if weight.grad is not None:
                            gradient = weight.grad.reshape(-1).float()
                            view.add_(gradient.square() if fisher else gradient)
                    for weight in unique_weights:
                        weight.grad = None
            if not fisher:
                scores.abs_()
        finally:
            for weight, grad in zip(unique_weights, saved_grads):
                weight.grad = grad
            for parameter, flag in zip(parameters, requires_grad):
                parameter.requires_grad_(flag)
            for module, training in modes:
                module.training = training
        return scores

    def _calibration_batches(self, model: nn.Module, batches) -> list[dict]:
        if batches is None:
            raise PeftkitError(
                f"sparse adapter {self.adapter_name!r} (importance={self.config.importance!r}) needs calibration "
                "batches: call prepare_training(batches) with an iterable of batches (dicts for model(**batch), "
                "with labels), or use importance='magnitude'"
            )
        taken = list(itertools.islice(iter(batches), self.config.num_calibration_batches))
        if not taken:
            raise PeftkitError(
                f"sparse adapter {self.adapter_name!r}: prepare_training got no batches to score the weights on"
            )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()} for batch in taken]

    # -- files -------------------------------------------------------------------------------------
    def load_file_tensors(self, tensors, where) -> None:
        """Gather the values each module read from the file into `values` (called after the modules)."""
        loaded = [delta._loaded_values for _, delta, _ in self.deltas]
        if any(values is None for values in loaded):
            return
        counts = [values.numel() for values in loaded]
        expected = self.values.numel()
        if sum(counts) == 0:  # saved before its entries were chosen
            self._assign([torch.zeros(0, dtype=torch.int64)] * len(self.deltas))
            self.chosen = False
        else:
            if sum(counts) != expected or (self.counts is not None and counts != self.counts):
                raise PeftkitError(
                    f"{where} holds {sum(counts):,d} sparse entries"
                    + ("" if self.counts is None else " split differently across modules")
                    + f", but its config (budget={self.config.budget}, scope={self.config.scope!r}) on this model "
                    f"gives {expected:,d}: the file was saved from another base model or config"
                )
            offset = 0
            with torch.no_grad():
                for (_, delta, _), values in zip(self.deltas, loaded):
                    self.values[offset : offset + values.numel()].copy_(values)
                    delta.offset = offset
                    offset += values.numel()
            self.chosen = True
        for _, delta, _ in self.deltas:
            delta._loaded_values = None


def _loss_of(output, adapter_name: str) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise PeftkitError(
            f"sparse adapter {adapter_name!r}: the model returned no loss on a calibration batch; the batches "
            "must hold 'labels' so that model(**batch).loss exists"
        )
    return loss


def add_adapter(model: nn.Module, config: SparseConfig, adapter_name: str, skip: list[str]) -> Attached:
    """Attach sparse deltas to the modules `config` selects; magnitude importance chooses at once."""
    targets = find_targets(
        model, config.target_modules, exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform, layers_pattern=config.layers_pattern,
        supported_types=(*linear_types(), nn.Conv2d), task_type=config.task_type, skip=skip,
    )
    modules = dict(iter_base_modules(model))
    for name in targets:
        _check_pointwise(name, modules[name])
    weights = [modules[name].weight for name in targets]
    total, counts = entry_counts([w.numel() for w in weights], config.budget, config.scope)
    owner = SparseModelAdapter(config, adapter_name, total, counts, weights[0].dtype, weights[0].device)
    for name in targets:
        delta = attach_delta(model, name, adapter_name, lambda base_layer: SparseDelta(base_layer, owner))
        owner.deltas.append((name, delta, modules[name]))
    if config.importance == "magnitude":
        owner.choose_entries(model)
    return Attached(targets, owner)

def _check_pointwise(name: str, module: nn.Module) -> None:
    if not isinstance(module, nn.Conv2d):
        return
    pointwise = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
                 and module.padding in ((0, 0), "valid") and module.dilation == (1, 1))
    if not pointwise:
        raise PeftkitError(
            f"module {name!r} is a Conv2d with kernel {module.kernel_size}, stride {module.stride}, groups {module.groups}; "
            "sparse fine-tuning adapts nn.Linear, GPT-2 Conv1D and pointwise (1x1, stride 1, ungrouped) Conv2d layers: "
            "leave it out of target_modules (or exclude_modules it)"
        )


# How `peftkit train` trains it: 2% of the linear weights' entries (215k, 0.95% of minilm), chosen by
# |gradient| over 8 batches; the chosen entries move like full fine-tuning's weights but need a larger rate
# to do it in 2 epochs.
METHODS = (Method("sparse", SparseConfig, dict(budget=0.02, importance="gradient", target_modules="all-linear"),
                  learning_rate=1e-3),)
