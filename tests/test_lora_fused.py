"""Fused LoRA training layer: same outputs and gradients as the unfused reference, no stored mask.

The reference is the plain computation y = x W^T + b + s (dropout(x) A^T) B^T with torch's own
autograd, given the same keep mask (`lora_dropout_keep_mask` regenerates it from the seed).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.base import AdaptedModule
from peftkit.methods.lora import (
    FusedLoraLinear,
    LoraLinearDelta,
    draw_dropout_seed,
    lora_dropout_keep_mask,
    lora_dropout_keep_probability,
    set_lora_fused,
)

SCALING = 1.75


def layer_tensors(shape, out_features=5, r=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    in_features = shape[-1]

    def random(*size, grad=True):
        return torch.randn(*size, generator=generator, dtype=dtype).requires_grad_(grad)

    return dict(x=random(*shape), weight=random(out_features, in_features, grad=False),
                bias=random(out_features, grad=False), lora_A=random(r, in_features),
                lora_B=random(out_features, r), delta_bias=random(out_features))


def reference(x, weight, bias, lora_A, lora_B, delta_bias, dropout, seed, scaling=SCALING):
    """The unfused computation, with the fused layer's mask."""
    dropped = x
    if dropout:
        keep = lora_dropout_keep_mask(x.reshape(-1, x.shape[-1]), dropout, seed).view(x.shape)
        dropped = x * keep / lora_dropout_keep_probability(dropout)
    output = F.linear(x, weight, bias)
    if delta_bias is not None:
        output = output + delta_bias
    return output + F.linear(F.linear(dropped, lora_A), lora_B) * scaling


def fused(x, weight, bias, lora_A, lora_B, delta_bias, dropout, seed):
    return FusedLoraLinear.apply(x, weight, bias, lora_A, lora_B, delta_bias, SCALING, dropout, seed)


def gradients(function, tensors, dropout, seed, grad_output):
    for tensor in tensors.values():
        if tensor is not None:
            tensor.grad = None
    output = function(**tensors, dropout=dropout, seed=seed)
    output.backward(grad_output)
    return output.detach(), {name: t.grad for name, t in tensors.items() if t is not None}


# Shapes cover both ways the layer computes: a few rows (low-rank path beside the base matmul) and
# more rows than the weight has (merged weight W + s B A), as 2D and 3D inputs.
SHAPES = [(4, 6), (2, 3, 6), (40, 6), (4, 10, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_bias", [False, True], ids=["no_bias", "lora_only_bias"])
def test_output_and_gradients_equal_reference(shape, dropout, train_bias):
    tensors = layer_tensors(shape)
    if not train_bias:
        tensors["delta_bias"] = None
    grad_output = torch.randn(*shape[:-1], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, expected_grads = gradients(reference, tensors, dropout, 1234, grad_output)
    got, got_grads = gradients(fused, tensors, dropout, 1234, grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name in ("x", "lora_A", "lora_B", "delta_bias"):
        if tensors[name] is not None:
            torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-12, atol=1e-12)
    assert got_grads["weight"] is None and got_grads["bias"] is None


@pytest.mark.parametrize("shape", [(3, 4), (2, 9, 4)], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_gradcheck(shape, dropout):
    tensors = layer_tensors(shape, out_features=3, r=2)
    x, weight, bias, lora_A, lora_B, delta_bias = tensors.values()
    assert torch.autograd.gradcheck(
        lambda x, a, b, d: FusedLoraLinear.apply(x, weight, bias, a, b, d, SCALING, dropout, 99),
        (x, lora_A, lora_B, delta_bias),
    )


def test_no_gradient_for_an_input_that_needs_none():
    tensors = layer_tensors((6, 4))
    tensors["x"].requires_grad_(False)
    fused(**tensors, dropout=0.2, seed=5).sum().backward()
    assert tensors["x"].grad is None and tensors["lora_A"].grad is not None


def test_keep_mask_is_regenerated_and_has_the_right_rate():
    like = torch.empty(1000, 1000)
    mask = lora_dropout_keep_mask(like, 0.1, 7)
    assert mask.dtype == torch.bool and mask.shape == like.shape
    assert torch.equal(mask, lora_dropout_keep_mask(like, 0.1, 7))
    assert not torch.equal(mask, lora_dropout_keep_mask(like, 0.1, 8))
    rate = mask.double().mean().item()
    kept = lora_dropout_keep_probability(0.1)
    assert abs(kept - 0.9) < 2**-16
    assert abs(rate - kept) < 5 * math.sqrt(kept * (1 - kept) / mask.numel())  # five standard errors
    # Neighbouring elements (same 64-bit draw) are independent: P(both kept) = kept^2.
    both = (mask[:, 1:] & mask[:, :-1]).double().mean().item()
    assert abs(both - kept**2) < 5 * math.sqrt(kept**2 * (1 - kept**2) / mask.numel())
    assert lora_dropout_keep_mask(torch.empty(3, 5), 0.5, 1).shape == (3, 5)  # not a multiple of 4


def seeded_weights(model):
    """Random LoRA weights (B starts at zero, which would leave A without gradient)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def fused_layers(model, input_ids):
    """Paths of the adapted modules whose output came out of FusedLoraLinear in one forward."""
    seen, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedModule):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.append(name) if type(out.grad_fn).__name__ == "FusedLoraLinearBackward" else None))
    logits = model(input_ids=input_ids).logits
    if logits.requires_grad:  # not when every adapter is merged
        logits.sum().backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return seen


def train_step(model, input_ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(input_ids=input_ids).logits
    logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2_conv1d", "llama"])
@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_model_fused_equals_unfused(make_model, bias, input_ids):
    model = seeded_weights(get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", bias=bias)))
    model.train()
    fused_count = set_lora_fused(model, True)
    assert fused_count == sum(isinstance(m, LoraLinearDelta) for m in model.modules()) > 0
    assert len(fused_layers(model, input_ids)) == fused_count
    logits, grads = train_step(model, input_ids)
    set_lora_fused(model, False)
    assert fused_layers(model, input_ids) == []
    expected_logits, expected_grads = train_step(model, input_ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # The frozen base never gets a gradient.
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_model_dropout_uses_the_regenerated_mask(input_ids):
    """A whole fused layer with dropout equals the reference given the mask its seed regenerates."""
    model = seeded_weights(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                                                                   target_modules=["q_proj"], bias="none")))
    model.train()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    delta = layer.adapters["default"]
    x = torch.randn(2, 7, 32, requires_grad=True)
    torch.manual_seed(11)
    output = layer(x)
    torch.manual_seed(11)
    seed = draw_dropout_seed()
    expected = reference(x, layer.base_layer.weight, None, delta.lora_A, delta.lora_B, None, 0.25, seed, delta.scaling)
    assert type(output.grad_fn).__name__ == "FusedLoraLinearBackward"
    grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, (x, delta.lora_A, delta.lora_B), grad_output)
    expected_grads = torch.autograd.grad(expected, (x, delta.lora_A, delta.lora_B), grad_output)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Eval mode drops nothing.
    model.eval()
    with torch.no_grad():
        expected = reference(x, layer.base_layer.weight, None, delta.lora_A, delta.lora_B, None, 0.0, 0, delta.scaling)
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_dropout_is_deterministic_given_the_seed(input_ids):
    model = seeded_weights(get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.2)))
    model.train()
    first = train_step(model, input_ids, seed=5)
    again = train_step(model, input_ids, seed=5)
    other = train_step(model, input_ids, seed=6)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    for name in first[1]:
        torch.testing.assert_close(first[1][name], again[1][name], rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


def test_gradient_checkpointing_recomputes_the_same_mask():
    torch.manual_seed(0)
    layer = AdaptedModule(nn.Linear(8, 6))
    layer.adapters["default"] = seeded_weights(LoraLinearDelta(layer.base_layer, 2, 2.0, 0.3, True, False))
    layer.active_adapters = ["default"]
    layer.base_layer.requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)

    def run(checkpointed):
        torch.manual_seed(21)
        if checkpointed:
            output = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            output = layer(x)
        return torch.autograd.grad(output.square().sum(), (x, *layer.adapters["default"].parameters()))

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_grad_eval_path_equals_unfused(input_ids):
    model = seeded_weights(get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)))
    model.eval()
    with torch.no_grad():
        got = model(input_ids=input_ids).logits
        set_lora_fused(model, False)
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unfused_cases_fall_back(input_ids):
    """Two running adapters, a merged adapter, a hooked base layer, DoRA and PiSSA take the unfused path."""
    model = seeded_weights(get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    model.train()
    assert len(fused_layers(model, input_ids)) == 4
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter(["default", "second"])
    assert fused_layers(model, input_ids) == ["base_model.model.layers.0.self_attn.v_proj",
                                              "base_model.model.layers.1.self_attn.v_proj"]
    model.set_adapter("default")
    model.merge_adapter()
    assert fused_layers(model, input_ids) == []
    model.unmerge_adapter()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    handle = layer.base_layer.register_forward_hook(lambda module, args, output: None)
    assert len(fused_layers(model, input_ids)) == 3
    handle.remove()
    for options in (dict(use_dora=True), dict(init_lora_weights="pissa")):
        other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], **options)).train()
        assert fused_layers(other, input_ids) == []


def test_other_dtype_input_falls_back():
    layer = AdaptedModule(nn.Linear(4, 3))
    layer.adapters["default"] = LoraLinearDelta(layer.base_layer, 2, 1.0, 0.0, False, False)
    layer.active_adapters = ["default"]
    layer.base_layer.requires_grad_(False)
    double = layer.adapters["default"].forward_with_base(layer.base_layer, torch.randn(2, 4, dtype=torch.float64))
    assert double is None
    assert layer(torch.randn(2, 4)).grad_fn.name() == "FusedLoraLinearBackward"


def test_merge_save_and_load_unchanged(tmp_path, input_ids):
    model = seeded_weights(get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules="all-linear", bias="lora_only")))
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    from peftkit import PeftModel

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, unmerged, rtol=1e-6, atol=1e-6)
