"""The wrapper: a frozen base model plus named adapters, with save/load, merge/unmerge and unload.

Names follow Hugging Face `peft` so that code written for it moves over by changing the import:
`get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained`, `add_adapter`, `set_adapter`,
`delete_adapter`, `disable_adapter()`, `merge_and_unload`, `print_trainable_parameters`.
The wrapper never knows method details: methods attach deltas (see methods/base.py), the wrapper
switches, merges, saves and loads them.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftkit import io
from peftkit.config import PeftConfig, load_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import (
    Attached,
    ModelAdapter,
    ReplacementDelta,
    WholeModelMethod,
    adapted_modules,
    attach_delta,
    iter_base_modules,
    remove_wrapper,
)
from peftkit.methods.lora.adapter_names import running_adapter_names
from peftkit.registry import method_for, whole_model_method
from peftkit.targeting import CLASSIFIER_HEAD_NAMES, describe_module_names, name_matches


@dataclasses.dataclass
class ParameterReport:
    """Trainable parameters of a wrapped model: count, share of all parameters, bytes."""

    trainable: int
    total: int
    trainable_bytes: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        # The exact line Hugging Face peft prints, so the two can be compared by eye.
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {100 * self.share:.4f}"


class PeftModel(nn.Module):
    """A base model whose weights are frozen, plus one or more named adapters."""

    # transformers reads this to tell a quantized base that carries trainable adapters (which Trainer
    # trains) from a bare quantized model (which it refuses); see docs/trainers.md.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, PeftModel):
            raise PeftkitError("this model is already wrapped; use add_adapter to add another adapter")
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._inference_only: set[str] = set()
        self._targets: dict[str, list[str]] = {}  # adapter -> module paths its method adapts
        # adapter -> state of the whole model (virtual tokens, prefixes, shared projections)
        self.model_adapters = nn.ModuleDict()
        self._disabled = False
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)
        self._present_base_forward()

    # -- plumbing --------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with the adapter layers in it), as peft's get_base_model."""
        return self.base_model

    def _present_base_forward(self) -> None:
        # Hugging Face Trainer keeps only the dataset columns that `inspect.signature(model.forward)` names,
        # and finds the label columns from the signature of `type(model).forward`; for a peft model it asks
        # the base model instead, which it cannot do for ours. So the wrapper's class presents the base
        # model's forward signature (see _presenting_class).
        plain = getattr(type(self), "_plain_class", type(self))
        self.__class__ = _presenting_class(plain, type(self.base_model))

    def __reduce_ex__(self, protocol):
        # The presenting class is made at run time and cannot be found by name: pickle and deepcopy rebuild
        # the plain class, and __setstate__ presents the base model's forward again.
        reduced = super().__reduce_ex__(protocol)
        plain = getattr(type(self), "_plain_class", None)
        if plain is not None and reduced[0] is copyreg.__newobj__ and reduced[1][0] is type(self):
            reduced = (_new_instance, (plain, *reduced[1][1:]), *reduced[2:])
        return reduced

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._present_base_forward()

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward. adapter_names (peft's keyword): one LoRA adapter name per example,
        "__base__" for none; the examples then run together, each with its own adapter (peftkit.mixed)."""
        if adapter_names is not None:
            with running_adapter_names(self, adapter_names):
                return self.base_model(*args, **kwargs)
        owner = self._intercepting_adapter()
        if owner is not None:
            return owner(self.base_model, *args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None:  # one adapter per row, as in forward
            with running_adapter_names(self, adapter_names):
                return self.base_model.generate(*args, **kwargs)
        owner = self._intercepting_adapter()
        if owner is not None:
            if args:
                kwargs = {"input_ids": args[0], **kwargs}
            return owner.generate(self.base_model, **kwargs)
        return self.base_model.generate(*args, **kwargs)

    def _intercepting_adapter(self) -> ModelAdapter | None:
        """The active model-level adapter that runs the base model itself (prompt/prefix), if any."""
        if self._disabled:
            return None
        for name in self._active:
            owner = self.model_adapters[name] if name in self.model_adapters else None
            if owner is not None and owner.intercepts_forward:
                return owner
        return None

    # -- training hooks (called by peftkit.train; call them yourself in your own loop) -------------
    def prepare_training(self, batches) -> None:
        """Let the active adapters look at a few training batches first (sparse fine-tuning picks its weights)."""
        batches = _Replayable(batches)  # each adapter reads from the first batch on, even from a generator
        for name in self._active:
            if name in self.model_adapters and name not in self._inference_only:
                self.model_adapters[name].prepare_training(self.base_model, batches)

    def on_optimizer_step(self, step: int, total_steps: int) -> None:
        """Call after each optimizer step, before zero_grad (adaptive-rank LoRA reallocates its ranks)."""
        for name in self._active:
            if name in self.model_adapters and name not in self._inference_only:
                self.model_adapters[name].on_optimizer_step(step, total_steps)

    @property
    def is_full_finetune(self) -> bool:
        """True when the model trains the base's own weights (full fine-tuning) instead of adapters."""
        return self._whole_model_method() is not None

    def _whole_model_method(self) -> WholeModelMethod | None:
        """The method that trains the base model itself, where that is what this model holds (see registry)."""
        return next(filter(None, map(whole_model_method, self.peft_config.values())), None)

    # -- adapters --------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else ",".join(self._active)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Attach a new adapter (inactive unless it is the first one; see set_adapter)."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise PeftkitError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
        if not isinstance(peft_config, PeftConfig):
            raise PeftkitError(f"expected a peftkit config (LoraConfig, BitFitConfig, ...), got {type(peft_config).__name__}")
        whole_model = whole_model_method(peft_config) or self._whole_model_method()
        if whole_model is not None:
            if self.peft_config:
                raise whole_model.refuse("share")
            whole_model.attach(self.base_model)
            self.peft_config[adapter_name] = peft_config
            return
        if not self.peft_config:
            for parameter in self.base_model.parameters():
                parameter.requires_grad_(False)
        peft_config = self._with_task_defaults(peft_config)
        method = method_for(peft_config)
        try:
            saved = self._attach_modules_to_save(peft_config, adapter_name)
            attached = method.add_adapter(self.base_model, peft_config, adapter_name, skip=saved)
            if not isinstance(attached, Attached):
                attached = Attached(targets=list(attached))
            self._targets[adapter_name] = attached.targets
            if attached.model_adapter is not None:
                self.model_adapters[adapter_name] = attached.model_adapter.to(device=_device_of(self.base_model))
        except BaseException:
            self._detach(adapter_name)
            raise
        self.peft_config[adapter_name] = attached.config or peft_config
        self._apply_active_state()

    def _with_task_defaults(self, config: PeftConfig) -> PeftConfig:
        # As in peft: a sequence-classification task trains its (new) head whole.
        if config.task_type != "SEQ_CLS" or not hasattr(config, "modules_to_save"):
            return config
        heads = [n for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(self.base_model, n, None), nn.Module)]
        current = list(config.modules_to_save or [])
        missing = [h for h in heads if h not in current]
        return config.replace(modules_to_save=current + missing) if missing else config

    def _attach_modules_to_save(self, config: PeftConfig, adapter_name: str) -> list[str]:
        patterns = getattr(config, "modules_to_save", None)
        if not patterns:
            return []
        names = [n for n, _ in iter_base_modules(self.base_model) if n and name_matches(n, patterns)]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
        if not names:
            raise PeftkitError(
                f"modules_to_save={patterns} matched no module; module names in this model: "
                f"{describe_module_names(self.base_model)}"
            )
        for name in names:
            attach_delta(self.base_model, name, adapter_name, ReplacementDelta)
        return names

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (their outputs add up) and trainable; all others are inactive."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require_adapter(name)
        intercepting = [n for n in names if n in self.model_adapters and self.model_adapters[n].intercepts_forward]
        if len(intercepting) > 1:
            raise PeftkitError(
                f"adapters {intercepting} each run the base model with their own virtual tokens or prefixes; "
                "only one of them can be active at a time"
            )
        self._active = names
        self._apply_active_state()

    def _apply_active_state(self) -> None:
        for _, module in adapted_modules(self.base_model):
            module.active_adapters = list(self._active)
            for name, delta in module.adapters.items():
                trainable = name in self._active and name not in self._inference_only
                for parameter_name, parameter in delta.named_parameters():
                    parameter.requires_grad_(trainable and parameter_name not in delta.frozen_parameters)
        for name, owner in self.model_adapters.items():
            trainable = name in self._active and name not in self._inference_only
            for parameter in owner.parameters():
                parameter.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require_adapter(adapter_name)
        whole_model = self._whole_model_method()
        if whole_model is not None:
            raise whole_model.refuse("delete")
        for _, module in adapted_modules(self.base_model):
            if adapter_name in module.merged_adapters:
                raise PeftkitError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        self._detach(adapter_name)
        del self.peft_config[adapter_name]
        self._targets.pop(adapter_name, None)
        self._inference_only.discard(adapter_name)
        self._active = [n for n in self._active if n != adapter_name]
        self._apply_active_state()

    def _detach(self, adapter_name: str) -> None:
        for path, module in list(adapted_modules(self.base_model)):
            if adapter_name in module.adapters:
                del module.adapters[adapter_name]
            if len(module.adapters) == 0:
                remove_wrapper(self.base_model, path, module.base_layer)
        if adapter_name in self.model_adapters:
            del self.model_adapters[adapter_name]

    def _require_adapter(self, name: str) -> None:
        if name not in self.peft_config:
            known = ", ".join(self.peft_config) or "none"
            raise PeftkitError(f"no adapter named {name!r}; adapters on this model: {known}")

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes exactly what the base model computes."""
        whole_model = self._whole_model_method()
        if whole_model is not None:
            raise whole_model.refuse("disable")
        modules = [m for _, m in adapted_modules(self.base_model)]
        if any(m.merged_adapters for m in modules):
            raise PeftkitError("an adapter is merged into the base weights; call unmerge_adapter() before disable_adapter()")
        for module in modules:
            module.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for module in modules:
                module.disabled = False

    # -- merging ---------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' updates into the base weights (default: the active adapters)."""
        names = self._active if adapter_names is None else adapter_names
        for name in names:
            self._require_adapter(name)
            owner = self.model_adapters[name] if name in self.model_adapters else None
            if owner is not None and not owner.mergeable:
                raise PeftkitError(f"adapter {name!r} ({self.peft_config[name].peft_type}) cannot be merged: {owner.merge_refusal}")
        for path, module in adapted_modules(self.base_model):  # refuse before touching any weight
            for name in names:
                delta = module.adapters[name] if name in module.adapters else None
                if delta is not None and not delta.mergeable and name not in module.merged_adapters:
                    raise PeftkitError(f"adapter {name!r} cannot be merged into {path} "
                                       f"({type(module.base_layer).__name__}): {delta.merge_refusal}")
        self._refuse_tied_merge(names)
        for _, module in adapted_modules(self.base_model):
            for name in names:
                module.merge(name)

    def _refuse_tied_merge(self, names: list[str]) -> None:
        # A weight shared by two modules (GPT-2's token embedding and LM head) would change in both.
        owners: dict[int, list[str]] = {}
        for module_name, module in iter_base_modules(self.base_model):
            for parameter_name, parameter in module._parameters.items():
                if parameter is not None:
                    owners.setdefault(id(parameter), []).append(f"{module_name}.{parameter_name}")
        for path, module in adapted_modules(self.base_model):
            weight = getattr(module.base_layer, "weight", None)
            touched = [n for n in names if n in module.adapters and not module.adapters[n].replaces_base]
            if touched and weight is not None and len(owners.get(id(weight), [])) > 1:
                raise PeftkitError(
                    f"cannot merge adapter {touched[0]!r} into {path}: its weight is tied to "
                    f"{[o for o in owners[id(weight)] if not o.startswith(path + '.')]}, which would change too. "
                    "Keep this adapter unmerged, or leave the tied embedding out of target_modules."
                )

    def unmerge_adapter(self) -> None:
        """Take every merged update back out of the base weights."""
        for _, module in adapted_modules(self.base_model):
            for name in reversed(list(module.merged_adapters)):
                module.unmerge(name)

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the adapters into the base and return the plain base model (no wrappers left)."""
        if self.is_full_finetune:  # the trained weights are the base's own: nothing to merge
            return self.base_model
        self.merge_adapter(adapter_names)
        return self._unwrap()

    def unload(self) -> nn.Module:
        """Return the base model without any adapter (updates are not merged)."""
        self.unmerge_adapter()
        return self._unwrap()

    def _unwrap(self) -> nn.Module:
        for path, module in reversed(list(adapted_modules(self.base_model))):
            remove_wrapper(self.base_model, path, module.base_layer)
        self.peft_config.clear()
        self.model_adapters = nn.ModuleDict()
        self._active = []
        return self.base_model

    # -- parameters ------------------------------------------------------------------------------
    def trainable_parameters_report(self) -> ParameterReport:
        trainable = total = trainable_bytes = 0
        for parameter in self.parameters():
            count = parameter.numel()
            if not getattr(parameter, "shadows_base_parameter", False):
                total += count
            if parameter.requires_grad:
                trainable += count
                trainable_bytes += count * parameter.element_size()
        # A quantized base (peftkit.quantize) keeps its linear weights as codes in buffers: count the weights.
        total += sum(m.in_features * m.out_features for m in self.base_model.modules() if getattr(type(m), "is_quantized", False))
        return ParameterReport(trainable, total, trainable_bytes)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        report = self.trainable_parameters_report()
        return report.trainable, report.total

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_report())

    # -- files -----------------------------------------------------------------------------------
    def adapter_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors as saved: `base_model.model.<module path>.<suffix>` -> tensor."""
        self._require_adapter(adapter_name)
        tensors = {}
        for path, module in adapted_modules(self.base_model):
            delta = module.adapters[adapter_name] if adapter_name in module.adapters else None
            if delta is None:
                continue
            for suffix, tensor in delta.file_tensors(module.base_layer).items():
                tensors[f"{self._module_key_prefix(adapter_name)}{path}.{suffix}"] = tensor
        if adapter_name in self.model_adapters:
            tensors.update(self.model_adapters[adapter_name].file_tensors())
        return tensors

    def _module_key_prefix(self, adapter_name: str) -> str:
        owner = self.model_adapters[adapter_name] if adapter_name in self.model_adapters else None
        return getattr(owner, "module_key_prefix", None) or io.KEY_PREFIX

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True) -> list[str]:
        """Write each adapter as adapter_config.json + adapter_model.safetensors (peft layout).

        "default" goes into `save_directory`, any other adapter into `save_directory/<name>`.
        Full fine-tuning writes the whole model instead. Returns the folders written (none where
        `is_main_process` is False: the other processes of a distributed run, as in peft).
        """
        save_directory = os.fspath(save_directory)
        if not is_main_process:
            return []
        whole_model = self._whole_model_method()
        if whole_model is not None:
            return [whole_model.save(self.base_model, next(iter(self.peft_config.values())), save_directory)]
        names = list(self.peft_config) if selected_adapters is None else selected_adapters
        written = []
        for name in names:
            self._require_adapter(name)
            config = self.peft_config[name]
            method = method_for(config)
            export = getattr(method, "export_config", None)
            config = export(config) if export else config
            if isinstance(getattr(config, "target_modules", None), str):
                # Write the modules actually adapted ("all-linear" or a regex resolved on this model),
                # as peft does; peft refuses a regex together with layers_to_transform.
                config = config.replace(target_modules=sorted(self._targets[name]))
            data = config.to_dict()
            data["base_model_name_or_path"] = data.get("base_model_name_or_path") or _base_model_id(self.base_model)
            written.append(io.write_adapter_folder(io.adapter_folder(save_directory, name), data, self.adapter_state(name)))
        return written

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False) -> PeftModel:
        """Wrap `model` with the adapter saved in folder `model_id` (peftkit's or peft's)."""
        config = load_config(model_id)
        wrapped = cls(model, config, adapter_name)
        try:
            wrapped._fill_adapter(model_id, adapter_name, is_trainable)
        except BaseException:
            wrapped.unload()
            raise
        return wrapped

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in folder `model_id` under `adapter_name` (not activated).

        If `adapter_name` already exists, its tensors are replaced by the saved ones, as peft does (this is
        how Hugging Face Trainer resumes a peft model from a checkpoint); the saved adapter must then be of
        the same method and shapes, and the existing adapter keeps its config (its scaling, for one).
        """
        config = load_config(model_id)
        if adapter_name in self.peft_config:
            current = self.peft_config[adapter_name]
            if config.peft_type != current.peft_type:
                raise PeftkitError(
                    f"{os.fspath(model_id)} holds a {config.peft_type} adapter but adapter {adapter_name!r} on this "
                    f"model is {current.peft_type}; load it under another name, or delete_adapter({adapter_name!r}) first"
                )
            if any(adapter_name in m.merged_adapters for _, m in adapted_modules(self.base_model)):
                raise PeftkitError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before loading new "
                                   f"weights into it from {os.fspath(model_id)}")
            self._fill_adapter(model_id, adapter_name, is_trainable)
            return
        self.add_adapter(adapter_name, config)
        try:
            self._fill_adapter(model_id, adapter_name, is_trainable)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def _fill_adapter(self, folder, adapter_name: str, is_trainable: bool) -> None:
        folder = os.fspath(folder)
        whole_model = self._whole_model_method()
        if whole_model is not None:
            raise whole_model.refuse("load", folder=folder)
        path = os.path.join(folder, io.WEIGHTS_NAME)
        self.load_adapter_state(adapter_name, io.read_tensors(path), where=path)
        if is_trainable:
            self._inference_only.discard(adapter_name)
        else:
            self._inference_only.add(adapter_name)
        self._apply_active_state()

    def load_adapter_state(self, adapter_name: str, file_tensors: dict[str, torch.Tensor], where: str = "the tensors") -> None:
        """Copy tensors keyed as `adapter_state(adapter_name)` gives them into that adapter, in place.

        Every key must be present and fit (`where` names their source in errors); the inverse of adapter_state.
        """
        self._require_adapter(adapter_name)
        expected = self.adapter_state(adapter_name)
        missing = [k for k in expected if k not in file_tensors]
        unexpected = [k for k in file_tensors if k not in expected]
        if missing or unexpected:
            raise PeftkitError(
                f"{where} does not fit this model with its config: "
                + (f"{len(missing)} tensors missing (e.g. {missing[:3]}) " if missing else "")
                + (f"{len(unexpected)} tensors the model has no place for (e.g. {unexpected[:3]})" if unexpected else "")
                + "; was it saved from another base model?"
            )
        for module_path, module in adapted_modules(self.base_model):
            if adapter_name not in module.adapters:
                continue
            prefix = f"{self._module_key_prefix(adapter_name)}{module_path}."
            own = {k[len(prefix):]: v for k, v in file_tensors.items() if k.startswith(prefix) and k[len(prefix):] in
                   module.adapters[adapter_name].file_tensors(module.base_layer)}
            module.adapters[adapter_name].load_file_tensors(own, module.base_layer, where=prefix.rstrip("."))
        if adapter_name in self.model_adapters:
            owner = self.model_adapters[adapter_name]
            owner.load_file_tensors({k: file_tensors[k] for k in owner.file_tensors()}, where=where)


def _new_instance(cls, *args):
    """An empty instance of `cls`, as copyreg.__newobj__ (which pickle allows only for the object's own class)."""
    return cls.__new__(cls, *args)


@functools.cache
def _presenting_class(plain: type[PeftModel], base_type: type) -> type[PeftModel]:
    """`plain` (PeftModel or a subclass) whose forward has the signature of `base_type.forward`, plus
    peft's `adapter_names` keyword. One class per base model class, made once."""
    try:
        signature = inspect.signature(base_type.forward)
    except (TypeError, ValueError):  # a forward inspect cannot read: present nothing
        return plain
    parameters = list(signature.parameters.values())
    if "adapter_names" not in signature.parameters:
        position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
        parameters.insert(position, inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
    try:
        signature = signature.replace(parameters=parameters)
    except ValueError:  # the base forward's parameters leave no place for a keyword: keep them as they are
        pass

    def forward(self, *args, **kwargs):
        return plain.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = plain.forward.__doc__
    # Trainer reads the label names of a question-answering model (start/end positions) by class name;
    # peft's wrapper for one is called this too.
    name = plain.__name__
    if "QuestionAnswering" in base_type.__name__ and "QuestionAnswering" not in name:
        name = f"{name}ForQuestionAnswering"
    namespace = {"forward": forward, "_plain_class": plain, "__module__": plain.__module__, "__qualname__": name,
                 "__doc__": plain.__doc__}
    return type(name, (plain,), namespace)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `model` and attach a new adapter described by `peft_config`; returns the wrapped model."""
    return PeftModel(model, peft_config, adapter_name)


class _Replayable:
    """An iterable that can be read from the start again: items are pulled from the source only once."""

    def __init__(self, iterable):
        self._source = iter(iterable)
        self._seen: list = []

    def __iter__(self):
        position = 0
        while True:
            if position == len(self._seen):
                try:
                    self._seen.append(next(self._source))
                except StopIteration:
                    return
            yield self._seen[position]
            position += 1


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _base_model_id(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None
