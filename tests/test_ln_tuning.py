"""LayerNorm tuning on tiny models: same keys, counts and outputs as Hugging Face peft; exact merging."""

import copy
import json

import peft
import pytest
import torch
from conftest import TINY_MODELS, ConvNet, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file

from peftkit import LNTuningConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule

# peft has defaults for gpt2 and llama but not bert, so bert names its LayerNorms
CASES = {
    "bert": dict(target_modules=["LayerNorm"], task_type="SEQ_CLS"),
    "gpt2": dict(),
    "llama": dict(exclude_modules=["model.norm"]),
}


@pytest.mark.parametrize("family", list(CASES))
def test_parameter_counts_equal_peft(family):
    ours = get_peft_model(TINY_MODELS[family](), LNTuningConfig(**CASES[family]))
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft.LNTuningConfig(**CASES[family]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_saved_keys_and_config_use_peft_layout(tmp_path):
    model = get_peft_model(tiny_llama(), LNTuningConfig())
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight" in keys
    assert "base_model.model.model.norm.ln_tuning_layers.weight" in keys
    assert len(keys) == 5  # two per block, plus the final norm
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING"
    assert config["target_modules"] == ["input_layernorm", "post_attention_layernorm", "norm"]


@pytest.mark.parametrize("family", list(CASES))
def test_peftkit_adapter_loads_in_peft(family, tmp_path, input_ids):
    ours = get_peft_model(TINY_MODELS[family](), LNTuningConfig(**CASES[family]))
    randomise(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
        with ours.disable_adapter():
            assert not torch.allclose(ours(input_ids=input_ids).logits, expected, atol=1e-3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(CASES))
def test_peft_adapter_loads_in_peftkit(family, tmp_path, input_ids):
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft.LNTuningConfig(**CASES[family]))
    randomise(theirs)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path, adapter_name="t", is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_bert_default_trains_every_layernorm_and_peft_reads_the_saved_names(tmp_path, input_ids):
    # peft has no default for bert; peftkit finds the LayerNorms and writes their names
    ours = get_peft_model(tiny_bert(), LNTuningConfig(task_type="SEQ_CLS"))
    theirs = peft.get_peft_model(tiny_bert(), peft.LNTuningConfig(target_modules=["LayerNorm"], task_type="SEQ_CLS"))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomise(ours)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["LayerNorm"]
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, ours(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)


def test_training_changes_only_the_copies_and_head(input_ids):
    base = tiny_bert()
    with torch.no_grad():
        reference = tiny_bert()(input_ids=input_ids).logits
    model = get_peft_model(base, LNTuningConfig(task_type="SEQ_CLS"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("LayerNorm.adapters.default.module." in n or "classifier" in n for n in names)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    copies = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad and "LayerNorm" in n}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=input_ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
        elif name in copies:
            assert not torch.equal(parameter, copies[name]), name
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference, rtol=0, atol=0)


def test_save_load_round_trip_and_two_named_adapters(tmp_path, input_ids):
    model = get_peft_model(tiny_gpt2(), LNTuningConfig())
    model.add_adapter("other", LNTuningConfig(target_modules=["ln_f"]))
    randomise(model)
    model.set_adapter("other")
    randomise(model, seed=5)
    outputs = {}
    with torch.no_grad():
        for name in ["default", "other"]:
            model.set_adapter(name)
            outputs[name] = model(input_ids=input_ids).logits
    assert not torch.allclose(outputs["default"], outputs["other"], atol=1e-3)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        for name in ["default", "other"]:
            loaded.set_adapter(name)
            torch.testing.assert_close(loaded(input_ids=input_ids).logits, outputs[name], rtol=0, atol=0)


def _greedy_without_cache(model, input_ids, steps):
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_generate_matches_step_by_step_and_merged(family, input_ids):
    model = get_peft_model(TINY_MODELS[family](), LNTuningConfig())
    randomise(model, seed=7)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(input_ids))
    with torch.no_grad():
        generated = model.generate(input_ids, **options)
        assert torch.equal(generated, _greedy_without_cache(model, input_ids, 5))
        merged = model.merge_and_unload().generate(input_ids, **options)
    assert torch.equal(generated, merged)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_merge_is_exact_and_unmerge_restores_bit_for_bit(family, input_ids):
    base = TINY_MODELS[family]()
    before = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, LNTuningConfig(target_modules=["LayerNorm"]) if family == "bert" else LNTuningConfig())
    randomise(model)
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)
    for key, value in model.unload().state_dict().items():
        assert torch.equal(value, before[key]), key


def test_vit_default_finds_the_layernorms(pixel_values, tmp_path):
    model = get_peft_model(tiny_vit(), LNTuningConfig(task_type="SEQ_CLS"))
    norms = sum(isinstance(m, torch.nn.LayerNorm) for m in tiny_vit().modules())
    assert sum(isinstance(m, AdaptedModule) for m in model.modules()) == norms + 1  # and the classifier head
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(pixel_values=pixel_values, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=pixel_values).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.merge_and_unload()(pixel_values=pixel_values).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_fn, kwargs, message", [
    (ConvNet, dict(), "has no LayerNorm or RMSNorm layer to train; pass target_modules"),
    (tiny_bert, dict(target_modules=["LayerNrom"]), "matched no module"),
    (tiny_bert, dict(target_modules=["dropout"]), "has no parameters to train"),
    (tiny_bert, dict(target_modules="LayerNorm"), "selects no module"),  # a regex must match the whole path
    (tiny_bert, dict(target_modules=["LayerNorm"], modules_to_save="classifier"), "modules_to_save must be"),
])
def test_bad_inputs_get_clear_errors_at_wrap_time(model_fn, kwargs, message):
    base = model_fn()
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, LNTuningConfig(**kwargs))
    assert not any(isinstance(m, AdaptedModule) for m in base.modules())


def test_cli_default_config_wraps_a_bert_classifier():
    from peftkit.train.job import method_config

    model = get_peft_model(tiny_bert(), method_config("ln_tuning"))
    adapted = {type(m.base_layer).__name__ for m in model.modules() if isinstance(m, AdaptedModule)}
    assert adapted == {"LayerNorm", "Linear"}  # every LayerNorm, and the classifier head
    assert model.peft_config["default"].target_modules == ["LayerNorm"]
