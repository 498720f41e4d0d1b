"""DoRA (LoraConfig(use_dora=True)): same math, gradients, files and counts as peft; exact merging."""

import copy
import json

import peft
import pytest
import torch
from conftest import ConvNet, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file

from peftkit import LoraConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule, adapted_modules
from peftkit.train.job import METHOD_DEFAULTS, method_config

FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}
CASES = {
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], bias="lora_only",
                 modules_to_save=["classifier"], rank_pattern={"value": 2}),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                  alpha_pattern={"v_proj": 3.0}, layers_to_transform=[1]),
    "vit": dict(r=4, target_modules="all-linear", lora_alpha=4),
}


def _inputs(family, input_ids, pixel_values):
    return {"pixel_values": pixel_values} if family == "vit" else {"input_ids": input_ids}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _file_key(parameter_name):
    """A trainable parameter's name in peftkit or peft, reduced to the module path plus tensor kind."""
    for prefix in ("base_model.model.", "base_model."):
        if parameter_name.startswith(prefix):
            parameter_name = parameter_name[len(prefix):]
            break
    parts = [p for p in parameter_name.split(".") if p not in ("adapters", "default", "modules_to_save", "module")]
    if len(parts) > 1 and parts[-2].startswith("lora_") and parts[-1] == "weight":
        parts = parts[:-1]  # peft holds lora_A etc. in nn.Linear modules
    return ".".join(parts)


@pytest.mark.parametrize("family", list(CASES))
def test_counts_and_files_move_both_ways_with_peft(family, tmp_path, input_ids, pixel_values):
    inputs = _inputs(family, input_ids, pixel_values)
    make = FAMILIES[family]
    ours = get_peft_model(make(), LoraConfig(use_dora=True, **CASES[family]))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(use_dora=True, **CASES[family]))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

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


def test_magnitude_key_shape_and_start_value_are_peft_s(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    assert tensors[key].shape == (96,)  # one per output feature of c_attn (Conv1D weight is (in=32, out=96))
    weight = tiny_gpt2().transformer.h[0].attn.c_attn.weight  # (in, out)
    torch.testing.assert_close(tensors[key], weight.norm(dim=0))  # norm of each output channel's weights
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True

    bert = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["intermediate.dense"], use_dora=True))
    delta = bert.base_model.bert.encoder.layer[0].intermediate.dense.adapters["default"]
    dense = tiny_bert().bert.encoder.layer[0].intermediate.dense.weight  # (out=64, in=32)
    torch.testing.assert_close(delta.lora_magnitude_vector.detach(), dense.norm(dim=1))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_gradients_equal_peft_s(dropout, tmp_path, input_ids):
    """Same loss and gradients as peft in training mode: the weight norm is detached, and dropout is
    applied to the input of the whole DoRA update, as in peft."""
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"], lora_dropout=dropout,
                  modules_to_save=["classifier"])
    ours = get_peft_model(tiny_bert(), LoraConfig(use_dora=True, **config))
    randomise(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    labels = torch.tensor([0, 2])
    grads = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)  # the same dropout masks in both
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        grads.append({_file_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any(k.endswith("lora_magnitude_vector") for k in grads[0])
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_weight_norm_is_a_constant_in_backward():
    # y = m * (W + s B A) x / ||W + s B A||: with a detached norm, dy/dm is the direction part alone.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False))
    delta = model.base_model[0].adapters["default"]
    x = torch.randn(3, 6)
    model(x).sum().backward()
    weight = net[0].base_layer.weight
    combined = weight + delta.delta_weight().detach()
    norm = combined.norm(dim=1)
    torch.testing.assert_close(delta.lora_magnitude_vector.grad, ((x @ combined.T) / norm).sum(0))
    expected_b_grad = (delta.lora_magnitude_vector / norm)[:, None] * delta.scaling * (x @ delta.lora_A.T).sum(0)[None, :]
    torch.testing.assert_close(delta.lora_B.grad, expected_b_grad.detach())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_training_changes_only_the_adapter_and_disable_gives_the_base(family, input_ids, pixel_values):
    inputs = _inputs(family, input_ids, pixel_values)
    model = get_peft_model(FAMILIES[family](), LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                          lora_dropout=0.1))
    base_logits = _logits(FAMILIES[family](), inputs)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapters.default.lora_" in n for n in names)
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        logits = model(**inputs).logits
        logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name
    assert all(not torch.equal(p, trained_before[n]) for n, p in model.named_parameters() if n in trained_before
               and n.endswith("lora_magnitude_vector"))
    assert not torch.allclose(_logits(model, inputs), base_logits, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), base_logits, rtol=0, atol=0)


def test_merging_two_stacked_adapters_uses_the_unmerged_weight_norm(input_ids):
    """With two adapters on one layer, the second one's norm is of the base weight as forward sees it
    (without the first adapter merged into it), as in peft."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "up_proj"], use_dora=True))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("third", LoraConfig(r=3, target_modules=["q_proj", "up_proj"], use_dora=True))
    model.set_adapter(["default", "plain", "third"])
    randomise(model)
    unmerged = _logits(model, {"input_ids": input_ids})
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, {"input_ids": input_ids}), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, {"input_ids": input_ids}), _logits(tiny_llama(), {"input_ids": input_ids}),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_matches_greedy_decoding_and_the_merged_model(family, input_ids):
    model = get_peft_model(FAMILIES[family](), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomise(model, seed=7)
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
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    model.add_adapter("second", LoraConfig(r=3, target_modules=["c_attn", "c_fc"], use_dora=True, lora_alpha=6))
    randomise(model)  # only "default" is trainable now
    model.set_adapter("second")
    randomise(model, seed=5)
    second = _logits(model, inputs)
    model.set_adapter("default")
    default = _logits(model, inputs)
    assert not torch.allclose(default, second, atol=1e-4)
    copied = copy.deepcopy(model)  # each DoRA layer reads its own copy's base weight
    layer = copied.base_model.transformer.h[0].attn.c_attn
    assert layer.adapters["default"]._base_layer is layer.base_layer
    torch.testing.assert_close(_logits(copied, inputs), default, rtol=0, atol=0)
    model.save_pretrained(tmp_path)

    again = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    again.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(_logits(again, inputs), default, rtol=0, atol=0)
    again.set_adapter("second")
    torch.testing.assert_close(_logits(again, inputs), second, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    theirs.set_adapter("second")
    torch.testing.assert_close(_logits(theirs, inputs), second, rtol=1e-5, atol=1e-6)


def test_conv2d_matches_peft_and_merges_exactly(tmp_path):
    image, labels = torch.randn(2, 3, 6, 6), torch.tensor([1, 7])
    config = dict(r=2, target_modules=["conv", "head"], use_dora=True)
    ours = get_peft_model(ConvNet().eval(), LoraConfig(**config))
    theirs = peft.get_peft_model(ConvNet().eval(), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomise(ours)
    with torch.no_grad():
        expected = ours(image, labels)
    ours.save_pretrained(tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.model.conv.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    loaded = peft.PeftModel.from_pretrained(ConvNet().eval(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, labels), expected, rtol=1e-5, atol=1e-6)
        again = PeftModel.from_pretrained(ConvNet().eval(), tmp_path)
        torch.testing.assert_close(again(image, labels), expected, rtol=0, atol=0)
        plain = ours.merge_and_unload()
        torch.testing.assert_close(plain(image, labels), expected, rtol=1e-5, atol=1e-5)


def test_pissa_start_is_saved_as_plain_dora_that_peft_loads(tmp_path, input_ids):
    inputs = {"input_ids": input_ids}
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "o_proj"], use_dora=True,
                                                    init_lora_weights="pissa"))
    torch.testing.assert_close(_logits(model, inputs), _logits(tiny_llama(), inputs), rtol=1e-5, atol=1e-5)
    randomise(model)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(theirs, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [["word_embeddings"], ["query", "word_embeddings", "position_embeddings"]])
def test_dora_on_an_embedding_is_refused_naming_the_module(target):
    base = tiny_bert()
    expected = copy.deepcopy(base.state_dict())
    with pytest.raises(PeftkitError, match=r"'bert\.embeddings\.word_embeddings' \(an Embedding") as info:
        get_peft_model(base, LoraConfig(r=2, target_modules=target, use_dora=True))
    assert "Linear, GPT-2 Conv1D and Conv2d" in str(info.value)
    assert base.state_dict().keys() == expected.keys()  # nothing left attached
    assert not any(isinstance(m, AdaptedModule) for m in base.modules())
    # plain LoRA on the same embedding still works
    get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=target))


def test_peft_dora_file_on_an_embedding_is_refused_clearly(tmp_path):
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn", "wte"], use_dora=True))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(PeftkitError, match="transformer.wte"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_use_dora_must_be_a_bool_and_is_a_real_field():
    with pytest.raises(PeftkitError, match="LoraConfig.use_dora must be bool"):
        LoraConfig(r=2, target_modules=["query"], use_dora="yes")
    assert "use_dora" not in LoraConfig.peft_neutral_fields
    assert LoraConfig(r=2, target_modules=["query"], use_dora=True).to_dict()["use_dora"] is True


def test_cli_default_is_lora_s_plus_dora():
    cls, defaults, learning_rate = METHOD_DEFAULTS["dora"]
    lora_cls, lora_defaults, lora_rate = METHOD_DEFAULTS["lora"]
    assert cls is lora_cls and defaults == {**lora_defaults, "use_dora": True} and learning_rate == lora_rate
    config = method_config("dora")
    assert config.use_dora and config.task_type == "SEQ_CLS"
    model = get_peft_model(tiny_bert(), config)
    assert len(list(adapted_modules(model.base_model))) > 0
