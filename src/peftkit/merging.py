"""Adapter arithmetic: combine several adapters into one LoRA, and compose adapters at run time.

Merging works in delta space. Each input adapter k is first turned into its full update of every
layer it touches, delta_k = W_k - W (for LoRA, s_k B_k A_k; for any mergeable method, what merging
it would add to the weight; see `peftkit.export.layer_updates`). The chosen method combines the
deltas of each layer, value by value, and a truncated SVD factors the result back into a plain LoRA
of one rank, with the relative (Frobenius) error of that step reported per layer and overall.
Working on the full updates avoids the cross-terms that summing LoRA factors would create
((B_1 + B_2)(A_1 + A_2) is not B_1 A_1 + B_2 A_2).

Methods (`weights` w_k, `density` d, as in Hugging Face peft's `add_weighted_adapter`):
- linear (= task arithmetic): sum_k w_k delta_k.
- magnitude_prune: keep the int(d * numel) largest-magnitude values of each delta_k, then the weighted sum.
- ties (Yadav et al., 2023): trim each delta_k as above; elect a sign per value from the trimmed
  (unweighted) deltas, "total" (sign of their sum) or "frequency" (sign of the count of signs);
  then average the weighted values that agree with that sign (zeros and disagreeing values left out).
- dare_linear (Yu et al., 2024): drop each value with probability 1 - d and rescale the rest by
  1 / d (seeded), then the weighted sum.
- dare_ties: DARE's drop and rescale, then TIES's sign election and disjoint mean.

Adapters must adapt the same base model. A layer present in some inputs only counts as a zero
update in the others; a layer whose shape differs between inputs is refused. Whole modules an
adapter trains (`modules_to_save`, such as a classification head) are task-specific and are not
merged: the combined adapter has none unless `head` names the input whose head to attach (what
evaluating one task with a merged adapter needs).

Run-time composition (no new adapter is written):
- stacking: `model.set_adapter([a, b])` makes both active; each adapted layer applies them in that
  order on the same input, so LoRA updates add up (y = W x + s_a B_a A_a x + s_b B_b A_b x) and
  multiplicative methods (IA3) compose. Of two trained heads, the first active adapter's is used.
- `average_outputs(model, names, weights, **inputs)`: one forward pass per adapter, outputs averaged.
- per-example routing: `model(**inputs, adapter_names=[...])` (one adapter name per example, "__base__"
  for none; see peftkit.mixed) runs every example through its own adapter in one batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import io
from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.export import LoraConversion, factor_updates, layer_updates
from peftkit.methods.base import adapted_modules, iter_base_modules
from peftkit.model import PeftModel
from peftkit.targeting import CLASSIFIER_HEAD_NAMES, name_matches

__all__ = [
    "COMBINE_METHODS", "CombinedAdapter", "average_outputs", "combine_adapters", "merge_tensors", "merge_updates",
    "resolve_adapter_folder", "save_combined",
]

COMBINE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_USES_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN_RULES = ("total", "frequency")
BASE_ADAPTER = "__base__"  # peft's name for "no adapter", as in peftkit.mixed


# -- arithmetic on tensors -------------------------------------------------------------------------
def check_combine_options(method: str, count: int, weights: Sequence[float] | None, density: float | None,
                          majority_sign: str = "total") -> list[float]:
    """Validate the options of a combination of `count` adapters; returns the weights (default 1 each)."""
    if method not in COMBINE_METHODS:
        raise PeftkitError(f"unknown combine method {method!r}; methods: {', '.join(COMBINE_METHODS)}")
    if count < 1:
        raise PeftkitError("nothing to combine: give at least one adapter")
    if majority_sign not in MAJORITY_SIGN_RULES:
        raise PeftkitError(f"unknown majority sign rule {majority_sign!r}; rules: {', '.join(MAJORITY_SIGN_RULES)}")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise PeftkitError(f"{len(weights)} weights for {count} adapters: give one weight per adapter, in the same order")
    if not all(math.isfinite(w) for w in weights):
        raise PeftkitError(f"weights must be finite numbers, got {weights}")
    if method in _USES_DENSITY:
        if density is None:
            raise PeftkitError(f"method {method!r} needs a density: the fraction of each update's values kept, in (0, 1], e.g. 0.5")
        if not 0.0 < float(density) <= 1.0:
            raise PeftkitError(f"density must be in (0, 1] (the fraction of values kept), got {density}")
    elif density is not None:
        raise PeftkitError(f"density applies to {', '.join(_USES_DENSITY)}; method {method!r} keeps every value: drop the density")
    return weights


def magnitude_trim(update: torch.Tensor, density: float) -> torch.Tensor:
    """`update` with all but its int(density * numel) largest-magnitude values set to zero (same shape)."""
    if density >= 1.0:
        return update
    keep = int(density * update.numel())
    mask = torch.zeros(update.numel(), dtype=update.dtype, device=update.device)
    mask[update.abs().flatten().topk(keep).indices] = 1
    return update * mask.view_as(update)


def random_drop(update: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: each value kept with probability `density` and divided by it (same shape, same mean)."""
    if density >= 1.0:
        return update
    keep = torch.bernoulli(torch.full_like(update, density), generator=generator)
    return update * keep / density


def majority_sign_mask(trimmed: torch.Tensor, rule: str = "total") -> torch.Tensor:
    """(n, *shape) bool: which values of the n stacked updates carry the elected sign of their position.

    rule "total": the sign of the values' sum; "frequency": the sign with more nonzero values. Ties go to +.
    Zeros never agree with the elected sign, so they do not count in the disjoint mean.
    """
    signs = trimmed.sign()
    mass = trimmed.sum(dim=0) if rule == "total" else signs.sum(dim=0)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def merge_tensors(updates: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, method: str = "linear",
                  density: float | None = None, majority_sign: str = "total",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine same-shape updates (each (*shape)) into one (*shape) by `method` (see the module docstring).

    generator: the random source of DARE's drops (drawn update by update, in order).
    """
    weights = check_combine_options(method, len(updates), [float(w) for w in weights], density, majority_sign)
    if method in ("ties", "magnitude_prune"):
        updates = [magnitude_trim(u, density) for u in updates]
    elif method in ("dare_linear", "dare_ties"):
        updates = [random_drop(u, density, generator) for u in updates]
    stacked = torch.stack(list(updates))
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        agree = majority_sign_mask(stacked, majority_sign)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return weighted.sum(dim=0)


def merge_updates(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                  method: str = "linear", density: float | None = None, majority_sign: str = "total",
                  seed: int = 0, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Combine per-layer updates (module path -> (out, in)) of several adapters, layer by layer.

    A layer missing from an adapter counts as zeros there. DARE draws from one generator seeded with
    `seed`, layers in sorted order, so a combination is repeatable. names: how errors call the inputs.
    """
    weights = check_combine_options(method, len(updates), weights, density, majority_sign)
    names = list(names) if names is not None else [f"adapter {i + 1}" for i in range(len(updates))]
    generator = torch.Generator().manual_seed(seed)
    combined = {}
    for path in sorted(set().union(*updates)):
        present = [(name, u[path]) for name, u in zip(names, updates) if path in u]
        first_name, first = present[0]
        for name, update in present[1:]:
            if update.shape != first.shape:
                raise PeftkitError(f"layer {path} has shape {tuple(first.shape)} in {first_name} but {tuple(update.shape)} "
                                   f"in {name}: adapters of different base models cannot be combined")
        layer = [u[path].float() if path in u else first.new_zeros(first.shape, dtype=torch.float32) for u in updates]
        # DARE's drops are drawn on the CPU generator; updates are small enough to combine there.
        combined[path] = merge_tensors([t.cpu() for t in layer], weights, method, density, majority_sign, generator)
    return combined


# -- combining adapters ----------------------------------------------------------------------------
@dataclasses.dataclass
class CombinedAdapter(LoraConversion):
    """A combination of adapters as one plain LoRA (`config`, `tensors` in peft keys), and how it was made.

    relative_errors: module path -> ||delta - B A|| / ||delta|| of the SVD step (Frobenius);
    update_norms: module path -> ||delta||, so the overall error weighs layers by their size.
    heads: per input, its trained whole modules (`modules_to_save`: module paths, peft-keyed tensors).
    """

    method: str = "linear"
    weights: list[float] = dataclasses.field(default_factory=list)
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    sources: list[str] = dataclasses.field(default_factory=list)
    update_norms: dict[str, float] = dataclasses.field(default_factory=dict)
    heads: list[tuple[list[str], dict[str, torch.Tensor]]] = dataclasses.field(default_factory=list)
    run_infos: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    task_types: list[str | None] = dataclasses.field(default_factory=list)
    base_model: str | None = None
    head_from: int | None = None

    @property
    def overall_relative_error(self) -> float:
        """sqrt(sum_l ||delta_l - B_l A_l||^2 / sum_l ||delta_l||^2) over all layers."""
        total = sum(n * n for n in self.update_norms.values())
        if total == 0:
            return 0.0
        residual = sum((self.relative_errors[p] * n) ** 2 for p, n in self.update_norms.items())
        return math.sqrt(residual / total)

    def head_index(self, head: int | str) -> int:
        """The position of an input given by position (0-based) or by the name/folder it was given as."""
        if isinstance(head, int) and not isinstance(head, bool):
            if not 0 <= head < len(self.sources):
                raise PeftkitError(f"head {head} is not an input position; inputs 0..{len(self.sources) - 1}: {self.sources}")
            return head
        wanted = [str(head), _canonical(head)]
        for index, source in enumerate(self.sources):
            if source in wanted or _canonical(source) in wanted:
                return index
        raise PeftkitError(f"head {head!r} is not one of the combined adapters: {', '.join(self.sources)}")

    def with_head(self, head: int | str) -> CombinedAdapter:
        """The same combination with input `head`'s trained whole modules (its classification head) attached."""
        index = self.head_index(head)
        paths, tensors = self.heads[index]
        if not paths:
            raise PeftkitError(f"{self.sources[index]} trains no whole module (no classification head) to attach")
        config = self.config.replace(modules_to_save=list(paths), task_type=self.task_types[index])
        lora = {k: v for k, v in self.tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
        return dataclasses.replace(self, config=config, tensors={**lora, **tensors}, head_from=index)

    def run_info(self) -> dict[str, Any]:
        """peftkit_run.json of the combined adapter: with a head, that input's run info (task, labels, ...)."""
        info = dict(self.run_infos[self.head_from]) if self.head_from is not None else {}
        if self.head_from is None and self.run_infos and self.run_infos[0].get("kind") == "causal":
            info["kind"] = "causal"
        if self.base_model is not None:
            info["model"] = self.base_model
        info.update(method="lora", full_finetune=False, combined=self.summary())
        return info

    def summary(self) -> dict[str, Any]:
        """What `peftkit_run.json` records about the combination (JSON-ready)."""
        return {
            "method": self.method, "weights": self.weights, "density": self.density,
            "majority_sign": self.majority_sign if self.method in ("ties", "dare_ties") else None,
            "seed": self.seed if self.method.startswith("dare") else None, "sources": self.sources, "rank": self.config.r,
            "overall_relative_error": self.overall_relative_error, "max_relative_error": self.max_relative_error,
            "relative_errors": dict(sorted(self.relative_errors.items())),
            "head_from": None if self.head_from is None else self.sources[self.head_from],
        }


def resolve_adapter_folder(path: str | os.PathLike) -> Path:
    """An adapter folder from an adapter folder or a run folder (runs/NAME, holding adapter/)."""
    folder = Path(path)
    if (folder / io.CONFIG_NAME).is_file():
        return folder
    if (folder / "adapter" / io.CONFIG_NAME).is_file():
        return folder / "adapter"
    if not folder.exists():
        raise PeftkitError(f"{folder} does not exist; give a run folder (runs/NAME) or an adapter folder (runs/NAME/adapter)")
    raise PeftkitError(f"{folder} holds no {io.CONFIG_NAME} (nor adapter/{io.CONFIG_NAME}); give a run or adapter folder "
                       "written by peftkit train or peft's save_pretrained")


def _canonical(path) -> str:
    try:
        return str(resolve_adapter_folder(path).resolve())
    except PeftkitError:
        return str(path)


@torch.no_grad()
def combine_adapters(adapters: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                     method: str = "linear", density: float | None = None, rank: int | None = None,
                     majority_sign: str = "total", seed: int = 0, model: PeftModel | None = None,
                     base_model: str | None = None, head: int | str | None = None) -> CombinedAdapter:
    """Combine adapters into one plain LoRA adapter (see the module docstring for the methods).

    adapters: names of adapters on `model`, or run / adapter folders (loaded onto `model`, else onto the
    base model their runs name, or `base_model`: a built-in model name or a model folder).
    rank: the LoRA rank of the result; default: the sum of the inputs' ranks (each one's largest
    per-layer numerical rank: r for LoRA), capped at the largest layer's full rank. Linear combinations
    of LoRAs are then exact up to float rounding; sparsified ones (TIES, DARE, pruning) are usually of
    full rank, and the reported error says how much of them the rank keeps. A rank above the largest
    layer's full rank is lowered to it (the result is then exact).
    head: attach this input's classification head (its position, or the name/folder given); default none.
    """
    weights = check_combine_options(method, len(adapters), weights, density, majority_sign)
    if rank is not None and rank < 1:
        raise PeftkitError(f"rank must be at least 1, got {rank}")
    sources = [os.fspath(a) for a in adapters]
    if model is not None and all(s in model.peft_config for s in sources):
        names, loaded = sources, []
        run_infos = [{} for _ in sources]
        task_types = [model.peft_config[s].task_type for s in sources]
        heads = [_head_tensors(model, s) for s in sources]
        base_id = base_model
    else:
        unknown = [s for s in sources if model is not None and s not in model.peft_config and not Path(s).exists()]
        if unknown:
            raise PeftkitError(f"{unknown[0]!r} is neither an adapter on this model ({', '.join(model.peft_config)}) "
                               "nor a run or adapter folder")
        model, names, run_infos, task_types, heads, base_id = _load_sources(sources, model, base_model)
        loaded = names
    try:
        updates = [layer_updates(model, name, skip_modules_to_save=True) for name in names]
        combined = merge_updates(updates, weights, method, density, majority_sign, seed, names=sources)
        layers = {path: module.base_layer for path, module in adapted_modules(model.base_model)}
        largest = max(min(u.shape) for u in combined.values())  # no layer can use a higher rank
        if rank is None:
            rank = sum(max(int(torch.linalg.matrix_rank(u)) for u in each.values()) for each in updates)
        rank = max(1, min(largest, rank))
        # Without its head a classification adapter is no longer one (SEQ_CLS makes loaders expect a head).
        task_type = "CAUSAL_LM" if set(task_types) == {"CAUSAL_LM"} else None
        conversion = factor_updates(combined, layers, rank=rank, task_type=task_type)
    finally:
        for name in loaded:
            if name in model.peft_config and len(model.peft_config) > 1:
                model.delete_adapter(name)
    result = CombinedAdapter(
        config=conversion.config, tensors=conversion.tensors, relative_errors=conversion.relative_errors,
        method=method, weights=weights, density=None if density is None else float(density),
        majority_sign=majority_sign, seed=seed, sources=sources,
        update_norms={p: float(u.norm()) for p, u in combined.items()}, heads=heads, run_infos=run_infos,
        task_types=task_types, base_model=base_id,
    )
    return result.with_head(head) if head is not None else result


def _head_tensors(model: PeftModel, name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The whole modules adapter `name` trains (module paths) and their tensors, peft-keyed."""
    paths = [p for p, m in adapted_modules(model.base_model) if name in m.adapters and m.adapters[name].replaces_base]
    state = model.adapter_state(name)
    return paths, {k: v.detach().clone() for k, v in state.items() if _under(k, paths)}


def _under(key: str, module_paths: Sequence[str]) -> bool:
    return any(key.startswith(f"{io.KEY_PREFIX}{p}.") for p in module_paths)


def _load_sources(sources: list[str], model: PeftModel | None, base_model: str | None):
    """Load adapter folders onto one model, without their heads (their label counts may differ).

    Returns (model, adapter names added, run infos, task types, heads read from the files, base model id).
    """
    from peftkit.train.job import read_run_info

    folders = [resolve_adapter_folder(s) for s in sources]
    configs = [load_config(f) for f in folders]
    run_infos = [read_run_info(f) for f in folders]
    for folder, info in zip(folders, run_infos):
        if info.get("full_finetune"):
            raise PeftkitError(f"{folder} holds a fully fine-tuned model, not an adapter: it has no update to combine")
    task_types = ["CAUSAL_LM" if info.get("kind") == "causal" else getattr(config, "task_type", None)
                  for info, config in zip(run_infos, configs)]
    named = [info.get("model") or config.to_dict().get("base_model_name_or_path") for info, config in zip(run_infos, configs)]
    base_id = base_model or _common_base(folders, named)
    base = None if model is not None else _load_base(base_id, task_types[0], run_infos[0])
    added: list[str] = []
    heads = []
    try:
        for index, (folder, config) in enumerate(zip(folders, configs)):
            name = f"combine_input_{index}"
            patterns = list(getattr(config, "modules_to_save", None) or [])
            if task_types[index] == "SEQ_CLS":
                patterns += [n for n in CLASSIFIER_HEAD_NAMES if n not in patterns]
            fields = {"task_type": None, **({"modules_to_save": None} if hasattr(config, "modules_to_save") else {})}
            if model is None:
                model = PeftModel(base, config.replace(**fields), name)
            else:
                model.add_adapter(name, config.replace(**fields))
            added.append(name)
            file_tensors = io.read_tensors(folder / io.WEIGHTS_NAME)
            head_paths = _head_modules(model, patterns)
            heads.append((head_paths, {k: v for k, v in file_tensors.items() if _under(k, head_paths)}))
            _fill_without_heads(model, name, folder, {k: v for k, v in file_tensors.items() if not _under(k, head_paths)})
    except BaseException:
        for name in added:
            if model is not None and name in model.peft_config and len(model.peft_config) > 1:
                model.delete_adapter(name)
        raise
    return model, added, run_infos, task_types, heads, base_id


def _common_base(folders: list[Path], named: list[str | None]) -> str:
    if any(n is None for n in named):
        missing = folders[named.index(None)]
        raise PeftkitError(f"{missing} does not say which base model it adapts; pass the base model (--model NAME_OR_FOLDER)")
    if len(set(named)) > 1:
        listed = "; ".join(f"{f}: {n}" for f, n in zip(folders, named))
        raise PeftkitError(f"the adapters name different base models ({listed}); adapters of different base models "
                           "cannot be combined. If these are the same model, pass it explicitly (--model NAME_OR_FOLDER)")
    return named[0]


def _load_base(name: str, task_type: str | None, info: dict) -> nn.Module:
    from peftkit import zoo

    if task_type == "CAUSAL_LM":
        return zoo.load_causal_lm(name)[0]
    labels = info.get("label_names")
    return zoo.load_classifier(name, num_labels=len(labels) if labels else 2, id2label=labels)[0]


def _head_modules(model: PeftModel, patterns: list[str]) -> list[str]:
    if not patterns:
        return []
    names = [n for n, _ in iter_base_modules(model.base_model) if n and name_matches(n, patterns)]
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _fill_without_heads(model: PeftModel, name: str, folder: Path, file_tensors: dict[str, torch.Tensor]) -> None:
    """Copy an adapter's file tensors (heads left out) into adapter `name`, layer by layer with shape checks."""
    if name in model.model_adapters:
        layer_updates(model, name)  # raises the clear "no weight update" error of prompt and prefix methods
    expected = model.adapter_state(name)
    missing = [k for k in expected if k not in file_tensors]
    unexpected = [k for k in file_tensors if k not in expected]
    if missing or unexpected:
        raise PeftkitError(
            f"{folder / io.WEIGHTS_NAME} does not fit the base model with its config: "
            + (f"{len(missing)} tensors missing (e.g. {missing[:3]}) " if missing else "")
            + (f"{len(unexpected)} tensors the model has no place for (e.g. {unexpected[:3]})" if unexpected else "")
            + "; was it saved from another base model?"
        )
    for module_path, module in adapted_modules(model.base_model):
        if name not in module.adapters:
            continue
        prefix = f"{io.KEY_PREFIX}{module_path}."
        delta = module.adapters[name]
        wanted = delta.file_tensors(module.base_layer)
        own = {suffix: file_tensors[prefix + suffix] for suffix in wanted}
        for suffix, target in wanted.items():
            if own[suffix].shape != target.shape:
                raise PeftkitError(f"layer {module_path}: {suffix} has shape {tuple(own[suffix].shape)} in {folder} but "
                                   f"the base model needs {tuple(target.shape)}: was it trained on another base model?")
        delta.load_file_tensors(own, module.base_layer, where=prefix.rstrip("."))


def save_combined(combined: CombinedAdapter, folder: str | os.PathLike) -> Path:
    """Write a combined adapter as a peft LoRA folder (adapter_config.json, adapter_model.safetensors) plus
    peftkit_run.json (the base model, the combination and its errors; with a head, that task's run info).

    The folder appears whole or not at all (written beside it, then renamed); an existing non-empty one is refused.
    """
    from peftkit.train.job import RUN_INFO_NAME

    folder = Path(folder)
    with io.new_folder(folder) as partial:
        io.write_adapter_folder(partial, {**combined.config.to_dict(), "base_model_name_or_path": combined.base_model},
                                combined.tensors, **{RUN_INFO_NAME: combined.run_info()})
    return folder


# -- composition at run time -----------------------------------------------------------------------
@contextmanager
def adapters_active(model: PeftModel, adapter_names: str | Sequence[str]):
    """Inside this block `adapter_names` are the active adapters ("__base__": none); the previous ones after."""
    previous = model.active_adapters
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    try:
        if names == [BASE_ADAPTER]:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(names)
            yield
    finally:
        if previous:
            model.set_adapter(previous)


def average_outputs(model: PeftModel, adapter_names: Sequence[str], weights: Sequence[float] | None = None,
                    output: str = "logits", probabilities: bool = False, **inputs) -> torch.Tensor:
    """Weighted average of the model's outputs under each adapter: sum_k w_k f_k(inputs).

    One forward pass per adapter on the same inputs ("__base__" runs the base model). weights: one per
    adapter, used as given (default 1/n each, a plain mean). output: the output field averaged
    ("logits"); probabilities: average softmax(logits, -1) instead (an ensemble's probabilities).
    Returns a tensor shaped like that output, e.g. (batch, num_labels). Gradients flow if enabled.
    """
    names = list(adapter_names)
    if not names:
        raise PeftkitError("average_outputs needs at least one adapter name")
    weights = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise PeftkitError(f"{len(weights)} weights for {len(names)} adapters: give one weight per adapter")
    for name in names:
        if name != BASE_ADAPTER and name not in model.peft_config:
            raise PeftkitError(f"no adapter named {name!r}; adapters on this model: {', '.join(model.peft_config)} "
                               f"(or {BASE_ADAPTER!r} for the base model)")
    total, first_shape = None, None
    for name, weight in zip(names, weights):
        with adapters_active(model, name):
            result = model(**inputs)
        value = result[output] if isinstance(result, Mapping) or hasattr(result, "keys") else getattr(result, output)
        if probabilities:
            value = value.float().softmax(-1)
        if total is None:
            total, first_shape = weight * value, (name, tuple(value.shape))
        elif tuple(value.shape) != first_shape[1]:
            raise PeftkitError(f"adapter {name!r} gives {output} of shape {tuple(value.shape)} but {first_shape[0]!r} "
                               f"gives {first_shape[1]}: outputs of different shapes (e.g. heads with different label "
                               "counts) cannot be averaged")
        else:
            total = total + weight * value
    return total
