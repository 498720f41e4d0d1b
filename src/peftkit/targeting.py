"""Which modules a method touches: names, regex, "all-linear", layer indices.

Matching follows Hugging Face `peft`, so configs move between the two unchanged:
- a list of names matches a module whose path equals a name or ends with "." + name;
- a string is a regular expression that must match the whole module path;
- "all-linear" is every nn.Linear / GPT-2 Conv1D except the model's output layer (the LM head, or the
  classifier when task_type is SEQ_CLS).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import iter_base_modules

ALL_LINEAR = "all-linear"
# Containers of repeated transformer blocks in common architectures (BERT, GPT-2, Llama, ViT, T5...)
DEFAULT_LAYER_CONTAINERS = ("layer", "layers", "h", "blocks", "block")
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


def linear_types() -> tuple[type, ...]:
    """nn.Linear plus transformers' GPT-2 Conv1D when transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def name_matches(module_name: str, pattern: str | Sequence[str]) -> bool:
    """True when `module_name` is selected by `pattern` (a regex string or a list of names)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in pattern)


def layer_index(module_name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The index of the transformer block a module sits in (`encoder.layer.3.output` -> 3), or None."""
    containers = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or DEFAULT_LAYER_CONTAINERS)
    for container in containers:
        match = re.search(rf"(?:^|\.){re.escape(container)}\.(\d+)(?:\.|$)", module_name)
        if match:
            return int(match.group(1))
    return None


def output_layer_names(model: nn.Module, task_type: str | None = None) -> set[str]:
    """Names of the model's final projection (LM head, or the classifier for SEQ_CLS)."""
    names: set[str] = set()
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    head = getattr(head, "base_layer", head)  # already wrapped by an adapter
    if head is not None:
        names.update(name for name, module in iter_base_modules(model) if module is head)
    return names


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    supported_types: tuple[type, ...] | None = None,
    task_type: str | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Module paths selected by the arguments, in model order.

    Raises PeftkitError when a requested name selects nothing, listing the module names that exist,
    and when a selected module has a type the method cannot adapt.
    """
    if target_modules is None:
        raise PeftkitError("target_modules is not set: give module names, a regex, or 'all-linear'")
    skip = set(skip)
    modules = {name: module for name, module in iter_base_modules(model) if name}
    all_names = list(modules)
    excluded_head: set[str] = set()

    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        excluded_head = output_layer_names(model, task_type)
        kinds = linear_types()
        candidates = [n for n in all_names if isinstance(modules[n], kinds) and n not in excluded_head]
    else:
        candidates = [n for n in all_names if name_matches(n, target_modules)]
        if not isinstance(target_modules, str):
            unmatched = [key for key in target_modules if not any(name_matches(n, [key]) for n in all_names)]
            if unmatched:
                raise PeftkitError(
                    f"target_modules {unmatched} matched no module of {type(model).__name__}; "
                    f"module names in this model: {describe_module_names(model)}"
                )

    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        candidates = [n for n in candidates if layer_index(n, layers_pattern) in wanted]
    if exclude_modules:
        candidates = [n for n in candidates if not name_matches(n, exclude_modules)]
    candidates = [n for n in candidates if n not in skip and not any(n.startswith(s + ".") for s in skip)]

    if not candidates:
        raise PeftkitError(
            f"target_modules={target_modules!r} selects no module of {type(model).__name__}"
            + (f" within layers {layers_to_transform}" if layers_to_transform is not None else "")
            + (f" after exclude_modules={exclude_modules!r}" if exclude_modules else "")
            + f"; module names in this model: {describe_module_names(model)}"
        )
    if supported_types is not None:
        for name in candidates:
            if not isinstance(modules[name], supported_types):
                kinds = ", ".join(t.__name__ for t in supported_types)
                raise PeftkitError(
                    f"module {name!r} is a {type(modules[name]).__name__}; this method adapts only {kinds}. "
                    "Narrow target_modules (or use exclude_modules) to skip it."
                )
    return candidates


def describe_module_names(model: nn.Module, limit: int = 40) -> str:
    """The distinct last parts of module names with their types, e.g. 'query (Linear), dense (Linear)'."""
    seen: dict[str, str] = {}
    for name, module in iter_base_modules(model):
        if not name:
            continue
        short = name.rsplit(".", 1)[-1]
        if short.isdigit():
            continue
        seen.setdefault(short, type(module).__name__)
    items = [f"{short} ({kind})" for short, kind in seen.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def find_layer_blocks(model: nn.Module) -> list[str]:
    """Paths of the repeated transformer blocks, in order (the longest nn.ModuleList of blocks)."""
    best: list[str] = []
    for name, module in iter_base_modules(model):
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    if not best:
        raise PeftkitError(
            f"{type(model).__name__} has no list of repeated blocks (nn.ModuleList) to choose layers from; "
            "name the modules to train instead"
        )
    return best


def other_bias_modules(model: nn.Module, targets: Sequence[str], skip: Sequence[str]) -> list[str]:
    """The modules with a bias parameter outside `targets` and `skip` (LayerNorms included): what a method's
    `bias="all"` trains besides its own layers, as in peft."""
    covered = set(targets)
    found = []
    for name, module in iter_base_modules(model):
        if not name or name in covered or any(name_matches(name, [s]) or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module.__dict__.get("_parameters", {}).get("bias"), nn.Parameter):
            found.append(name)
    return found
