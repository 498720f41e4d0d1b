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

The stacked layer (`MixedLoraLinear`) and its kernels (`gathered_lora_update`, `LoraRuns`) live in
`peftkit.methods.lora.mixed_batch`, which `PeftModel(..., adapter_names=[...])` uses as well
(`peftkit.methods.lora.adapter_names`); this module holds the model: slots, heads, files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from peftkit import io
from peftkit.config import load_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdaptedModule
from peftkit.methods.lora.config import LoraConfig, check_plain_lora, module_rank_and_scaling
from peftkit.methods.lora.layer import init_lora_factors
from peftkit.methods.lora.mixed_batch import (
    BASE_ADAPTER,
    AdapterSelection,
    MixedLoraLinear,
    gathered_lora_update,
    read_selection,
)
from peftkit.targeting import ALL_LINEAR, CLASSIFIER_HEAD_NAMES, find_targets, layer_index, linear_types, name_matches

__all__ = ["BASE_ADAPTER", "AdapterSelection", "MixedClassifierHead", "MixedLoraLinear", "MixedLoraModel",
           "gathered_lora_update"]

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


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
        ids = read_selection(self.selection, "the mixed classification head")
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
        return torch.tensor([self.slot(n) for n in names], dtype=torch.long, device=self.device)

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
            rank, scalings[path] = module_rank_and_scaling(config, path)
            if rank != a.shape[0]:
                raise PeftkitError(f"{folder}: module {path} holds rank {a.shape[0]} but the config says r={rank}")
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
        check_plain_lora(config, f"adapter {name!r}")
        paths = self._select_layers(config)
        ranks = {p: module_rank_and_scaling(config, p) for p in paths}  # path -> (rank, scaling)
        too_big = {p: r for p, (r, _) in ranks.items() if r > self.max_rank}
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
                rank, scaling = ranks[path]
                a = torch.empty(rank, layer.in_features, dtype=torch.float32)
                b = torch.empty(layer.out_features, rank)
                init_lora_factors(a, b, config.init_lora_weights)
                self._fill_layer_slot(layer, slot, a, b, scaling, config.lora_dropout)
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
        ids = torch.as_tensor(adapter_ids, device=self.device)
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

    @property
    def device(self) -> torch.device:
        """Where the base model's weights are (CPU for a model without parameters)."""
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


def _read_lora_folder(folder, read_tensors: bool = True) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    folder = os.fspath(folder)
    config = load_config(folder)
    if not isinstance(config, LoraConfig):
        raise PeftkitError(f"{folder} holds a {config.peft_type} adapter; mixed batches hold LoRA adapters only: "
                           "run it with PeftModel.load_adapter")
    check_plain_lora(config, folder)
    tensors = io.read_tensors(os.path.join(folder, io.WEIGHTS_NAME)) if read_tensors else {}
    return config, tensors


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
