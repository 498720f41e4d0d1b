"""Full fine-tuning: every weight trains. The baseline that every PEFT comparison needs.

Not an adapter: it changes the base model itself, so it cannot share the base with other adapters,
and what it saves is the whole model (a folder plain transformers loads).
"""

from __future__ import annotations

import dataclasses

from peftkit.config import Method, PeftConfig, register_config


@register_config
@dataclasses.dataclass
class FullFinetuneConfig(PeftConfig):
    """No fields of its own: every parameter of the model trains."""

    peft_type = "FULL"

# How `peftkit train` trains it (the baseline).
METHODS = (Method("full", FullFinetuneConfig, {}, learning_rate=1e-4, causal_defaults={}, causal_learning_rate=2e-5),)
