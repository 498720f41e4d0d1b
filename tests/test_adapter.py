"""Bottleneck adapters: placement per model family, the two forms' math, training, files, errors.

Hugging Face peft has no bottleneck adapter, so there is no interop test; files are peftkit's own.
"""

import json

import pytest
import torch
from conftest import ConvNet, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file
from torch import nn

from peftkit import BottleneckConfig, PeftkitError, PeftModel, get_peft_model, load_config
from peftkit.methods.adapter import BottleneckDelta
from peftkit.methods.base import AdaptedModule, adapted_modules

FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}

# (attention output projection, feed-forward output projection) of block 0 in each tiny model
BLOCK_ZERO = {
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "vit": ("vit.layers.0.attention.o_proj", "vit.layers.0.mlp.fc2"),
}
BLOCKS = {"bert": 3, "gpt2": 2, "llama": 2, "vit": 2}


def _inputs(family, input_ids, pixel_values):
    return {"pixel_values": pixel_values} if family == "vit" else {"input_ids": input_ids}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _delta(model, path, adapter_name="default") -> BottleneckDelta:
    return dict(adapted_modules(model.base_model))[path].adapters[adapter_name]


@pytest.mark.parametrize("form", ["sequential", "parallel"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_new_adapter_leaves_the_model_exactly_as_it_was(family, form, input_ids, pixel_values):
    inputs = _inputs(family, input_ids, pixel_values)
    expected = _logits(FAMILIES[family](), inputs)
    model = get_peft_model(FAMILIES[family](), BottleneckConfig(bottleneck_size=8, form=form, activation="tanh"))
    torch.testing.assert_close(_logits(model, inputs), expected, rtol=0, atol=0)
    randomise(model, scale=0.3)  # the adapters are really in the path: a trained one changes the output
    assert not torch.allclose(_logits(model, inputs), expected, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_houlsby_and_pfeiffer_placements(family):
    attention, feed_forward = BLOCK_ZERO[family]
    houlsby = get_peft_model(FAMILIES[family](), BottleneckConfig(bottleneck_size=4, placement="houlsby"))
    pfeiffer = get_peft_model(FAMILIES[family](), BottleneckConfig(bottleneck_size=4, placement="pfeiffer"))
    houlsby_paths = houlsby._targets["default"]
    pfeiffer_paths = pfeiffer._targets["default"]
    assert houlsby_paths[:2] == [attention, feed_forward]
    assert len(houlsby_paths) == 2 * BLOCKS[family]
    assert pfeiffer_paths[0] == feed_forward and len(pfeiffer_paths) == BLOCKS[family]
    assert set(pfeiffer_paths) < set(houlsby_paths)
    adapted = [path for path, _ in adapted_modules(pfeiffer.base_model)]
    assert adapted == pfeiffer_paths and attention not in adapted


def test_bert_adapts_the_dense_projections_before_residual_and_layernorm():
    model = get_peft_model(tiny_bert(), BottleneckConfig(bottleneck_size=4))
    layer = model.base_model.bert.encoder.layer[0]
    # the adapter wraps the dense projection; LayerNorm (with the residual) stays after it, unwrapped
    assert isinstance(layer.attention.output.dense, AdaptedModule)
    assert isinstance(layer.output.dense, AdaptedModule)
    assert not isinstance(layer.intermediate.dense, AdaptedModule)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm)


@pytest.mark.parametrize("activation, function", [
    ("relu", torch.relu), ("gelu", nn.functional.gelu), ("tanh", torch.tanh), ("swish", nn.functional.silu),
    ("silu", nn.functional.silu),
])
@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_forms_compute_what_the_docs_say(form, activation, function):
    # Llama's down_proj reads 64 features and writes 32: the two forms read different widths.
    model = get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=6, form=form, activation=activation, scaling=0.7))
    randomise(model, scale=0.3)
    wrapped = model.base_model.model.layers[0].mlp.down_proj
    delta = wrapped.adapters["default"]
    read_width = 64 if form == "parallel" else 32
    assert delta.adapter_down.weight.shape == (6, read_width)
    assert delta.adapter_up.weight.shape == (32, 6)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = wrapped.base_layer(x)
        read = x if form == "parallel" else h
        hidden = function(read @ delta.adapter_down.weight.T + delta.adapter_down.bias)
        expected = h + 0.7 * (hidden @ delta.adapter_up.weight.T + delta.adapter_up.bias)
        torch.testing.assert_close(wrapped(x), expected)


def test_sequential_and_parallel_differ_and_scaling_scales_the_update(input_ids):
    outputs = {}
    for form in ("sequential", "parallel"):
        for scaling in (1.0, 0.5):
            model = get_peft_model(tiny_gpt2(), BottleneckConfig(bottleneck_size=4, form=form, scaling=scaling))
            randomise(model, scale=0.3)
            wrapped = model.base_model.transformer.h[0].attn.c_proj
            x = torch.randn(1, 3, 32)
            with torch.no_grad():
                outputs[form, scaling] = (wrapped(x), wrapped.base_layer(x))
    for form in ("sequential", "parallel"):
        (full, base), (half, _) = outputs[form, 1.0], outputs[form, 0.5]
        torch.testing.assert_close(half - base, (full - base) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs["sequential", 1.0][0], outputs["parallel", 1.0][0])


@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_training_changes_only_adapter_tensors(form, input_ids):
    model = get_peft_model(tiny_bert(), BottleneckConfig(bottleneck_size=8, form=form, dropout=0.1))
    expected_base = _logits(tiny_bert(), {"input_ids": input_ids})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.adapter_down." in n or ".adapters.default.adapter_up." in n for n in trainable)
    assert len(trainable) == 4 * 6  # down/up weight and bias at 6 places
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=input_ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, before[name]), f"{name} did not train"
        else:
            assert torch.equal(parameter, before[name]), f"{name} is frozen but changed"
    trained = _logits(model, {"input_ids": input_ids})
    assert not torch.allclose(trained, expected_base, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, {"input_ids": input_ids}), expected_base, rtol=0, atol=0)


def test_trainable_count_and_modules_to_save(input_ids):
    model = get_peft_model(tiny_bert(), BottleneckConfig(bottleneck_size=8, task_type="SEQ_CLS"))
    per_adapter = (32 * 8 + 8) + (8 * 32 + 32)
    classifier = 32 * 3 + 3
    assert model.get_nb_trainable_parameters()[0] == 6 * per_adapter + classifier
    parallel = get_peft_model(tiny_gpt2(), BottleneckConfig(bottleneck_size=8, form="parallel", placement="pfeiffer"))
    assert parallel.get_nb_trainable_parameters()[0] == 2 * ((128 * 8 + 8) + (8 * 32 + 32))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_load_round_trip(family, tmp_path, input_ids, pixel_values):
    inputs = _inputs(family, input_ids, pixel_values)
    config = BottleneckConfig(reduction_factor=4, form="parallel", activation="gelu", scaling=2.0, modules_to_save=(
        ["classifier"] if family in ("bert", "vit") else None))
    model = get_peft_model(FAMILIES[family](), config)
    randomise(model, scale=0.3)
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    attention, feed_forward = BLOCK_ZERO[family]
    for path in (attention, feed_forward):
        for suffix in ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"):
            assert f"base_model.model.{path}.{suffix}" in keys
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["reduction_factor"] == 4 and saved["form"] == "parallel"
    assert load_config(tmp_path) == model.peft_config["default"].replace(inference_mode=True, base_model_name_or_path=saved["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(FAMILIES[family](), tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs), expected, rtol=0, atol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(FAMILIES[family](), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_loading_into_another_model_size_is_refused(tmp_path):
    model = get_peft_model(tiny_bert(), BottleneckConfig(bottleneck_size=8))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    from safetensors.torch import save_file
    key = "base_model.model.bert.encoder.layer.0.output.dense.adapter_down.weight"
    saved[key] = torch.zeros(8, 16)
    save_file(saved, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"adapter_down.weight has shape \(8, 16\)"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_two_named_adapters_switch_and_stack(input_ids):
    model = get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=4))
    model.add_adapter("parallel", BottleneckConfig(bottleneck_size=6, form="parallel", placement="pfeiffer"))
    randomise(model, scale=0.3)  # only "default" is active, so only it is trainable
    model.set_adapter("parallel")
    randomise(model, seed=4, scale=0.3)
    inputs = {"input_ids": input_ids}
    base = _logits(tiny_llama(), inputs)
    parallel_only = _logits(model, inputs)
    model.set_adapter("default")
    default_only = _logits(model, inputs)
    assert not torch.allclose(parallel_only, default_only, atol=1e-4)
    assert not torch.allclose(parallel_only, base, atol=1e-4) and not torch.allclose(default_only, base, atol=1e-4)
    # default is trainable now and parallel is not
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    model.set_adapter(["default", "parallel"])
    both = _logits(model, inputs)
    assert not torch.allclose(both, default_only, atol=1e-4) and not torch.allclose(both, parallel_only, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), base, rtol=0, atol=0)
    model.delete_adapter("parallel")
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, inputs), default_only, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("form", ["sequential", "parallel"])
def test_generate_matches_greedy_decoding_without_cache(family, form, input_ids):
    model = get_peft_model(FAMILIES[family](), BottleneckConfig(bottleneck_size=8, form=form, activation="swish"))
    randomise(model, scale=0.3)
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
        sequence = input_ids
        for _ in range(5):
            next_token = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    with torch.no_grad(), model.disable_adapter():  # the adapter really steers generation
        plain = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert not torch.equal(plain, generated)


def test_merge_is_refused_with_the_reason_and_nothing_changes(input_ids):
    model = get_peft_model(tiny_gpt2(), BottleneckConfig(bottleneck_size=4))
    randomise(model, scale=0.3)
    inputs = {"input_ids": input_ids}
    before = _logits(model, inputs)
    with pytest.raises(PeftkitError, match="nonlinear"):
        model.merge_adapter()
    with pytest.raises(PeftkitError, match="cannot be merged"):
        model.merge_and_unload()
    torch.testing.assert_close(_logits(model, inputs), before, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, inputs), _logits(tiny_gpt2(), inputs), rtol=0, atol=0)
    plain = model.unload()
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, inputs), _logits(tiny_gpt2(), inputs), rtol=0, atol=0)


def test_layers_to_transform_picks_blocks():
    model = get_peft_model(tiny_bert(), BottleneckConfig(bottleneck_size=4, layers_to_transform=[0, 2]))
    assert model._targets["default"] == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.2.attention.output.dense", "bert.encoder.layer.2.output.dense",
    ]
    single = get_peft_model(tiny_llama(), BottleneckConfig(bottleneck_size=4, placement="pfeiffer", layers_to_transform=1))
    assert single._targets["default"] == ["model.layers.1.mlp.down_proj"]


def test_target_modules_place_adapters_on_an_unrecognised_model():
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Linear(10, 3))
    x = torch.randn(4, 6)
    expected = net(x)
    model = get_peft_model(net, BottleneckConfig(bottleneck_size=3, target_modules=["0", "2"]))
    assert model._targets["default"] == ["0", "2"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # overriding on a recognised model replaces the placement
    bert = get_peft_model(tiny_bert(), BottleneckConfig(bottleneck_size=4, target_modules=["intermediate.dense"]))
    assert bert._targets["default"] == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(3)]


def test_default_cli_config_fits_minilm_width(input_ids):
    from transformers import BertConfig, BertForSequenceClassification

    from peftkit.train.job import default_learning_rate, method_config

    config = method_config("adapter")
    assert isinstance(config, BottleneckConfig) and config.placement == "houlsby" and config.task_type == "SEQ_CLS"
    assert 1e-4 <= default_learning_rate("adapter") <= 1e-2
    # minilm's width (hidden 384, feed-forward 1536), one block
    minilm_like = BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=1536, num_labels=2))
    model = get_peft_model(minilm_like, config)
    assert model._targets["default"] == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]
    assert "classifier" in model.peft_config["default"].modules_to_save
    # the job's "--set reduction_factor=..." path: None drops the default bottleneck_size
    assert method_config("adapter", bottleneck_size=None, reduction_factor=6).bottleneck_for(384) == 64


@pytest.mark.parametrize("bad, message", [
    (dict(bottleneck_size=32), r"bottleneck size 32 is not smaller than the hidden size 32"),
    (dict(bottleneck_size=40), r"bottleneck size 40 is not smaller than the hidden size 32"),
    (dict(bottleneck_size=8, reduction_factor=4), "exactly one of bottleneck_size .* both was given"),
    (dict(), "exactly one of bottleneck_size .* neither was given"),
    (dict(bottleneck_size=0), "bottleneck_size must be a positive integer"),
    (dict(reduction_factor=1), "reduction_factor must be greater than 1"),
    (dict(reduction_factor=64), "reduction_factor=64 leaves no bottleneck .* at most 32"),
    (dict(bottleneck_size=8, activation="sigmoid"), "activation='sigmoid' is unknown; known activations: relu, gelu, tanh, swish, silu"),
    (dict(bottleneck_size=8, placement="middle"), "placement must be one of 'houlsby', 'pfeiffer'"),
    (dict(bottleneck_size=8, form="serial"), "form must be one of 'sequential', 'parallel'"),
    (dict(bottleneck_size=8, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(bottleneck_size=8, layers_to_transform=[5]), r"selects no block: BertForSequenceClassification has 3 blocks \(0..2\)"),
    (dict(bottleneck_size=8, target_modules=["LayerNorm"]), "adapts only Linear, Conv1D"),
    (dict(bottleneck_size=8, target_modules=["dens"]), "matched no module"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, BottleneckConfig(**bad))
    assert not any(isinstance(m, AdaptedModule) for m in base.modules())
    assert base.state_dict().keys() == before.keys()


def test_parallel_bottleneck_must_be_narrower_than_the_input_it_reads():
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(PeftkitError, match="bottleneck size 8 is not smaller than the input width .* 4 of '0'"):
        get_peft_model(net, BottleneckConfig(bottleneck_size=8, form="parallel", target_modules=["0"]))
    get_peft_model(net, BottleneckConfig(bottleneck_size=8, form="sequential", target_modules=["0"]))


def test_unrecognised_layout_without_target_modules_says_what_to_pass():
    with pytest.raises(PeftkitError, match="does not recognise the block layout of ConvNet") as info:
        get_peft_model(ConvNet(), BottleneckConfig(bottleneck_size=2))
    text = str(info.value)
    assert "Pass target_modules" in text and "attn.c_proj, mlp.c_proj" in text and "head (Linear)" in text
