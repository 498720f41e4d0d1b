"""LoHa and LoKr's shared page, run once per method over that method's own cases (test_loha.CASES,
test_lokr.CASES: Linear, rank/alpha patterns, layer choice, modules_to_save, Conv2d / Conv1d, grouped and
effective convolutions): counts and files both ways with Hugging Face peft, exact merging, generation, two
named adapters. What is specific to each method stays in test_loha.py / test_lokr.py."""

import copy

import peft
import pytest
import test_loha
import test_lokr
import torch
from conftest import logits, randomise, tiny_llama

from peftkit import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule, adapted_modules

# method -> (our config, peft's config, its cases, the second adapter of the two-adapter test)
METHODS = {
    "loha": (LoHaConfig, peft.LoHaConfig, test_loha.CASES,
             dict(r=4, alpha=2, target_modules=["v_proj", "down_proj"], use_effective_conv2d=True)),
    "lokr": (LoKrConfig, peft.LoKrConfig, test_lokr.CASES,
             dict(r=16, alpha=2, target_modules=["v_proj", "down_proj"], decompose_both=True)),
}
CASES = [(method, family) for method, (_, _, cases, _) in METHODS.items() for family in cases]


def _case(method, family):
    ours, theirs, cases, _ = METHODS[method]
    make, kwargs = cases[family]
    return ours, theirs, make, kwargs


def _inputs(family, input_ids, pixel_values):
    if family.startswith("convs"):
        return (torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4)),), {}
    if family == "vit":
        return (), {"pixel_values": pixel_values}
    return (), {"input_ids": input_ids}


@pytest.mark.parametrize("method, family", CASES)
def test_trainable_counts_equal_peft(method, family):
    ours, theirs, make, kwargs = _case(method, family)
    assert (get_peft_model(make(), ours(**kwargs)).get_nb_trainable_parameters()
            == peft.get_peft_model(make(), theirs(**kwargs)).get_nb_trainable_parameters())


@pytest.mark.parametrize("method, family", CASES)
def test_peftkit_adapter_loads_in_peft(method, family, tmp_path, input_ids, pixel_values):
    ours_config, _, make, kwargs = _case(method, family)
    args, inputs = _inputs(family, input_ids, pixel_values)
    ours = get_peft_model(make(), ours_config(**kwargs))
    randomise(ours, scale=0.3)
    expected = logits(ours, *args, **inputs)
    with ours.disable_adapter():
        assert not torch.allclose(logits(ours, *args, **inputs), expected, atol=1e-4)  # the adapter does something
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, *args, **inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, family", CASES)
def test_peft_adapter_loads_in_peftkit(method, family, tmp_path, input_ids, pixel_values):
    _, theirs_config, make, kwargs = _case(method, family)
    args, inputs = _inputs(family, input_ids, pixel_values)
    theirs = peft.get_peft_model(make(), theirs_config(**kwargs))
    randomise(theirs, scale=0.3)
    theirs.eval()
    expected = logits(theirs, *args, **inputs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(ours, *args, **inputs), expected, rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in peft
    trainable = PeftModel.from_pretrained(make(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method, family", CASES)
def test_merge_is_exact_unmerge_restores_and_unload_is_plain(method, family, input_ids, pixel_values):
    ours_config, _, make, kwargs = _case(method, family)
    args, inputs = _inputs(family, input_ids, pixel_values)
    base = make()
    before = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, ours_config(**kwargs))
    randomise(model, scale=0.3)
    unmerged = logits(model, *args, **inputs)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, *args, **inputs), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for path, module in adapted_modules(model.base_model):
        for key, value in module.base_layer.state_dict().items():
            torch.testing.assert_close(value, before[f"{path}.{key}"], rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(logits(plain, *args, **inputs), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_on_llama_matches_greedy_decoding_and_the_merged_model(method, input_ids):
    model = get_peft_model(tiny_llama(), METHODS[method][0](r=2, alpha=4, target_modules="all-linear"))
    randomise(model, seed=7, scale=0.3)
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
        sequence = input_ids
        for _ in range(5):
            next_token = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
        assert torch.equal(generated, sequence)
        with model.disable_adapter():
            assert not torch.equal(model.generate(input_ids, max_new_tokens=5, do_sample=False), generated)
        merged = model.merge_and_unload()
        assert torch.equal(merged.generate(input_ids, max_new_tokens=5, do_sample=False), generated)


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_and_two_named_adapters(method, tmp_path, input_ids):
    ours_config, _, _, second_fields = METHODS[method]
    model = get_peft_model(tiny_llama(), ours_config(r=2, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", ours_config(**second_fields))
    randomise(model, scale=0.3)  # only "default" is trainable now
    model.set_adapter("second")
    randomise(model, seed=5, scale=0.3)
    second = logits(model, input_ids=input_ids)
    model.set_adapter("default")
    default = logits(model, input_ids=input_ids)
    assert not torch.allclose(default, second, atol=1e-4)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    again.load_adapter(tmp_path / "second", "second")
    torch.testing.assert_close(logits(again, input_ids=input_ids), default, rtol=0, atol=0)
    again.set_adapter("second")
    torch.testing.assert_close(logits(again, input_ids=input_ids), second, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    theirs.set_adapter("second")
    torch.testing.assert_close(logits(theirs, input_ids=input_ids), second, rtol=1e-5, atol=1e-5)
    model.delete_adapter("second")
    torch.testing.assert_close(logits(model, input_ids=input_ids), default, rtol=0, atol=0)
