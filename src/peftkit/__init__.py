"""peftkit: parameter-efficient fine-tuning with Hugging Face peft-compatible adapter files.

    from peftkit import get_peft_model, LoraConfig
    model = get_peft_model(base_model, LoraConfig(r=8, target_modules=["query", "value"]))
    model.print_trainable_parameters()
"""

from peftkit.config import PeftConfig, load_config
from peftkit.errors import PeftkitError
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.adapter import BottleneckConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.freeze import FreezeConfig
from peftkit.methods.full import FullFinetuneConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.ln_tuning import LNTuningConfig
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrConfig
from peftkit.methods.lora import LoraConfig, set_lora_fused
from peftkit.methods.oft import OFTConfig
from peftkit.methods.prefix import PrefixTuningConfig
from peftkit.methods.prompt import PromptEncoderConfig, PromptTuningConfig
from peftkit.methods.sparse import SparseConfig
from peftkit.methods.vera import VeraConfig
from peftkit.model import ParameterReport, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "FreezeConfig",
    "FullFinetuneConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "ParameterReport",
    "PeftConfig",
    "PeftModel",
    "PeftkitError",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SparseConfig",
    "VeraConfig",
    "get_peft_model",
    "load_config",
    "set_lora_fused",
]
