"""Hugging Face `Trainer` and TRL's `SFTTrainer` for peftkit models, with adapter-only checkpoints.

A peftkit model already trains in the stock `transformers.Trainer`: it presents the base model's
forward signature (column filtering, label names) and forwards the base model's attributes
(gradient checkpointing, config, generation). What the stock trainers do only for a model that is
`isinstance(model, peft.PeftModel)` (they test exactly that, so no other class can pass) is done here:

- checkpoints and `save_model` write the adapters (adapter_config.json + adapter_model.safetensors)
  instead of the whole model's state dict;
- resuming from a checkpoint and `load_best_model_at_end` load those adapters back into the model;
- TRL's fused LM head goes onto the transformers model inside the wrapper, not onto the wrapper.

    from peftkit.hf_trainers import Trainer          # or SFTTrainer (needs trl)
    trainer = Trainer(model=peft_model, args=TrainingArguments(output_dir="run"), train_dataset=data)

Models that are not peftkit models go through the trainers' own code unchanged.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from peftkit import io
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdaptedModule
from peftkit.model import PeftModel

logger = logging.getLogger(__name__)

__all__ = ["AdapterTrainerMixin", "SFTTrainer", "Trainer"]  # noqa: F822  (SFTTrainer is made on first use)


class AdapterTrainerMixin:
    """Put before a `transformers.Trainer` subclass: a peftkit model is saved and loaded as its adapters."""

    def _peftkit_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, PeftModel) and not model.is_full_finetune else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peftkit_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving adapters to %s", output_dir)
        model.save_pretrained(output_dir)
        # What Trainer._save writes beside the weights.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = self._peftkit_model()
        if peft_model is None or not _holds_adapters(resume_from_checkpoint):
            # A checkpoint the stock Trainer wrote (the whole state dict) still loads its own way.
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        _load_adapters(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model = self._peftkit_model()
        best = self.state.best_model_checkpoint
        if peft_model is None or not _holds_adapters(best):
            return super()._load_best_model()
        logger.info("Loading the best adapters from %s (score: %s).", best, self.state.best_metric)
        _load_adapters(peft_model, best)

    def _put_fused_lm_head_inside(self) -> None:
        """TRL patches the forward of the model it is given with a fused LM head that runs
        `model.base_model` as the transformer backbone. On a peftkit wrapper, `base_model` is the whole
        transformers model, so the patch moves onto that model, as TRL does for a peft model."""
        model = self._peftkit_model()
        patched = model.__dict__.get("forward") if model is not None else None
        function = getattr(patched, "__func__", None)
        # functools.wraps gave the patch our forward's name and module; its own `fused_lm_head` keyword tells it.
        if function is None or "fused_lm_head" not in function.__code__.co_varnames:
            return
        head = model.base_model.get_output_embeddings()
        if isinstance(head, AdaptedModule):
            raise PeftkitError(
                "an adapter on the LM head (lm_head in target_modules or modules_to_save) is not trained by TRL's "
                "fused LM head, which reads the head's weight directly; leave lm_head out of the adapter"
            )
        from trl.trainer.utils import add_fused_lm_head

        settings = inspect.getclosurevars(function).nonlocals
        del model.forward  # back to the wrapper's own forward
        add_fused_lm_head(
            model.base_model,
            **{k: settings[k] for k in ("temperature", "cast_lm_head_to_fp32", "outputs") if k in settings},
        )


def _holds_adapters(folder: str | None) -> bool:
    if not folder or not os.path.isdir(folder):
        return False
    subfolders = [os.path.join(folder, name) for name in os.listdir(folder)]
    return any(os.path.isfile(os.path.join(f, io.CONFIG_NAME)) for f in [folder, *subfolders])


def _load_adapters(model: PeftModel, folder: str) -> None:
    """Load each of the model's adapters saved in `folder` back into it, keeping which ones train."""
    loaded = []
    for name in model.peft_config:
        source = io.adapter_folder(folder, name)
        if os.path.isfile(os.path.join(source, io.CONFIG_NAME)):
            model.load_adapter(source, name, is_trainable=name not in model._inference_only)
            loaded.append(name)
    if not loaded:
        raise PeftkitError(
            f"{folder} holds no adapter of this model (adapters: {', '.join(model.peft_config)}); "
            "was the checkpoint written for another model?"
        )


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """`transformers.Trainer`, saving and loading a peftkit model as its adapters (as it does a peft model)."""


def __getattr__(name: str):
    # trl is optional: SFTTrainer is made on first use.
    if name == "SFTTrainer":
        try:
            import trl
        except ImportError as error:
            raise PeftkitError('peftkit.hf_trainers.SFTTrainer needs TRL, which is not installed: pip install "peftkit[trl]"') from error

        class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
            """`trl.SFTTrainer` for a peftkit model passed as `model=`: adapter-only checkpoints, and
            TRL's fused LM head on the transformers model inside the wrapper."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._put_fused_lm_head_inside()

        SFTTrainer.__qualname__ = "SFTTrainer"
        globals()["SFTTrainer"] = SFTTrainer
        return SFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
