"""The wrapper: several named adapters, disabling, deleting, saving/loading and bad files."""

import json

import pytest
import torch
from conftest import randomise, tiny_bert, tiny_gpt2

from peftkit import BitFitConfig, FreezeConfig, FullFinetuneConfig, LoraConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule


def test_named_adapters_switch_disable_delete(input_ids):
    base = tiny_gpt2()
    with torch.no_grad():
        reference = base(input_ids=input_ids).logits.clone()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"]), adapter_name="a")
    randomise(model)
    model.add_adapter("b", BitFitConfig())
    assert model.active_adapters == ["a"]
    model.set_adapter("b")
    randomise(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    with torch.no_grad():
        out_b = model(input_ids=input_ids).logits
        model.set_adapter("a")
        out_a = model(input_ids=input_ids).logits
        model.set_adapter(["a", "b"])
        out_ab = model(input_ids=input_ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=input_ids).logits, reference, rtol=0, atol=0)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_ab, out_a)
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, out_b)
    model.delete_adapter("b")
    assert not any(isinstance(m, AdaptedModule) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference, rtol=0, atol=0)


def test_adapter_errors_are_clear():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(PeftkitError, match="no adapter named 'nope'; adapters on this model: default"):
        model.set_adapter("nope")
    with pytest.raises(PeftkitError, match="already exists"):
        model.add_adapter("default", LoraConfig(r=2, target_modules=["key"]))
    with pytest.raises(PeftkitError, match="not allowed"):
        model.add_adapter("../evil", LoraConfig(r=2, target_modules=["key"]))
    with pytest.raises(PeftkitError, match="already wrapped"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["key"]))
    model.merge_adapter()
    with pytest.raises(PeftkitError, match="unmerge"):
        with model.disable_adapter():
            pass


def test_load_adapter_made_for_another_base_names_tensor_and_shapes(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    wider = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(PeftkitError, match=r"query\.lora_A\.weight has shape \(2, 32\).*needs \(2, 48\)") as info:
        PeftModel.from_pretrained(wider, tmp_path)
    assert "another base model" in str(info.value)
    # the failed load left the model plain
    assert not any(isinstance(m, AdaptedModule) for m in wider.modules())


def test_corrupt_and_truncated_files(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PeftkitError, match="not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2,')
    with pytest.raises(PeftkitError, match="not valid JSON"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with pytest.raises(PeftkitError, match="no adapter config"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path / "missing")


@pytest.mark.parametrize("change, message", [
    ({"rank": 4}, "unknown field 'rank' for LoraConfig; known fields: .*lora_alpha"),
    ({"r": "four"}, "LoraConfig.r must be int"),
    ({"peft_type": "MAGIC"}, "unknown peft_type 'MAGIC'; peftkit knows: .*LORA"),
    ({"lora_bias": True}, "lora_bias=True asks for a LoraConfig feature that peftkit does not support"),
])
def test_bad_config_files(tmp_path, change, message):
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(PeftkitError, match=message):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_save_is_atomic_no_temporary_files_left(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # overwriting works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_full_finetune_trains_everything_and_saves_a_plain_model(tmp_path, input_ids):
    from transformers import BertForSequenceClassification

    model = get_peft_model(tiny_bert(), FullFinetuneConfig())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == total
    randomise(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected)
    with pytest.raises(PeftkitError, match="cannot share"):
        model.add_adapter("x", LoraConfig(r=2, target_modules=["query"]))


def test_bitfit_freeze_and_lora_save_load_round_trip(tmp_path, input_ids):
    for config in [BitFitConfig(modules_to_save=["classifier"]), FreezeConfig(last_k=1, train_layernorm=True),
                   LoraConfig(r=2, target_modules="all-linear", bias="all")]:
        model = get_peft_model(tiny_bert(), config)
        randomise(model)
        with torch.no_grad():
            expected = model(input_ids=input_ids).logits
        folder = tmp_path / config.peft_type
        model.save_pretrained(folder)
        again = PeftModel.from_pretrained(tiny_bert(), folder)
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=input_ids).logits, expected)
            merged = again.merge_and_unload()
            torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    # mkstemp makes 0600 files; a saved adapter or report must be readable like any file the user writes.
    import os

    from peftkit import io

    previous = os.umask(0o022)
    try:
        io.write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "plain.json", "w") as handle:
            handle.write("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644
