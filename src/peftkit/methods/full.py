"""Full fine-tuning: every weight trains. The baseline that every PEFT comparison needs.

Not an adapter: it changes the base model itself, so it cannot share the base with other adapters,
and what it saves is the whole model (a folder plain transformers loads). `WHOLE_MODEL` tells
PeftModel so (peftkit.registry.whole_model_method).
"""

from __future__ import annotations

import dataclasses
import os

from torch import nn

from peftkit import io
from peftkit.config import Method, PeftConfig, register_config
from peftkit.methods.base import WholeModelMethod


@register_config
@dataclasses.dataclass
class FullFinetuneConfig(PeftConfig):
    """No fields of its own: every parameter of the model trains."""

    peft_type = "FULL"


class FullFinetuning(WholeModelMethod):
    """Every parameter of the base model trains; the saved folder is the whole model."""

    refusals = {
        "share": "full fine-tuning changes the base itself and cannot share the model with other adapters",
        "delete": "a full fine-tuning run has no adapter to delete",
        "disable": "full fine-tuning changed the base weights; there is no adapter to disable",
        "load": "{folder} holds a fully fine-tuned model, not an adapter: load it as a model folder",
    }

    def attach(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)

    def save(self, model: nn.Module, config: PeftConfig, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(folder)  # transformers writes safetensors
        else:
            io.write_tensors(os.path.join(folder, "model.safetensors"), dict(model.state_dict()))
        # Not adapter_config.json: transformers would then take the folder for a peft adapter.
        io.write_json(os.path.join(folder, io.FULL_CONFIG_NAME), config.to_dict())
        return folder


WHOLE_MODEL = FullFinetuning()

# How `peftkit train` trains it (the baseline).
METHODS = (Method("full", FullFinetuneConfig, {}, learning_rate=1e-4, causal_defaults={}, causal_learning_rate=2e-5),)
