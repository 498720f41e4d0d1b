"""torch.compile on LoRA models: no graph break in peftkit's layers, and a compiled training step equals eager.

The compiled steps use the "aot_eager" backend: it runs what Inductor is handed (Dynamo's graph through
AOTAutograd, FusedLoraLinear's own backward included) without generating C++ kernels, which would
take minutes on CPU. benchmarks/compile_step_time.py times the Inductor build on minilm.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import set_lora_fused

PEFTKIT_SOURCE = str(Path(peftkit.__file__).parent)


def one_layer_bert(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # No dropout in the base model: the compiled graph draws its own random numbers, so with dropout
    # eager and compiled steps could not be compared.
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        num_labels=num_labels, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(config)


def lora_model(make_base, task_type, fused: bool, dropout: float):
    # init_lora_weights=False starts B away from zero, so that A has a gradient from the first step.
    model = get_peft_model(make_base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                                   task_type=task_type, init_lora_weights=False))
    set_lora_fused(model, fused)
    return model.train()


def batch(task_type):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 120, (4, 12), generator=generator)
    labels = torch.tensor([0, 1, 2, 1]) if task_type == "SEQ_CLS" else input_ids
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def peftkit_breaks(explanation) -> list[str]:
    """Graph-break reasons whose innermost frame is peftkit's code (the rest are the model's or torch's)."""
    found = []
    for reason in explanation.break_reasons:
        stack = reason.user_stack
        if stack and stack[-1].filename.startswith(PEFTKIT_SOURCE):
            found.append(f"{reason.reason.splitlines()[0]} at {stack[-1].filename}:{stack[-1].lineno}")
    return found


@pytest.mark.parametrize("make_base, task_type", [(one_layer_bert, "SEQ_CLS"), (one_layer_llama, "CAUSAL_LM")],
                         ids=["bert", "llama"])
@pytest.mark.parametrize("fused, dropout", [(True, 0.0), (True, 0.1), (False, 0.1)],
                         ids=["fused", "fused-dropout", "unfused-dropout"])
def test_no_graph_break_in_peftkit_layers(make_base, task_type, fused, dropout):
    torch._dynamo.reset()
    model = lora_model(make_base, task_type, fused, dropout)
    inputs = batch(task_type)

    def loss(inputs):
        return model(**inputs).loss

    explanation = torch._dynamo.explain(loss)(inputs)
    assert peftkit_breaks(explanation) == []
    # For these two models there is no break anywhere (transformers' own code included): one graph.
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_compiled_training_step_matches_eager(fused):
    torch._dynamo.reset()
    eager = lora_model(one_layer_bert, "SEQ_CLS", fused, dropout=0.0)
    compiled = lora_model(one_layer_bert, "SEQ_CLS", fused, dropout=0.0)
    compiled.load_state_dict(eager.state_dict())
    inputs = batch("SEQ_CLS")
    compiled_loss = torch.compile(lambda inputs: compiled(**inputs).loss, backend="aot_eager")

    def train_steps(model, loss_fn, steps=3):
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        losses, first_gradients = [], None
        for _ in range(steps):
            loss = loss_fn(inputs)
            loss.backward()
            if first_gradients is None:
                first_gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses, first_gradients

    eager_losses, eager_gradients = train_steps(eager, lambda inputs: eager(**inputs).loss)
    compiled_losses, compiled_gradients = train_steps(compiled, compiled_loss)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[-1] < eager_losses[0]
    assert compiled_gradients.keys() == eager_gradients.keys() and any("lora_A" in n for n in eager_gradients)
    for name, gradient in eager_gradients.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    trained = dict(compiled.named_parameters())
    for name, parameter in eager.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(trained[name], parameter, rtol=1e-4, atol=1e-6, msg=name)
