"""(IA)3 on tiny models: same vectors, keys, counts and outputs as Hugging Face peft; exact merging."""

import json
import warnings

import peft
import pytest
import torch
from conftest import TINY_MODELS, ConvNet, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file

from peftkit import IA3Config, PeftkitError, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*Unmerge result can be inaccurate.*")

# peft's defaults by model type, and explicit configs with their odd corners (regex targets, "all-linear",
# a feed-forward name that also ends another module's path, excluded modules).
COUNT_CASES = [
    dict(task_type="SEQ_CLS"),
    dict(target_modules=["key", "value", "intermediate.dense", "output.dense"], feedforward_modules=["output.dense"]),
    dict(target_modules=".*(query|intermediate.dense)", feedforward_modules=".*intermediate.dense"),
    dict(target_modules="all-linear", feedforward_modules=["output.dense"], exclude_modules=["pooler.dense"]),
    dict(target_modules=["key", "value"], feedforward_modules=[], modules_to_save=["classifier"]),
]


@pytest.mark.parametrize("kwargs", COUNT_CASES, ids=range(len(COUNT_CASES)))
def test_parameter_counts_equal_peft(kwargs):
    ours = get_peft_model(tiny_bert(), IA3Config(**kwargs))
    theirs = peft.get_peft_model(tiny_bert(), peft.IA3Config(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_vectors_have_peft_shapes_and_keys(tmp_path):
    model = get_peft_model(tiny_gpt2(), IA3Config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # GPT-2's Conv1D: c_attn scales its 96 outputs, mlp.c_proj its 128 inputs; attn.c_proj untouched
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 128)
    assert not any("attn.c_proj" in key for key in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"] and config["feedforward_modules"] == ["mlp.c_proj"]
    assert config["fan_in_fan_out"] is True and "layers_to_transform" not in config


def test_bert_feedforward_name_also_picks_attention_output_like_peft(tmp_path):
    model = get_peft_model(tiny_bert(), IA3Config())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"].shape == (32, 1)
    assert tensors["base_model.model.bert.encoder.layer.0.output.dense.ia3_l"].shape == (1, 64)
    # "output.dense" ends "attention.output.dense" too: peft scales that module's input as well
    assert tensors["base_model.model.bert.encoder.layer.0.attention.output.dense.ia3_l"].shape == (1, 32)


def _with_random_biases(model):
    """Freshly built models have zero biases, which would hide a forward or merge that mishandles them."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


INTEROP_CASES = {
    "bert": dict(task_type="SEQ_CLS"),
    "gpt2": dict(),
    "llama": dict(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("family", list(INTEROP_CASES))
def test_peftkit_adapter_loads_in_peft(family, tmp_path, input_ids):
    ours = get_peft_model(_with_random_biases(TINY_MODELS[family]()), IA3Config(**INTEROP_CASES[family]))
    theirs_fresh = peft.get_peft_model(_with_random_biases(TINY_MODELS[family]()), peft.IA3Config(**INTEROP_CASES[family]))
    assert ours.get_nb_trainable_parameters() == theirs_fresh.get_nb_trainable_parameters()
    randomise(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=input_ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the vectors do change the model
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_with_random_biases(TINY_MODELS[family]()), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(INTEROP_CASES))
def test_peft_adapter_loads_in_peftkit(family, tmp_path, input_ids):
    theirs = peft.get_peft_model(_with_random_biases(TINY_MODELS[family]()), peft.IA3Config(**INTEROP_CASES[family]))
    randomise(theirs)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_with_random_biases(TINY_MODELS[family]()), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(_with_random_biases(TINY_MODELS[family]()), tmp_path, adapter_name="t", is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("kwargs", [
    # peft's IA3 has no layer choice: the saved file spells it out
    dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], layers_to_transform=[1]),
    # a feed-forward list next to a regex would break peft's subset rule once the regex is written out
    dict(target_modules=".*(v_proj|down_proj)", feedforward_modules=["down_proj"]),
    dict(target_modules="all-linear", feedforward_modules=["down_proj", "o_proj"], layers_to_transform=0),
])
def test_peftkit_only_choices_are_saved_so_peft_reads_them_the_same(kwargs, tmp_path, input_ids):
    ours = get_peft_model(tiny_llama(), IA3Config(**kwargs))
    randomise(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "layers_to_transform" not in config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    # peft finds nothing to complain about: no missing keys, no unknown config fields
    complaints = [str(w.message) for w in caught if any(word in str(w.message).lower() for word in ("missing", "unexpected"))]
    assert not complaints
    assert theirs.get_nb_trainable_parameters()[1] == ours.get_nb_trainable_parameters()[1]
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_training_changes_only_the_vectors_and_head(input_ids):
    model = get_peft_model(tiny_bert(), IA3Config(task_type="SEQ_CLS"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".ia3_l") or "classifier" in n for n in names)
    with torch.no_grad():
        base = tiny_bert()(input_ids=input_ids).logits
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
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
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n.endswith("ia3_l"))
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base, rtol=0, atol=0)


def test_save_load_round_trip_and_two_named_adapters(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), IA3Config())
    model.add_adapter("other", IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]))
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
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        for name in ["default", "other"]:
            loaded.set_adapter(name)
            torch.testing.assert_close(loaded(input_ids=input_ids).logits, outputs[name], rtol=1e-6, atol=1e-6)


def test_two_active_adapters_multiply_their_scales_like_peft(input_ids):
    first = dict(target_modules=["k_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj"])
    second = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = get_peft_model(tiny_llama(), IA3Config(**first))
    ours.add_adapter("second", IA3Config(**second))
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(**first))
    theirs.add_adapter("second", peft.IA3Config(**second))
    # The same distinct values in both: vectors in the same order (module path, then adapter name).
    for model in (ours, theirs):
        vectors = sorted((n, p) for n, p in model.named_parameters() if "ia3_l" in n)
        assert len(vectors) == 10
        with torch.no_grad():
            for index, (_, parameter) in enumerate(vectors):
                parameter.copy_(torch.linspace(0.5, 1.5, parameter.numel()).view_as(parameter) + index * 0.01)
    ours.set_adapter(["default", "second"])
    theirs.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)


def _greedy_without_cache(model, input_ids, steps):
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_generate_matches_step_by_step_and_merged(family, input_ids):
    model = get_peft_model(TINY_MODELS[family](), IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                   attention_mask=torch.ones_like(input_ids))
        assert torch.equal(generated, _greedy_without_cache(model, input_ids, 5))
        plain = model.merge_and_unload()
        merged = plain.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones_like(input_ids))
    assert torch.equal(generated, merged)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_merge_is_exact_and_unmerge_restores(family, input_ids):
    base = _with_random_biases(TINY_MODELS[family]())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, IA3Config(init_ia3_weights=False))
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
        again = model(input_ids=input_ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-6)
    plain = model.unload()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)


def test_unmerge_restores_exactly_where_a_scale_is_zero(input_ids):
    base = _with_random_biases(tiny_bert())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, IA3Config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("ia3_l"):
                parameter.view(-1)[::3] = 0.0  # every third unit switched off
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    for key, value in model.unload().state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-7)


def test_merge_and_unload_gives_plain_model(input_ids):
    model = get_peft_model(_with_random_biases(tiny_bert()), IA3Config(task_type="SEQ_CLS", init_ia3_weights=False))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        plain = model.merge_and_unload()
        got = plain(input_ids=input_ids).logits
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_vit_defaults_train_merge_and_load_in_peft(pixel_values, tmp_path):
    model = get_peft_model(tiny_vit(), IA3Config(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "fresh")
    tensors = load_file(tmp_path / "fresh" / "adapter_model.safetensors")
    # value projection scaled on its output, the second feed-forward layer on its 64 inputs
    # (module names of transformers 5; earlier releases call them attention.value and output.dense)
    shapes = sorted(tuple(t.shape) for k, t in tensors.items() if ".0." in k)
    assert shapes == [(1, 64), (32, 1), (32, 1)]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(pixel_values=pixel_values, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    model.save_pretrained(tmp_path / "trained")
    # peft has no ViT default; the saved config names the modules, so peft needs nothing more
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path / "trained").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=pixel_values).logits, expected, rtol=1e-5, atol=1e-6)
        merged = model.merge_and_unload()(pixel_values=pixel_values).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


class GroupedConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.grouped = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.conv = torch.nn.Conv2d(6, 5, 1)

    def forward(self, image):
        return self.conv(torch.relu(self.grouped(image)))


def test_convolutions_match_peft_and_merge_exactly(tmp_path):
    image, labels = torch.randn(2, 3, 6, 6), torch.tensor([1, 7])
    config = dict(target_modules=["conv", "head"], feedforward_modules=["head"])
    theirs = peft.get_peft_model(ConvNet(), peft.IA3Config(**config))
    randomise(theirs)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(image, labels)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(ConvNet().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(image, labels), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.merge_and_unload()(image, labels), expected, rtol=1e-5, atol=1e-5)
    # a grouped kernel scaled on its input side: each output channel sees only its group's inputs
    image = torch.randn(2, 4, 5, 5)
    model = get_peft_model(GroupedConvNet(), IA3Config(target_modules=["grouped", "conv"], feedforward_modules=["grouped"],
                                                       init_ia3_weights=False))
    with torch.no_grad():
        unmerged = model(image)
        torch.testing.assert_close(model.merge_and_unload()(image), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_fn, kwargs, message", [
    (ConvNet, dict(), "no default for model type None"),
    (ConvNet, dict(target_modules=["conv", "head"]), "feedforward_modules is not set"),
    (tiny_bert, dict(target_modules=["key"], feedforward_modules=["output.dense"]), "must be a subset of target_modules"),
    (tiny_bert, dict(target_modules=["LayerNorm"]), "adapts only"),
    (tiny_bert, dict(target_modules=["kye"]), "matched no module"),
    (ConvNet, dict(target_modules=["embed"], feedforward_modules=[]), "adapts only"),
    (tiny_bert, dict(init_ia3_weights="yes"), "init_ia3_weights must be bool"),
    (tiny_bert, dict(target_modules=["key"], layers_to_transform=[9]), "selects no module"),
])
def test_bad_inputs_get_clear_errors_at_wrap_time(model_fn, kwargs, message):
    base = model_fn()
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, IA3Config(**kwargs))
    assert not any(isinstance(m, AdaptedModule) for m in base.modules())  # nothing was left attached


def test_cli_default_config_wraps_a_bert_classifier(input_ids):
    from peftkit.train.job import METHOD_DEFAULTS, method_config

    config = method_config("ia3")
    assert isinstance(config, IA3Config) and METHOD_DEFAULTS["ia3"][2] >= 3e-3
    model = get_peft_model(tiny_bert(), config)
    trainable = {n.split(".adapters")[0].split("bert.encoder.layer.0.")[-1] for n, p in model.named_parameters()
                 if p.requires_grad and ".layer.0." in n}
    assert trainable == {"attention.self.key", "attention.self.value", "intermediate.dense", "output.dense",
                         "attention.output.dense"}
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
