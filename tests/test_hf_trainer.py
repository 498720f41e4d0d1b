"""peftkit models inside the real Hugging Face `Trainer` and TRL's `SFTTrainer`, on tiny models from configs."""

from __future__ import annotations

import copy
import inspect
import io
import os

import numpy as np
import pytest
import torch
from conftest import byte_level_tokenizer, tiny_bert, tiny_llama
from datasets import Dataset
from safetensors.torch import load_file
from transformers import Trainer as StockTrainer
from transformers import TrainerCallback, TrainingArguments

from peftkit import IA3Config, LoraConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.hf_trainers import Trainer

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json"}


def arguments(tmp_path, **overrides) -> TrainingArguments:
    """TrainingArguments at their defaults but for the folder, a few steps, no trackers and the CPU."""
    fields = dict(output_dir=str(tmp_path / "run"), max_steps=4, report_to="none", use_cpu=True,
                  per_device_train_batch_size=4, per_device_eval_batch_size=4, disable_tqdm=True)
    return TrainingArguments(**{**fields, **overrides})


def classification_data(n=16, seed=0) -> Dataset:
    """Token ids with labels, plus two columns no model takes ("text", "idx"), as a real dataset has."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 120, (n, 8), generator=generator)
    return Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
        "labels": [int(i) % 3 for i in ids[:, 0]], "text": [f"example {i}" for i in range(n)], "idx": list(range(n)),
    })


def lora_bert(seed=0) -> PeftModel:
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random B as well, so that every LoRA tensor gets a gradient from the first step
        for name, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad and "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def tensors(model, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


# -- the stock transformers.Trainer ---------------------------------------------------------------


def test_wrapper_presents_the_base_models_forward_signature():
    from transformers.utils.generic import find_labels

    model = lora_bert()
    parameters = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "token_type_ids", "labels", "adapter_names"} <= set(parameters)
    assert find_labels(type(model)) == ["labels"]  # Trainer reads the label names from the class
    assert isinstance(model, PeftModel) and type(model).__name__ == "PeftModel"
    # Trainer finds a question-answering model's labels by its class name, as peft's wrapper is named
    from transformers import BertConfig, BertForQuestionAnswering

    qa = get_peft_model(BertForQuestionAnswering(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, intermediate_size=64)),
                        LoraConfig(r=2, target_modules=["query"]))
    assert type(qa).__name__ == "PeftModelForQuestionAnswering" and isinstance(qa, PeftModel)
    assert find_labels(type(qa)) == ["start_positions", "end_positions"]
    # deepcopy and pickle rebuild the wrapper with the same signature and the same outputs
    input_ids = torch.randint(2, 120, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for again in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(again) is type(model)
        assert inspect.signature(again.forward) == inspect.signature(model.forward)
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=input_ids).logits, expected)


def test_stock_trainer_keeps_the_models_columns_and_trains_the_adapter_only(tmp_path):
    model = lora_bert()
    adapter_before, base_before = tensors(model, True), tensors(model, False)
    trainer = StockTrainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=classification_data())
    assert trainer.label_names == ["labels"]
    result = trainer.train()

    assert trainer.state.global_step == 4 and np.isfinite(result.training_loss)
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert not {"text", "idx"} & set(trainer._signature_columns)
    adapter_after, base_after = tensors(model, True), tensors(model, False)
    assert adapter_after.keys() == adapter_before.keys() and all("lora_" in n or "classifier" in n for n in adapter_after)
    assert all(not torch.equal(adapter_after[n], adapter_before[n]) for n in adapter_before), "an adapter tensor did not train"
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before), "the frozen base changed"


def test_stock_trainer_evaluates_with_loss_and_metrics(tmp_path):
    seen = {}

    def accuracy(prediction):
        seen["labels"] = prediction.label_ids
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    data = classification_data(n=12, seed=1)
    trainer = StockTrainer(model=lora_bert(), args=arguments(tmp_path, save_strategy="no"), train_dataset=data,
                           eval_dataset=data, compute_metrics=accuracy)
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    np.testing.assert_array_equal(seen["labels"], np.array(data["labels"]))

    # the loss is the model's own cross-entropy over the evaluation set
    model = trainer.model.eval()
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(data["input_ids"]), labels=torch.tensor(data["labels"])).loss
    assert metrics["eval_loss"] == pytest.approx(loss.item(), rel=1e-4)


def test_stock_trainer_accepts_a_quantized_base_that_carries_adapters():
    from types import SimpleNamespace

    from transformers.trainer_utils import validate_quantization_for_training

    base = tiny_llama()
    # what transformers sets on a model it loaded quantized (bitsandbytes, ...); no GPU needed to check the rule
    base.is_quantized, base.hf_quantizer = True, SimpleNamespace(is_trainable=True, is_qat_trainable=False)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)  # Trainer refuses the bare quantized model ...
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    validate_quantization_for_training(model)  # ... and trains it with adapters, as with peft


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, which trainable tensors have a non-zero gradient."""

    def __init__(self):
        self.with_gradient: list[set[str]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.with_gradient.append({n for n, p in model.named_parameters()
                                   if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0})


def test_stock_trainer_gradient_checkpointing_trains_lora_on_a_frozen_base(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    ids = torch.randint(2, 120, (8, 10), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids, "text": ["t"] * 8})
    calls = []
    model.base_model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    probe = GradientProbe()
    trainer = StockTrainer(model=model, args=arguments(tmp_path, max_steps=2, gradient_checkpointing=True,
                                                       save_strategy="no"),
                           train_dataset=data, callbacks=[probe])
    trainer.train()

    assert model.base_model.is_activation_checkpointing
    assert len(calls) == 2 * 2, "the checkpointed layer was not run again in the backward pass"
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert probe.with_gradient == [lora, lora], "some LoRA tensors got no gradient under checkpointing"


# -- peftkit.hf_trainers.Trainer: adapter-only checkpoints ---------------------------------------


def test_checkpoints_hold_the_adapter_only(tmp_path):
    model = lora_bert()
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="steps", save_steps=2),
                      train_dataset=classification_data())
    trainer.train()
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        files = set(os.listdir(run / checkpoint))
        assert ADAPTER_FILES <= files and not FULL_MODEL_FILES & files, files
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"} <= files
        saved = load_file(run / checkpoint / "adapter_model.safetensors")
        assert saved and all("lora_" in k or "classifier" in k for k in saved)  # no base weight

    # the last checkpoint is the trained adapter, in peft's layout: peftkit and peft both load it
    import peft

    input_ids = torch.randint(2, 120, (2, 8))
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids).logits
        ours = PeftModel.from_pretrained(tiny_bert(), run / "checkpoint-4").eval()(input_ids=input_ids).logits
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), run / "checkpoint-4").eval()(input_ids=input_ids).logits
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)

    trainer.save_model(tmp_path / "final")
    assert ADAPTER_FILES <= set(os.listdir(tmp_path / "final")) and not FULL_MODEL_FILES & set(os.listdir(tmp_path / "final"))


class AdapterAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.adapter = tensors(model, True)


def test_resume_from_checkpoint_loads_the_adapter_and_continues(tmp_path):
    data = classification_data()
    first = lora_bert()
    Trainer(model=first, args=arguments(tmp_path, learning_rate=1e-2, save_steps=2), train_dataset=data).train()
    finished = tensors(first, True)

    torch.manual_seed(123)
    again = lora_bert(seed=7)  # another starting adapter: only loading the checkpoint makes them agree
    assert any(not torch.equal(t, finished[n]) for n, t in tensors(again, True).items())
    at_start = AdapterAtStart()
    trainer = Trainer(model=again, args=arguments(tmp_path, learning_rate=1e-2, save_steps=2), train_dataset=data,
                      callbacks=[at_start])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))

    # it started from the checkpoint's adapter and step, and ended where the uninterrupted run did
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert torch.equal(at_start.adapter["base_model.bert.encoder.layer.0.attention.self.query.adapters.default.lora_A"],
                       saved["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"])
    assert trainer.state.global_step == 4
    resumed = tensors(again, True)
    assert resumed.keys() == finished.keys()
    for name in finished:
        torch.testing.assert_close(resumed[name], finished[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.requires_grad for n, p in again.named_parameters() if n in finished)  # still training


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    data = classification_data(n=8)
    model = lora_bert()
    trainer = Trainer(model=model, train_dataset=data, eval_dataset=data,
                      args=arguments(tmp_path, learning_rate=1e-2, save_steps=2, eval_strategy="steps", eval_steps=2,
                                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True))
    trainer.train()  # "best" is the highest loss here, so that it is not simply the last checkpoint
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    torch.testing.assert_close(model.base_model.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_B,
                               saved[key])


def test_loading_an_adapter_of_another_method_over_an_existing_one_is_refused(tmp_path):
    lora = lora_bert()
    lora.save_pretrained(tmp_path)
    ia3 = get_peft_model(tiny_bert(), IA3Config(target_modules=["query", "value"], feedforward_modules=[]))
    with pytest.raises(PeftkitError, match=r"holds a LORA adapter but adapter 'default' on this model is IA3"):
        ia3.load_adapter(tmp_path, "default")
    lora.merge_adapter()
    with pytest.raises(PeftkitError, match="adapter 'default' is merged; unmerge_adapter"):
        lora.load_adapter(tmp_path, "default")


# -- TRL ------------------------------------------------------------------------------------------


def sft_setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    turns = [("Hello there, how are you?", "I am fine."), ("The capital of France?", "Paris."),
             ("How are you?", "Fine, and you?"), ("Hello?", "Hello there.")]
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                                           for q, a in turns * 2]})
    return tokenizer, base, data


def test_sft_trainer_trains_a_peftkit_lora_model(tmp_path):
    trl = pytest.importorskip("trl")
    from peftkit.hf_trainers import SFTTrainer

    tokenizer, base, data = sft_setup()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter_before, base_before = tensors(model, True), tensors(model, False)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, report_to="none", use_cpu=True,
                         per_device_train_batch_size=4, max_length=64, learning_rate=1e-2, save_steps=3,
                         disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert isinstance(trainer, trl.SFTTrainer)
    # TRL's fused LM head sits on the transformers model, under the adapters' wrapper
    assert "forward" in vars(model.base_model) and "forward" not in vars(model)
    result = trainer.train()

    assert trainer.state.global_step == 3 and np.isfinite(result.training_loss)
    adapter_after, base_after = tensors(model, True), tensors(model, False)
    assert all(not torch.equal(adapter_after[n], adapter_before[n]) for n in adapter_before)
    assert all(torch.equal(base_after[n], base_before[n]) for n in base_before)
    files = set(os.listdir(tmp_path / "run" / "checkpoint-3"))
    assert ADAPTER_FILES <= files and not FULL_MODEL_FILES & files, files

    # the fused loss is the model's own causal-LM loss
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.eval()
    with torch.no_grad():
        fused = model(input_ids=batch["input_ids"], labels=batch["labels"], fused_lm_head=True).loss
        plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_sft_trainer_refuses_an_adapter_on_the_lm_head(tmp_path):
    trl = pytest.importorskip("trl")
    from peftkit.hf_trainers import SFTTrainer

    tokenizer, base, data = sft_setup()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none", use_cpu=True, max_length=64)
    with pytest.raises(PeftkitError, match="LM head"):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
