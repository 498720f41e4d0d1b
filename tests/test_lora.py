"""LoRA on tiny models: counts equal peft's, merging is exact, options do what they say."""

import copy

import peft
import pytest
import torch
from conftest import TINY_MODELS, ConvNet, tiny_bert, tiny_gpt2, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import peftkit
from peftkit import LoraConfig, PeftkitError, get_peft_model

CONFIGS = [
    dict(r=4, target_modules=["query", "value"]),
    dict(r=8, lora_alpha=16, target_modules="all-linear"),
    dict(r=4, target_modules=".*attention.*(query|key)", bias="all"),
    dict(r=4, target_modules=["query", "value"], bias="lora_only", modules_to_save=["classifier"]),
    dict(r=2, target_modules=["query", "dense"], layers_to_transform=[0, 2], rank_pattern={"dense": 3}),
    dict(r=4, target_modules=["word_embeddings", "key"], use_rslora=True, alpha_pattern={"key": 2.0}),
    dict(r=4, target_modules="all-linear", exclude_modules=["pooler.dense"], task_type="SEQ_CLS"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_parameter_counts_equal_peft(kwargs):
    ours = get_peft_model(tiny_bert(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_report_line_matches_peft_format(capsys):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"]))
    model.print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"])).print_trainable_parameters()
    assert ours == capsys.readouterr().out
    report = model.trainable_parameters_report()
    assert report.trainable_bytes == report.trainable * 4
    assert 0 < report.share < 0.1


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("init", [False, "pissa"])
def test_merge_is_exact_and_unmerge_restores(family, init, input_ids):
    base = TINY_MODELS[family]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=init))
    if init == "pissa":  # PiSSA starts at the base; train a little so the adapter means something
        with torch.no_grad():
            for _name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.05)
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
        restored = model.base_model.state_dict()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for key, value in before.items():
        live = restored[key] if key in restored else restored[key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
        torch.testing.assert_close(live, value, rtol=0, atol=1e-6)


def test_merging_into_a_tied_embedding_is_refused(input_ids):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "wte"], init_lora_weights=False))
    with pytest.raises(PeftkitError, match="tied to"):
        model.merge_adapter()
    with torch.no_grad():  # nothing was merged half-way
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=input_ids).logits, tiny_gpt2()(input_ids=input_ids).logits)


def test_merge_and_unload_gives_plain_model_with_same_outputs(input_ids):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wpe"], init_lora_weights=False))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        plain = model.merge_and_unload()
        got = plain(input_ids=input_ids).logits
    assert not any(isinstance(m, peftkit.methods.base.AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_conv2d_and_plain_pytorch_model():
    image, labels = torch.randn(2, 3, 6, 6), torch.tensor([1, 7])
    net = ConvNet().eval()
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["conv", "head", "embed"], init_lora_weights=False))
    assert model.get_nb_trainable_parameters() == peft.get_peft_model(
        ConvNet(), peft.LoraConfig(r=2, target_modules=["conv", "head", "embed"])).get_nb_trainable_parameters()
    with torch.no_grad():
        out = model(image, labels)
        with model.disable_adapter():
            torch.testing.assert_close(model(image, labels), ConvNet().eval()(image, labels))
        plain = model.merge_and_unload()
        torch.testing.assert_close(plain(image, labels), out, rtol=1e-5, atol=1e-5)


def test_pissa_starts_at_base_and_differs_from_default_init(input_ids):
    base = tiny_llama()
    with torch.no_grad():
        reference = base(input_ids=input_ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, reference, rtol=1e-5, atol=1e-5)
    delta = next(m for _, m in peftkit.methods.base.adapted_modules(model.base_model)).adapters["default"]
    # B A reproduces the top singular directions of W / scale, so it is far from zero
    assert delta.lora_B.abs().sum() > 0


def test_only_adapter_parameters_train(input_ids):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], lora_dropout=0.1))
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("adapters.default.lora_" in n for n in names)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=torch.tensor([0, 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen_before[name]), name


@pytest.mark.parametrize("bad, message", [
    (dict(r=0, target_modules=["query"]), "must be a positive integer"),
    (dict(r=-2, target_modules=["query"]), "must be a positive integer"),
    (dict(r=4, target_modules=["qury"]), "matched no module"),
    (dict(r=4, target_modules=["query"], layers_to_transform=[7]), "selects no module"),
    (dict(r=4, target_modules=["LayerNorm"]), "adapts only"),
    (dict(r="8", target_modules=["query"]), "LoraConfig.r must be int"),
    (dict(r=4, target_modules=["query"], bias="some"), "LoraConfig.bias must be one of"),
    (dict(r=4, target_modules=["query"], lora_dropout=1.5), "lora_dropout"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    with pytest.raises(PeftkitError, match=message) as info:
        get_peft_model(tiny_bert(), LoraConfig(**bad))
    if "matched no module" in message:
        assert "query (Linear)" in str(info.value)  # lists the names that do exist


def test_wrap_failure_leaves_model_untouched():
    base = tiny_bert()
    expected = copy.deepcopy(base.state_dict())
    with pytest.raises(PeftkitError):
        get_peft_model(base, LoraConfig(r=4, target_modules=["query", "LayerNorm"]))
    assert base.state_dict().keys() == expected.keys()




@settings(max_examples=25, deadline=None)
@given(in_features=st.integers(1, 24), out_features=st.integers(1, 24), r=st.integers(1, 8),
       alpha=st.floats(0.5, 64), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_merge_matches_unmerged_for_any_shape(in_features, out_features, r, alpha, rslora, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(in_features, out_features), torch.nn.Tanh(), torch.nn.Linear(out_features, 3))
    before = [net[0].weight.clone(), net[2].weight.clone()]
    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["0", "2"],
                                           init_lora_weights=False))
    x = torch.randn(5, in_features)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    restored = [model.base_model[0].base_layer.weight, model.base_model[2].base_layer.weight]
    torch.testing.assert_close(restored[0], before[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(restored[1], before[1], rtol=0, atol=1e-5)
