"""LoKr: peft's factor shapes and files both ways, exact merging, the factored Linear path, dropouts."""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import logits, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

from peftkit import LoKrConfig, PeftkitError, get_peft_model
from peftkit.methods.base import adapted_modules
from peftkit.methods.lokr import factorization


class ConvMix(nn.Module):
    """Grouped Conv2d, 1x1 Conv2d, Conv1d and Linear: every layer type LoKr adapts.

    Sizes split as 36 = 6 * 6, 40 = 5 * 8, 2 = 1 * 2 (channels per group), so r <= 2 keeps w2
    low-rank everywhere and r = 4 stores it whole everywhere.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.grouped = nn.Conv2d(4, 36, 3, padding=1, groups=2)
        self.pointwise = nn.Conv2d(36, 36, 1)
        self.temporal = nn.Conv1d(36, 40, 3, padding=1)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        hidden = self.pointwise(self.grouped(x)).flatten(2)
        return self.head(self.temporal(hidden).mean(-1))


CONVS = ["grouped", "pointwise", "temporal", "head"]
# Covers whole and low-rank w1 / w2, kernel-shaped w2, the effective convolution, Conv1d, patterns,
# layer choice, decompose_factor, the "lycoris" initialisation and modules_to_save.
CASES = {
    "bert": (tiny_bert, dict(r=2, alpha=4, target_modules=["query", "value", "dense"], decompose_both=True,
                             rank_pattern={"value": 16}, alpha_pattern={"query": 1.0}, modules_to_save=["classifier"])),
    "llama": (tiny_llama, dict(r=2, alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"], layers_to_transform=[1],
                               decompose_factor=4, init_weights="lycoris")),
    "vit": (tiny_vit, dict(r=2, alpha=3, target_modules=["q_proj", "fc2", "projection"], use_effective_conv2d=True)),
    "convs_whole": (ConvMix, dict(r=4, alpha=4, target_modules=CONVS)),
    "convs_low_rank": (ConvMix, dict(r=1, alpha=2, target_modules=CONVS, decompose_both=True)),
    "convs_effective": (ConvMix, dict(r=2, alpha=2, target_modules=CONVS, use_effective_conv2d=True)),
}


def test_factorization_equals_peft():
    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 24, 399):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)
    assert factorization(384) == (16, 24) and factorization(1536) == (32, 48) and factorization(127) == (1, 127)


@pytest.mark.parametrize("r", [1, 8, 16, 24])
@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("decompose_factor", [-1, 8])
def test_tensor_names_and_shapes_equal_peft_at_real_sizes(r, decompose_both, decompose_factor):
    # minilm's sizes (384, 1536) and a prime one: which factors are whole or low-rank follows peft.
    def net():
        return nn.Sequential(nn.Linear(384, 1536), nn.Linear(1536, 384), nn.Linear(127, 384), nn.Conv2d(384, 96, 3))

    kwargs = dict(r=r, target_modules=["0", "1", "2", "3"], decompose_both=decompose_both,
                  decompose_factor=decompose_factor, use_effective_conv2d=True)
    ours = get_peft_model(net(), LoKrConfig(**kwargs))
    theirs = peft.get_peft_model(net(), peft.LoKrConfig(**kwargs))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.adapter_state("default").items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert ours_shapes == theirs_shapes
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_conv_cases_cover_every_factor_form():
    def forms(family):
        model = get_peft_model(ConvMix(), LoKrConfig(**CASES[family][1]))
        return {path: sorted(module.adapters["default"]._parameters) for path, module in adapted_modules(model.base_model)}

    assert all(names == ["lokr_w1", "lokr_w2"] for names in forms("convs_whole").values())
    low_rank = ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]  # decompose_both and r=1 < max / 2 everywhere
    assert all(names == low_rank for names in forms("convs_low_rank").values())
    effective = forms("convs_effective")
    assert "lokr_t2" in effective["grouped"] and "lokr_t2" in effective["temporal"]
    assert "lokr_t2" not in effective["pointwise"]  # a 1x1 kernel has nothing to factor


def test_conv1d_effective_form_with_rank_one_runs_and_merges():
    # peft 0.21's own forward fails here (torch.kron cannot view the einsum's size-1 strides).
    model = get_peft_model(nn.Sequential(nn.Conv1d(16, 32, 3)), LoKrConfig(r=1, target_modules=["0"],
                                                                          use_effective_conv2d=True, init_weights=False))
    assert "lokr_t2" in model.base_model[0].adapters["default"]._parameters
    x = torch.randn(2, 16, 10)
    unmerged = logits(model, x)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_starts_at_the_base_model_and_trains_only_the_adapter(init, input_ids):
    with torch.no_grad():
        reference = tiny_bert()(input_ids=input_ids).logits
    model = get_peft_model(tiny_bert(), LoKrConfig(r=2, alpha=4, target_modules="all-linear", init_weights=init))
    torch.testing.assert_close(logits(model, input_ids=input_ids), reference, rtol=0, atol=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapters.default.lokr_" in n for n in names)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=input_ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert not torch.equal(parameter, trained[name]), name  # both Kronecker factors learn
        else:
            assert torch.equal(parameter, frozen[name]), name
    assert not torch.allclose(logits(model, input_ids=input_ids), reference, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids=input_ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("r", [2, 16])
def test_linear_path_never_builds_the_update_and_equals_it_with_gradients(r):
    # 48 = (6, 8) and 20 = (4, 5): r=2 keeps w2 low-rank, r=16 stores it whole.
    model = get_peft_model(nn.Sequential(nn.Linear(20, 48)), LoKrConfig(r=r, target_modules=["0"], init_weights=False))
    delta = model.base_model[0].adapters["default"]
    assert delta.out_split == (6, 8) and delta.in_split == (4, 5)
    x = torch.randn(3, 7, 20)
    factored = delta.linear_update(x)
    full = F.linear(x, delta.delta_weight())
    torch.testing.assert_close(factored, full, rtol=1e-5, atol=1e-6)
    parameters = list(delta.parameters())
    for got, expected in zip(torch.autograd.grad(factored.square().sum(), parameters),
                             torch.autograd.grad(full.square().sum(), parameters)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_is_refused_like_peft_and_lm_head_works(input_ids):
    with pytest.raises(PeftkitError, match="transformers Conv1D .* Use LoRA"):
        get_peft_model(tiny_gpt2(), LoKrConfig(target_modules=["c_fc"]))
    with pytest.raises((TypeError, ValueError)):  # peft has no LoKr layer for Conv1D either
        peft.get_peft_model(tiny_gpt2(), peft.LoKrConfig(target_modules=["c_fc"]))
    model = get_peft_model(tiny_gpt2(), LoKrConfig(r=2, target_modules=["lm_head"]))
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


@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_drops_output_rows_and_rescales_only_when_asked(rescale):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 40)), LoKrConfig(
        r=2, target_modules=["0"], rank_dropout=0.5, rank_dropout_scale=rescale, init_weights=False)).eval()
    x = torch.randn(3, 6)
    with model.disable_adapter():
        base = logits(model, x)
    update = logits(model, x) - base
    model.train()
    dropped_update = logits(model, x) - base
    kept = dropped_update.abs().sum(0) > 0
    assert 0 < kept.sum() < 40
    factor = 40 / kept.sum() if rescale else 1.0
    torch.testing.assert_close(dropped_update[:, kept], update[:, kept] * factor, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(r=0, target_modules=["query"]), "LoKrConfig.r must be a positive integer"),
    (dict(target_modules=["query"], decompose_factor=0), "LoKrConfig.decompose_factor must be -1"),
    (dict(target_modules=["query"], decompose_factor=-4), "LoKrConfig.decompose_factor must be -1"),
    (dict(target_modules=["query"], init_weights="gaussian"), "LoKrConfig.init_weights must be"),
    (dict(target_modules=["query"], rank_dropout=2.0), "LoKrConfig.rank_dropout must be in"),
    (dict(target_modules=["query"], module_dropout=1.0), "LoKrConfig.module_dropout must be in"),
    (dict(target_modules=["query"], rank_pattern={"query": -1}), r"rank_pattern\['query'\] must be a positive"),
    (dict(target_modules=["query"], layers_pattern="layer"), "set layers_to_transform too"),
    (dict(target_modules=["word_embeddings"]), "is a Embedding; LoKr adapts only nn.Linear"),
    (dict(target_modules=["qury"]), "matched no module"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    base = tiny_bert()
    expected = copy.deepcopy(base.state_dict())
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, LoKrConfig(**bad))
    assert base.state_dict().keys() == expected.keys()  # nothing was attached half-way
