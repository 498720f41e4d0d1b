"""Gradient checkpointing for a training run: recompute each layer's activations in the backward pass
instead of keeping them (less memory, about a third more compute), on the transformers model inside
a PeftModel, switched on for the run and restored after it.
"""

from __future__ import annotations

import contextlib

import torch

from peftkit.errors import PeftkitError


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool):
    """Gradient checkpointing on the transformers model in ``model`` (itself, or a PeftModel's base) while inside.

    Checkpointing is switched on with ``use_reentrant=False``: the reentrant form computes no
    gradient through a checkpointed block whose inputs do not require grad, which is every block of
    a frozen base ("element 0 of tensors does not require grad", or LoRA weights that silently never
    train). ``config.use_cache`` is off meanwhile, as a key/value cache is useless in training and
    transformers would switch it off with a warning. Both are restored on the way out.
    """
    if not enabled:
        yield
        return
    from transformers import PreTrainedModel

    target = model
    for _ in range(4):  # a PeftModel, possibly inside another wrapper, keeps the base as .base_model
        inner = getattr(target, "base_model", None)
        if isinstance(target, PreTrainedModel) or not isinstance(inner, torch.nn.Module) or inner is target:
            break
        target = inner
    if not isinstance(target, PreTrainedModel):
        raise PeftkitError(
            f"gradient_checkpointing=True needs a Hugging Face transformers model, but {type(target).__name__} "
            "is not one; train without gradient checkpointing"
        )
    if not target.supports_gradient_checkpointing:
        raise PeftkitError(
            f"{type(target).__name__} does not support gradient checkpointing (transformers does not implement it "
            "for this architecture); train without it"
        )
    # transformers 5 renamed gradient_* to activation_checkpointing_*, keeping the old names with a warning.
    new_names = hasattr(target, "activation_checkpointing_enable")
    enable = target.activation_checkpointing_enable if new_names else target.gradient_checkpointing_enable
    disable = target.activation_checkpointing_disable if new_names else target.gradient_checkpointing_disable
    was_on = target.is_activation_checkpointing if new_names else target.is_gradient_checkpointing
    had_input_grad_hook = bool(getattr(target, "_require_grads_hook", None))
    config = getattr(target, "config", None)
    use_cache = getattr(config, "use_cache", None)

    enable({"use_reentrant": False})
    # transformers also hooks the input embeddings to make their output require grad, which only the
    # reentrant form needs; it would make every backward pass run down to the embeddings, even when
    # only the top layers are adapted, and it would outlive the run.
    if not had_input_grad_hook and getattr(target, "_require_grads_hook", None) is not None:
        target.disable_input_require_grads()
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if not was_on:
            disable()
        if use_cache is not None:
            config.use_cache = use_cache
