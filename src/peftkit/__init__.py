"""peftkit: parameter-efficient fine-tuning with Hugging Face peft-compatible adapter files.

    from peftkit import get_peft_model, LoraConfig
    model = get_peft_model(base_model, LoraConfig(r=8, target_modules=["query", "value"]))
    model.print_trainable_parameters()
"""

from peftkit.config import PeftConfig, load_config
from peftkit.errors import PeftkitError
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.freeze import FreezeConfig
from peftkit.methods.full import FullFinetuneConfig
from peftkit.methods.lora import LoraConfig
from peftkit.model import ParameterReport, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "BitFitConfig",
    "FreezeConfig",
    "FullFinetuneConfig",
    "LoraConfig",
    "ParameterReport",
    "PeftConfig",
    "PeftModel",
    "PeftkitError",
    "get_peft_model",
    "load_config",
]
