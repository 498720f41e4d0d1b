"""OFT: same counts and files as Hugging Face peft both ways, orthogonal blocks, exact merging."""

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import OFTConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule, adapted_modules
from peftkit.methods.oft import OftDelta, cayley_neumann


def _randomise(model, seed=3, scale=0.1):
    """Give every trainable tensor a non-trivial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# Linear layers of BERT (32 -> 32, 32 -> 64, 64 -> 32) and Llama: Cayley-Neumann (default) and exact
# Cayley, r or oft_block_size, shared blocks, COFT, trained biases (oft_only / all), layer choice,
# modules_to_save, and a block size peft adjusts per layer (24 -> 16).
CASES = {
    "bert_neumann_bias": (tiny_bert, dict(oft_block_size=8, target_modules=["query", "value", "dense"],
                                          bias="oft_only", modules_to_save=["classifier"])),
    "bert_bias_all": (tiny_bert, dict(r=4, oft_block_size=0, target_modules=["key", "intermediate.dense"], bias="all")),
    "llama_cayley": (tiny_llama, dict(oft_block_size=16, target_modules="all-linear", use_cayley_neumann=False)),
    "llama_shared_coft": (tiny_llama, dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           block_share=True, coft=True, eps=0.05, layers_to_transform=[1])),
    "llama_terms_adjusted": (tiny_llama, dict(oft_block_size=24, target_modules=["o_proj", "down_proj"],
                                              num_cayley_neumann_terms=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_counts_equal_peft(case):
    make, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(make(), OFTConfig(**kwargs))
        theirs = peft.get_peft_model(make(), peft.OFTConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_adapter_loads_in_peft(case, tmp_path, input_ids):
    make, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_peft_model(make(), OFTConfig(**kwargs))
    _randomise(ours)
    expected = _logits(ours, input_ids)
    with ours.disable_adapter():
        assert not torch.allclose(_logits(ours, input_ids), expected, atol=1e-4)  # the adapter does something
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "retrain your adapter" warning from peft either
        warnings.filterwarnings("ignore", message="Invalid `oft_block_size`")
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(_logits(theirs, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert theirs.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_peftkit(case, tmp_path, input_ids):
    make, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.OFTConfig(**kwargs))
        _randomise(theirs)
        theirs.eval()
        expected = _logits(theirs, input_ids)
        theirs.save_pretrained(tmp_path)
        ours = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_logits(ours, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainable = PeftModel.from_pretrained(make(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_saved_keys_and_shapes_are_peft_keys(tmp_path):
    make, kwargs = CASES["bert_neumann_bias"]
    ours = get_peft_model(make(), OFTConfig(**kwargs))
    theirs = peft.get_peft_model(make(), peft.OFTConfig(**kwargs))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file, theirs_file = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in theirs_file.items()}
    # 32 inputs in blocks of 8: 4 blocks of 8 * 7 / 2 = 28 upper-triangle values
    assert ours_file["base_model.model.bert.encoder.layer.0.attention.self.query.oft_R.weight"].shape == (4, 28)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in ours_file
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 8 and config["r"] == 0


def test_block_size_that_does_not_divide_is_adjusted_with_a_warning_like_peft():
    with pytest.warns(UserWarning, match="oft_block_size 24 does not divide in_features 32; using 16"):
        model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=24, target_modules=["o_proj", "down_proj"]))
    deltas = {path.rsplit(".", 1)[-1]: module.adapters["default"] for path, module in adapted_modules(model.base_model)}
    # 16 and 32 are both 8 away from 24: the smaller wins, on 32 and on 64 inputs
    assert (deltas["o_proj"].blocks, deltas["o_proj"].block_size) == (2, 16)
    assert (deltas["down_proj"].blocks, deltas["down_proj"].block_size) == (4, 16)
    with pytest.warns(UserWarning, match="oft_block_size 28 does not divide in_features 64; using 32"):
        get_peft_model(tiny_llama(), OFTConfig(oft_block_size=28, target_modules=["down_proj"]))


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_starts_at_the_base_model_and_trains_only_the_adapter(make, input_ids):
    reference = _logits(make(), input_ids)
    model = get_peft_model(make(), OFTConfig(oft_block_size=8, target_modules="all-linear"))
    out = model(input_ids=input_ids).logits
    assert out.shape == reference.shape
    torch.testing.assert_close(out.detach(), reference, rtol=0, atol=0)  # zero Q: R = I exactly
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    own = [n for n in names if ".adapters.default.oft_R" in n]
    assert own and all(n in own or "classifier" in n for n in names)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    labels = torch.tensor([0, 2]) if make is tiny_bert else input_ids
    for _ in range(3):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert not torch.equal(parameter, trained[name]), name
        else:
            assert torch.equal(parameter, frozen[name]), name
    assert not torch.allclose(_logits(model, input_ids), reference, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, input_ids), reference, rtol=0, atol=0)


def _delta(**kwargs) -> OftDelta:
    config = OFTConfig(**{"target_modules": ["0"], "init_weights": False, **kwargs})
    model = get_peft_model(nn.Sequential(nn.Linear(24, 5)), config)
    return model.base_model[0].adapters["default"]


def test_exact_cayley_blocks_are_orthogonal_and_the_layer_keeps_norms():
    delta = _delta(oft_block_size=6, use_cayley_neumann=False)
    with torch.no_grad():
        delta.oft_R.mul_(10)  # far from the identity: still exactly orthogonal
        rotation = delta.rotation_blocks()
    eye = torch.eye(6).expand(4, 6, 6)
    torch.testing.assert_close(rotation.transpose(-2, -1) @ rotation, eye, rtol=0, atol=1e-5)
    assert torch.det(rotation).sub(1).abs().max() < 1e-4  # a rotation, not a reflection
    x = torch.randn(7, 24)
    torch.testing.assert_close(delta.transform_input(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_cayley_neumann_is_near_orthogonal_for_small_q_and_matches_peft_series():
    delta = _delta(oft_block_size=6, num_cayley_neumann_terms=8)
    with torch.no_grad():
        delta.oft_R.mul_(0.5)
        rotation = delta.rotation_blocks()
    error = (rotation.transpose(-2, -1) @ rotation - torch.eye(6)).abs().max()
    assert error < 1e-3  # orthogonal up to O(|Q|^7)
    # the series is peft's, term for term, for every number of terms
    skew = delta.skew_blocks(delta.oft_R.detach())
    module = peft.tuners.oft.layer.OFTRotationModule(4, 15, 6, 24)
    for terms in range(1, 9):
        theirs = module._cayley_batch(delta.oft_R.detach(), 6, True, terms)
        torch.testing.assert_close(cayley_neumann(skew, terms), theirs, rtol=1e-6, atol=1e-6)
    exact = _delta(oft_block_size=6, use_cayley_neumann=False)
    with torch.no_grad():
        exact.oft_R.copy_(delta.oft_R)
        torch.testing.assert_close(exact.rotation_blocks(), module._cayley_batch(exact.oft_R, 6, False),
                                   rtol=1e-5, atol=1e-5)


def test_coft_keeps_each_block_within_eps():
    delta = _delta(oft_block_size=6, coft=True, eps=1e-2)
    delta.rotation_blocks()
    bound = 1e-2 / 2  # eps / sqrt(4 stored blocks)
    norms = delta.skew_blocks(delta.oft_R.detach()).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((4,), bound), rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_is_exact_unmerge_restores_and_unload_is_plain(case, input_ids):
    make, kwargs = CASES[case]
    base = make()
    before = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, OFTConfig(**kwargs))
    _randomise(model, scale=0.3)
    unmerged = _logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, input_ids), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for path, module in adapted_modules(model.base_model):
        for key, value in module.base_layer.state_dict().items():
            torch.testing.assert_close(value, before[f"{path}.{key}"], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, input_ids), unmerged, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, input_ids), unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_two_named_adapters_and_disable(tmp_path, input_ids):
    reference = _logits(tiny_llama(), input_ids)
    model = get_peft_model(tiny_llama(), OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", OFTConfig(r=2, oft_block_size=0, target_modules=["v_proj", "down_proj"],
                                          use_cayley_neumann=False))
    _randomise(model)  # only "default" is trainable now
    model.set_adapter("second")
    _randomise(model, seed=5)
    second = _logits(model, input_ids)
    model.set_adapter("default")
    default = _logits(model, input_ids)
    assert not torch.allclose(default, second, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, input_ids), reference, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    again.load_adapter(tmp_path / "second", "second")
    torch.testing.assert_close(_logits(again, input_ids), default, rtol=0, atol=0)
    again.set_adapter("second")
    torch.testing.assert_close(_logits(again, input_ids), second, rtol=0, atol=0)
    assert isinstance(peftkit.load_config(tmp_path / "second"), OFTConfig)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    theirs.set_adapter("second")
    torch.testing.assert_close(_logits(theirs, input_ids), second, rtol=1e-5, atol=1e-5)
    model.delete_adapter("second")
    torch.testing.assert_close(_logits(model, input_ids), default, rtol=0, atol=0)


def test_module_dropout_turns_whole_blocks_to_identity_in_training_only():
    torch.manual_seed(0)
    delta = _delta(oft_block_size=4, module_dropout=0.5)  # 6 blocks, 3 dropped per forward
    x = torch.randn(2, 24)
    delta.eval()
    rotated = delta.transform_input(x)
    assert all(torch.equal(delta.transform_input(x), rotated) for _ in range(5))
    delta.train()
    blocks_kept = []
    for _ in range(10):
        out = delta.transform_input(x).view(2, 6, 4)
        same_as_input = (out == x.view(2, 6, 4)).all(-1).all(0)
        same_as_rotated = torch.isclose(out, rotated.view(2, 6, 4), atol=1e-6).all(-1).all(0)
        assert torch.all(same_as_input ^ same_as_rotated)
        blocks_kept.append(int(same_as_rotated.sum()))
    assert set(blocks_kept) == {3}
    shared = _delta(oft_block_size=4, module_dropout=0.5, block_share=True).train()
    assert torch.equal(shared.transform_input(x), shared.eval().transform_input(x))  # one block: never dropped


@pytest.mark.parametrize("bad, message", [
    (dict(r=4, oft_block_size=8), "exactly one of r .* and oft_block_size"),
    (dict(r=0, oft_block_size=0), "exactly one of r .* and oft_block_size"),
    (dict(r=-2, oft_block_size=0), "must not be negative"),
    (dict(oft_block_size="8"), "OFTConfig.oft_block_size must be int"),
    (dict(module_dropout=1.0), "OFTConfig.module_dropout must be in"),
    (dict(eps=0.0), "OFTConfig.eps must be positive"),
    (dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms must be at least 1"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out=True is for GPT-2's Conv1D"),
    (dict(bias="lora_only"), "OFTConfig.bias must be one of"),
    (dict(init_weights="gaussian"), "OFTConfig.init_weights must be bool"),
    (dict(layers_pattern="layer"), "set layers_to_transform too"),
    (dict(target_modules=["qury"]), "matched no module"),
    (dict(target_modules=None), "target_modules is not set"),
    (dict(target_modules=["query", "word_embeddings"]), "'bert.embeddings.word_embeddings' is a Embedding; OFT adapts only"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    base = tiny_bert()
    expected = copy.deepcopy(base.state_dict())
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(base, OFTConfig(**{"target_modules": ["query"], **bad}))
    assert base.state_dict().keys() == expected.keys()  # nothing was attached half-way


def test_conv2d_and_gpt2_conv1d_are_refused_at_wrap_time():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(PeftkitError, match="module '0' is an nn.Conv2d; peftkit's OFT adapts only nn.Linear"):
        get_peft_model(net, OFTConfig(oft_block_size=3, target_modules=["0", "2"]))
    assert not any(isinstance(m, AdaptedModule) for m in net.modules())
    with pytest.raises(PeftkitError, match="transformers Conv1D .* use LoRA"):
        get_peft_model(tiny_gpt2(), OFTConfig(target_modules=["c_attn"]))
    with pytest.raises((TypeError, ValueError)):  # peft has no OFT layer for Conv1D either
        peft.get_peft_model(tiny_gpt2(), peft.OFTConfig(target_modules=["c_attn"]))
