"""VeRA: shared random projections rebuilt exactly as peft builds them, files and counts as peft's, exact merge."""

import copy
import json

import peft
import pytest
import torch
from conftest import ConvNet, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file, save_file

from peftkit import PeftkitError, PeftModel, VeraConfig, get_peft_model
from peftkit.methods.base import AdaptedModule
from peftkit.methods.vera import VeraProjections, shared_projections
from peftkit.train.job import METHOD_DEFAULTS, method_config

FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}
CASES = {
    "bert": dict(r=16, target_modules=["query", "value", "intermediate.dense", "output.dense"], bias="vera_only",
                 modules_to_save=["classifier"]),
    "gpt2": dict(r=8, target_modules=["c_attn", "c_fc", "c_proj"], projection_prng_key=123, d_initial=0.3),
    # k_proj and v_proj are 32 -> 16, down_proj 64 -> 32: every layer slices a different part
    "llama": dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                  save_projection=False, projection_prng_key=7),
    "vit": dict(r=32, target_modules="all-linear", bias="all"),
}


def _inputs(family, input_ids, pixel_values):
    return {"pixel_values": pixel_values} if family == "vit" else {"input_ids": input_ids}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _projections(model) -> VeraProjections:
    return model.model_adapters[model.active_adapter]


@pytest.mark.parametrize("family", list(CASES))
def test_counts_and_files_move_both_ways_with_peft(family, tmp_path, input_ids, pixel_values):
    inputs = _inputs(family, input_ids, pixel_values)
    make = FAMILIES[family]
    ours = get_peft_model(make(), VeraConfig(**CASES[family]))
    theirs = peft.get_peft_model(make(), peft.VeraConfig(**CASES[family]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    peft_A = next(b for n, b in theirs.named_buffers() if ".vera_A." in n)
    peft_B = next(b for n, b in theirs.named_buffers() if ".vera_B." in n)
    assert torch.equal(_projections(ours).vera_A, peft_A) and torch.equal(_projections(ours).vera_B, peft_B)

    randomise(ours)
    expected = _logits(ours, inputs)
    assert not torch.allclose(expected, _logits(make(), inputs), atol=1e-3)  # the adapter does something
    ours.save_pretrained(tmp_path / "ours")
    loaded_in_peft = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded_in_peft, inputs), expected, rtol=1e-5, atol=1e-6)

    randomise(theirs, seed=4)
    theirs.eval()
    expected = _logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = PeftModel.from_pretrained(make(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded_in_ours, inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("save_projection", [True, False])
def test_file_keys_are_peft_s(save_projection, tmp_path):
    model = get_peft_model(tiny_gpt2(), VeraConfig(r=8, target_modules=["c_attn", "attn.c_proj"], save_projection=save_projection))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b"].shape == (96,)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.vera_lambda_d"].shape == (8,)
    if save_projection:
        # c_attn is 32 -> 96, c_proj (attention) 32 -> 32: the projections cover the largest of each
        assert tensors["base_model.vera_A"].shape == (8, 32) and tensors["base_model.vera_B"].shape == (96, 8)
    else:
        assert not any("vera_A" in k or "vera_B" in k for k in tensors)
    assert len(tensors) == 2 * 4 + (2 if save_projection else 0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is save_projection


def test_projections_follow_the_key_and_each_layer_slices_its_part():
    first_A, first_B = shared_projections(4, 10, 12, key=0)
    again_A, _ = shared_projections(4, 10, 12, key=0)
    other_A, _ = shared_projections(4, 10, 12, key=1)
    assert torch.equal(first_A, again_A) and not torch.equal(first_A, other_A)
    bound_A, bound_B = (6 / 10) ** 0.5, (6 / 4) ** 0.5  # kaiming uniform with fan-in = columns
    assert first_A.abs().max() <= bound_A and first_A.abs().max() > 0.8 * bound_A
    assert first_B.abs().max() <= bound_B and first_B.shape == (12, 4)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3), torch.nn.Linear(3, 10))
    model = get_peft_model(net, VeraConfig(r=4, target_modules=["0", "2", "3"], init_weights=False))
    vera_A, vera_B = _projections(model).vera_A, _projections(model).vera_B
    assert vera_A.shape == (4, 12) and vera_B.shape == (12, 4)
    x = torch.randn(5, 3)
    layer = model.base_model[3]  # 3 -> 10: A[:, :3], B[:10, :]
    delta = layer.adapters["default"]
    expected = layer.base_layer(x) + delta.vera_lambda_b * ((delta.vera_lambda_d * (x @ vera_A[:, :3].T)) @ vera_B[:10].T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_training_changes_only_the_lambdas_and_disable_gives_the_base(family, input_ids, pixel_values):
    inputs = _inputs(family, input_ids, pixel_values)
    model = get_peft_model(FAMILIES[family](), VeraConfig(r=16, target_modules="all-linear", vera_dropout=0.1))
    base_logits = _logits(FAMILIES[family](), inputs)
    torch.testing.assert_close(_logits(model, inputs), base_logits, rtol=0, atol=0)  # lambda_b starts at 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.split(".")[-1] in ("vera_lambda_b", "vera_lambda_d") for n in names)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    projections_before = [b.clone() for b in _projections(model).buffers()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name
    assert all(torch.equal(a, b) for a, b in zip(_projections(model).buffers(), projections_before))
    assert not torch.allclose(_logits(model, inputs), base_logits, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), base_logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_matches_greedy_decoding_and_the_merged_model(family, input_ids):
    model = get_peft_model(FAMILIES[family](), VeraConfig(r=16, target_modules="all-linear", init_weights=False))
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


def test_save_load_round_trip_and_two_named_adapters(tmp_path, input_ids):
    inputs = {"input_ids": input_ids}
    model = get_peft_model(tiny_gpt2(), VeraConfig(r=8, target_modules=["c_attn"]))
    model.add_adapter("second", VeraConfig(r=8, target_modules=["c_attn"], d_initial=0.5))
    # each peftkit adapter has its own projections: another key, rank, shapes, not saved
    model.add_adapter("third", VeraConfig(r=4, target_modules=["c_fc", "c_proj"], projection_prng_key=9,
                                          save_projection=False))
    randomise(model)  # only "default" is trainable now
    results = {"default": _logits(model, inputs)}
    for index, name in enumerate(["second", "third"]):
        model.set_adapter(name)
        randomise(model, seed=5 + index)
        results[name] = _logits(model, inputs)
    assert not torch.allclose(results["default"], results["second"], atol=1e-4)
    model.save_pretrained(tmp_path)

    again = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    again.load_adapter(tmp_path / "second", adapter_name="second")
    again.load_adapter(tmp_path / "third", adapter_name="third")
    for name, expected in results.items():
        again.set_adapter(name)
        torch.testing.assert_close(_logits(again, inputs), expected, rtol=0, atol=0)
    # peft shares one pair of projections between its VeRA adapters, so it takes adapters with the same key,
    # shapes and save_projection only
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ["default", "second"]:
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(theirs, inputs), results[name], rtol=1e-5, atol=1e-6)


def test_a_saved_projection_must_be_sliceable_for_every_layer(tmp_path, input_ids):
    model = get_peft_model(tiny_gpt2(), VeraConfig(r=8, target_modules=["c_attn", "c_fc"]))
    randomise(model)
    expected = _logits(model, {"input_ids": input_ids})
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    # larger than needed (sized over more layers): each layer still slices its part
    bigger = dict(tensors, **{"base_model.vera_B": torch.cat([tensors["base_model.vera_B"], torch.randn(20, 8)])})
    save_file(bigger, path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(_logits(loaded, {"input_ids": input_ids}), expected, rtol=0, atol=0)
    assert _projections(loaded).vera_B.shape == (148, 8)
    # too small for c_fc (32 -> 128)
    save_file(dict(tensors, **{"base_model.vera_B": tensors["base_model.vera_B"][:96]}), path)
    with pytest.raises(PeftkitError, match=r"base_model.vera_B has shape \(96, 8\), but the adapted layers need at least \(128, 8\)"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("bad, message", [
    (dict(r=0, target_modules=["query"]), "VeraConfig.r must be a positive integer"),
    (dict(r=8, target_modules=["query"], vera_dropout=1.5), "vera_dropout must be in"),
    (dict(r=8, target_modules=["query"], bias="lora_only"), "VeraConfig.bias must be one of"),
    (dict(r=8, target_modules=["query"], layers_pattern="layer"), "layers_pattern only applies together with layers_to_transform"),
    (dict(r=8, target_modules=["quer"]), "matched no module"),
    (dict(r=8, target_modules=["query", "word_embeddings"]), r"'bert.embeddings.word_embeddings' is a Embedding; this method adapts only Linear, Conv1D"),
    (dict(r=8, target_modules=["LayerNorm"]), "adapts only Linear, Conv1D"),
    (dict(r="8", target_modules=["query"]), "VeraConfig.r must be int"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    base = tiny_bert()
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, VeraConfig(**bad))
    assert not any(isinstance(m, AdaptedModule) for m in base.modules())


def test_a_conv2d_layer_is_refused_at_wrap_time():
    with pytest.raises(PeftkitError, match="module 'conv' is a Conv2d; this method adapts only Linear"):
        get_peft_model(ConvNet(), VeraConfig(r=4, target_modules=["conv", "head"]))


def test_model_dtype_change_moves_the_projections(input_ids):
    model = get_peft_model(tiny_llama(), VeraConfig(r=8, target_modules=["q_proj", "up_proj"], init_weights=False))
    expected = _logits(model, {"input_ids": input_ids})
    model.to(torch.float64)
    assert _projections(model).vera_A.dtype == torch.float64
    torch.testing.assert_close(_logits(model, {"input_ids": input_ids}).float(), expected, rtol=1e-4, atol=1e-5)
    copied = copy.deepcopy(model)  # the copy's layers read the copy's projections
    assert next(iter(copied.model_adapters.values())) is not _projections(model)
    torch.testing.assert_close(_logits(copied, {"input_ids": input_ids}), _logits(model, {"input_ids": input_ids}))


def test_cli_default_config_wraps_a_classifier():
    cls, defaults, learning_rate = METHOD_DEFAULTS["vera"]
    assert cls is VeraConfig and defaults["r"] == 256 and defaults["target_modules"] == "all-linear"
    assert 1e-3 <= learning_rate <= 3e-2
    config = method_config("vera")
    model = get_peft_model(tiny_bert(), config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".classifier." in n for n in names)  # SEQ_CLS trains the new head
    assert _projections(model).vera_A.shape == (256, 64)
