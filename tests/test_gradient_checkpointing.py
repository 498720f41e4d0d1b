"""Gradient checkpointing with a frozen base: same gradients as without it, and training runs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

from peftkit import LoraConfig, PeftkitError, PromptTuningConfig, get_peft_model
from peftkit.train.loop import TrainingArguments, gradient_checkpointing, train


def lora_llama():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    # LoRA's B starts at zero, which leaves A without gradient; random values make every gradient count.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def prompt_llama():
    return get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))


def gradients(model, input_ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("make_model", [lora_llama, prompt_llama], ids=["lora", "prompt"])
def test_checkpointing_gives_the_same_gradients(make_model, input_ids):
    model = make_model()
    base = model.base_model
    plain = gradients(model, input_ids)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())

    # Count the calls into one decoder layer's attention: checkpointing runs it again in the backward
    # pass (a pre-hook, as the recomputation stops early, once it has what the backward pass needs).
    calls = []
    hook = base.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    with gradient_checkpointing(model, True):
        assert base.is_activation_checkpointing and base.config.use_cache is False
        checkpointed = gradients(model, input_ids)
    hook.remove()
    assert len(calls) == 2, "the layer was not recomputed, so checkpointing was not on"

    assert checkpointed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=f"{name} differs")
    # Everything is as it was: no checkpointing, the cache on, no hook left on the input embeddings.
    assert not base.is_activation_checkpointing and base.config.use_cache is True
    assert not getattr(base, "_require_grads_hooks", None)
    assert not base.get_input_embeddings()._forward_hooks


def test_training_with_checkpointing_runs_and_restores_the_model(tmp_path):
    model = lora_llama()
    generator = torch.Generator().manual_seed(5)
    examples = [torch.randint(2, 120, (9,), generator=generator) for _ in range(12)]

    def collate(batch):
        input_ids = torch.stack(batch)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, learning_rate=1e-2,
                             progress=False, gradient_checkpointing=True)
    result = train(model, examples, examples[:4], args, collate)
    assert result.steps == 3 and math.isfinite(result.train_loss)
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)
    assert not model.base_model.is_activation_checkpointing and model.base_model.config.use_cache is True


def test_checkpointing_is_restored_after_an_error(tmp_path):
    model = lora_llama()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, progress=False,
                             gradient_checkpointing=True)

    def broken_collate(batch):
        raise RuntimeError("broken collate")

    with pytest.raises(RuntimeError, match="broken collate"):
        train(model, [0, 1], None, args, broken_collate)
    assert not model.base_model.is_activation_checkpointing and model.base_model.config.use_cache is True


def test_models_without_checkpointing_are_named(tmp_path):
    from transformers import LlamaForCausalLM

    class NoCheckpointingLlama(LlamaForCausalLM):
        supports_gradient_checkpointing = False

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, progress=False, gradient_checkpointing=True)
    collate = lambda batch: {}  # noqa: E731  (never reached)
    with pytest.raises(PeftkitError, match="NoCheckpointingLlama does not support gradient checkpointing"):
        train(NoCheckpointingLlama(tiny_llama().config), [0], None, args, collate)
    with pytest.raises(PeftkitError, match="needs a Hugging Face transformers model, but Linear is not one"):
        train(torch.nn.Linear(2, 2), [0], None, args, collate)
    with pytest.raises(PeftkitError, match="gradient_checkpointing must be True or False"):
        TrainingArguments(output_dir="x", gradient_checkpointing="yes").validate()


def test_cli_passes_the_flag_to_the_training_arguments(monkeypatch):
    from peftkit import cli
    from peftkit.train import job

    seen = {}

    def fake_train_classifier(*args, training, **kwargs):
        seen.update(training)
        raise PeftkitError("stop here")

    monkeypatch.setattr(job, "train_classifier", fake_train_classifier)
    assert cli.main(["train", "--gradient-checkpointing", "--no-progress"]) == 2
    assert seen["gradient_checkpointing"] is True
    assert cli.main(["train", "--no-progress"]) == 2
    assert seen["gradient_checkpointing"] is False
