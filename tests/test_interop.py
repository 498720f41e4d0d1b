"""Adapters move both ways between peftkit and the real Hugging Face peft package, same outputs."""

import json

import peft
import pytest
import torch
from conftest import TINY_MODELS, randomise
from safetensors.torch import load_file

from peftkit import LoraConfig, PeftModel, get_peft_model

CASES = {
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], bias="lora_only",
                 modules_to_save=["classifier"], rank_pattern={"value": 2}),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "wpe"], use_rslora=True),
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens"],
                  alpha_pattern={"v_proj": 3.0}, layers_to_transform=[1], bias="none"),
}


@pytest.mark.parametrize("family", list(CASES))
def test_peftkit_adapter_loads_in_peft(family, tmp_path, input_ids):
    ours = get_peft_model(TINY_MODELS[family](), LoraConfig(**CASES[family]))
    randomise(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert theirs.get_nb_trainable_parameters()[1] == ours.get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("family", list(CASES))
def test_peft_adapter_loads_in_peftkit(family, tmp_path, input_ids):
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft.LoraConfig(**CASES[family]))
    randomise(theirs)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in peft
    trainable = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path, adapter_name="t", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_all_linear_with_layer_choice_is_saved_as_explicit_names(tmp_path, input_ids):
    # peft refuses a string target_modules together with layers_to_transform; the saved file lists names.
    ours = get_peft_model(TINY_MODELS["llama"](), LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[1]))
    randomise(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert "model.layers.1.self_attn.q_proj" in saved and not any(".layers.0." in n for n in saved)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)


def test_saved_keys_and_config_use_peft_layout(tmp_path):
    model = get_peft_model(TINY_MODELS["bert"](), LoraConfig(**CASES["bert"]))
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in keys
    assert "base_model.model.classifier.weight" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["rank_pattern"] == {"value": 2}


def test_pissa_adapter_is_saved_as_plain_lora_that_peft_loads(tmp_path, input_ids):
    ours = get_peft_model(TINY_MODELS["llama"](), LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa"))
    randomise(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path)
    again = PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_several_adapters_save_in_subfolders_like_peft(tmp_path, input_ids):
    model = get_peft_model(TINY_MODELS["gpt2"](), LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("second", LoraConfig(r=3, target_modules=["c_fc"]))
    randomise(model)
    model.set_adapter("second")
    randomise(model, seed=5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS["gpt2"](), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ["default", "second"]:
        model.set_adapter(name)
        theirs.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=input_ids).logits, model(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)
