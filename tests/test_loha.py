"""LoHa: same counts and files as Hugging Face peft both ways, exact merging, training-time dropouts."""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import logits, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from torch import nn

import peftkit
from peftkit import LoHaConfig, PeftkitError, get_peft_model


class ConvMix(nn.Module):
    """Grouped Conv2d, 1x1 Conv2d, Conv1d and Linear: every layer type LoHa adapts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.pointwise = nn.Conv2d(6, 6, 1)
        self.temporal = nn.Conv1d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        hidden = self.pointwise(self.grouped(x)).flatten(2)
        return self.head(self.temporal(hidden).mean(-1))


# (model factory, config, inputs name): covers Linear (plain and factored path), rank/alpha
# patterns, layer choice, modules_to_save, Conv2d / Conv1d, grouped and effective convolutions.
CASES = {
    "bert": (tiny_bert, dict(r=2, alpha=4, target_modules=["query", "value", "dense"], rank_pattern={"value": 8},
                             alpha_pattern={"query": 1.0}, modules_to_save=["classifier"])),
    "llama": (tiny_llama, dict(r=3, alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], layers_to_transform=[1])),
    "vit": (tiny_vit, dict(r=2, alpha=3, target_modules=["q_proj", "fc2", "projection"], use_effective_conv2d=True)),
    "convs": (ConvMix, dict(r=2, alpha=4, target_modules=["grouped", "pointwise", "temporal", "head"])),
    "convs_effective": (ConvMix, dict(r=3, alpha=2, target_modules=["grouped", "pointwise", "temporal"],
                                      use_effective_conv2d=True)),
}


def test_saved_keys_are_peft_keys(tmp_path):
    from safetensors.torch import load_file

    ours = get_peft_model(ConvMix(), LoHaConfig(**CASES["convs_effective"][1]))
    theirs = peft.get_peft_model(ConvMix(), peft.LoHaConfig(**CASES["convs_effective"][1]))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
    assert "base_model.model.grouped.hada_t1" in ours_file  # effective form on the 3x3 kernel
    assert "base_model.model.pointwise.hada_t1" not in ours_file  # plain form on the 1x1 kernel


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_starts_at_the_base_model_and_trains_only_the_adapter(family, input_ids):
    make = {"bert": tiny_bert, "llama": tiny_llama}[family]
    with torch.no_grad():
        reference = make()(input_ids=input_ids).logits
    model = get_peft_model(make(), LoHaConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.testing.assert_close(logits(model, input_ids=input_ids), reference, rtol=0, atol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapters.default.hada_" in n for n in names)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    labels = torch.tensor([0, 2]) if family == "bert" else input_ids
    for _ in range(3):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert not torch.equal(parameter, trained[name]), name  # every factor learns (w2_b starts at 0)
        else:
            assert torch.equal(parameter, frozen[name]), name
    assert not torch.allclose(logits(model, input_ids=input_ids), reference, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids=input_ids), reference, rtol=0, atol=0)


def test_merge_is_exact_with_reflect_padding():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    model = get_peft_model(net, LoHaConfig(r=2, target_modules=["0"], init_weights=False))
    x = torch.randn(2, 3, 6, 6)
    unmerged = logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)


def test_factored_linear_path_equals_the_full_update_with_gradients():
    # r^2 (in + out) < in * out: the update goes through the r^2-wide Khatri-Rao factors.
    model = get_peft_model(nn.Sequential(nn.Linear(40, 30)), LoHaConfig(r=3, target_modules=["0"], init_weights=False))
    delta = model.base_model[0].adapters["default"]
    assert delta.factored
    x = torch.randn(5, 7, 40)
    factored = delta.linear_update(x)
    full = F.linear(x, delta.delta_weight())
    torch.testing.assert_close(factored, full, rtol=1e-5, atol=1e-5)
    grads_factored = torch.autograd.grad(factored.square().sum(), list(delta.parameters()))
    grads_full = torch.autograd.grad(full.square().sum(), list(delta.parameters()))
    for got, expected in zip(grads_factored, grads_full):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # r^2 (8 + 8) >= 8 * 8: building the 8 x 8 update is cheaper
    small = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoHaConfig(r=4, target_modules=["0"]))
    assert not small.base_model[0].adapters["default"].factored


def test_gpt2_conv1d_is_refused_like_peft_and_lm_head_works(input_ids):
    with pytest.raises(PeftkitError, match="transformers Conv1D .* Use LoRA"):
        get_peft_model(tiny_gpt2(), LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(PeftkitError, match="Conv1D"):
        get_peft_model(tiny_gpt2(), LoHaConfig(target_modules="all-linear"))
    with pytest.raises((TypeError, ValueError)):  # peft has no LoHa layer for Conv1D either
        peft.get_peft_model(tiny_gpt2(), peft.LoHaConfig(target_modules=["c_attn"]))
    # The (tied) LM head is an nn.Linear: LoHa applies, generation follows it, merging is refused.
    model = get_peft_model(tiny_gpt2(), LoHaConfig(r=2, target_modules=["lm_head"]))
    randomise(model, scale=0.3)
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
        sequence = input_ids
        for _ in range(5):
            next_token = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    with pytest.raises(PeftkitError, match="tied to"):
        model.merge_adapter()


def test_module_dropout_skips_the_whole_update_in_training_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    model = get_peft_model(net, LoHaConfig(r=2, target_modules=["0"], module_dropout=0.5, init_weights=False)).eval()
    x = torch.randn(3, 6)
    with model.disable_adapter():
        base = logits(model, x)
    adapted = logits(model, x)
    assert all(torch.equal(logits(model, x), adapted) for _ in range(20))  # eval: never dropped
    model.train()
    seen = [logits(model, x) for _ in range(60)]
    skipped = sum(torch.equal(out, base) for out in seen)
    applied = sum(torch.allclose(out, adapted, rtol=0, atol=0) for out in seen)
    assert skipped + applied == len(seen) and 10 < skipped < 50


def test_rank_dropout_drops_output_rows_and_rescales_the_rest():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 40)), LoHaConfig(r=2, target_modules=["0"], rank_dropout=0.5,
                                                                       init_weights=False)).eval()
    x = torch.randn(3, 6)
    with model.disable_adapter():
        base = logits(model, x)
    update = logits(model, x) - base
    model.train()
    dropped_update = logits(model, x) - base
    kept = dropped_update.abs().sum(0) > 0
    assert 0 < kept.sum() < 40
    # peft's LoHa divides the kept rows by their share, as inverted dropout does
    torch.testing.assert_close(dropped_update[:, kept], update[:, kept] * 40 / kept.sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(r=0, target_modules=["query"]), "LoHaConfig.r must be a positive integer"),
    (dict(r=-3, target_modules=["query"]), "LoHaConfig.r must be a positive integer"),
    (dict(r="8", target_modules=["query"]), "LoHaConfig.r must be int"),
    (dict(target_modules=["query"], rank_pattern={"query": 0}), r"rank_pattern\['query'\] must be a positive"),
    (dict(target_modules=["query"], rank_dropout=1.0), "LoHaConfig.rank_dropout must be in"),
    (dict(target_modules=["query"], module_dropout=-0.1), "LoHaConfig.module_dropout must be in"),
    (dict(target_modules=["query"], layers_pattern="layer"), "set layers_to_transform too"),
    (dict(target_modules=["query"], init_weights="gaussian"), "LoHaConfig.init_weights must be bool"),
    (dict(target_modules=["qury"]), "matched no module"),
    (dict(target_modules=None), "target_modules is not set"),
    (dict(target_modules=["word_embeddings"]), "is a Embedding; LoHa adapts only nn.Linear"),
    (dict(target_modules=["query"], layers_to_transform=[9]), "selects no module"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    base = tiny_bert()
    expected = copy.deepcopy(base.state_dict())
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, LoHaConfig(**bad))
    assert base.state_dict().keys() == expected.keys()  # nothing was attached half-way


def test_config_json_round_trip_and_peft_set_target_modules(tmp_path):
    config = LoHaConfig(**{**CASES["bert"][1], "target_modules": {"value", "query"}})
    assert config.target_modules == ["query", "value"]
    model = get_peft_model(tiny_bert(), config)
    model.save_pretrained(tmp_path)
    loaded = peftkit.load_config(tmp_path)
    assert isinstance(loaded, LoHaConfig) and loaded.rank_pattern == {"value": 8} and loaded.alpha == 4
    assert peft.PeftConfig.from_pretrained(tmp_path).peft_type == peft.PeftType.LOHA
