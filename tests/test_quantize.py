"""A quantized frozen base: NF4 / int8 storage, LoRA on top, save/load, merging with a measured error."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_llama
from torch import nn

from peftkit import LoraConfig, get_peft_model, io
from peftkit.errors import PeftkitError
from peftkit.model import PeftModel
from peftkit.quantize import (
    NF4_LEVELS,
    QuantizedLinear,
    base_weight_bytes,
    dequantize_blockwise,
    dequantize_scales,
    merge_error_report,
    quantize_blockwise,
    quantize_model,
    quantize_scales,
)

LEVELS = torch.tensor(NF4_LEVELS)
# The largest distance from a value in [-1, 1] to its nearest NF4 level: half the widest gap.
NF4_HALF_GAP = float((LEVELS[1:] - LEVELS[:-1]).max() / 2)


def _block_absmax(weight, block_size):
    flat = weight.reshape(-1)
    padded = F.pad(flat, (0, -flat.numel() % block_size))
    per_block = padded.view(-1, block_size).abs().amax(1)
    return per_block.repeat_interleave(block_size)[: flat.numel()].view(weight.shape)


@pytest.mark.parametrize("shape,block_size", [((16, 64), 64), ((37, 53), 64), ((1, 3), 64), ((5, 1), 4), ((7, 9), 2)])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_round_trip_error_is_within_half_a_level_of_the_block_absmax(shape, block_size, scheme):
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]  # rows of very different scales
    layer = QuantizedLinear(weight, None, scheme, block_size, double_quant=False)
    restored = layer.dequantize()
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    step = NF4_HALF_GAP if scheme == "nf4" else 0.5 / 127
    bound = _block_absmax(weight, block_size) * step * (1 + 1e-5) + 1e-12
    assert torch.all((restored - weight).abs() <= bound)


def test_nf4_code_book_values_round_trip_exactly_and_pack_high_nibble_first():
    torch.manual_seed(1)
    # Each block: NF4 levels (one of them 1.0, so the absmax is exactly the block's scale) times a scale.
    indices = torch.randint(0, 16, (6, 64))
    indices[:, 0] = 15
    scales = torch.rand(6, 1) * 3 + 0.1
    weight = (LEVELS[indices] * scales).view(12, 32)
    codes, absmax = quantize_blockwise(weight, "nf4", 64)
    assert torch.equal(dequantize_blockwise(codes, absmax, "nf4", 64, weight.numel()).view(12, 32), weight)
    assert torch.equal(absmax, scales.flatten())
    # bitsandbytes' order: the first value of each pair in the high nibble.
    assert torch.equal(codes, ((indices.flatten()[0::2] << 4) | indices.flatten()[1::2]).to(torch.uint8))
    codes, _ = quantize_blockwise(torch.tensor([1.0, -1.0]), "nf4", 2)
    assert codes.tolist() == [0xF0]


def test_int8_is_exact_on_multiples_of_a_127th_of_the_absmax():
    steps = torch.arange(-127, 128, dtype=torch.float32)[torch.randperm(255, generator=torch.Generator().manual_seed(0))]
    weight = (steps[:192] / 127 * 0.25).view(3, 64)
    weight[:, 0] = 0.25
    layer = QuantizedLinear(weight, None, "int8", 64, double_quant=False)
    assert layer.codes.dtype == torch.int8
    assert torch.allclose(layer.dequantize(), weight, rtol=0, atol=1e-7)


def test_double_quantization_of_scales_matches_a_direct_computation_and_saves_bytes():
    torch.manual_seed(2)
    absmax = torch.rand(600) * 0.2 + 0.01
    codes, scale, offset = quantize_scales(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == (600,) and scale.shape == (3,)
    # The reference: centre on the mean, then per block of 256, round to 127 steps of the block's absmax.
    centred = absmax - absmax.mean()
    expected = torch.cat([
        torch.round(block / block.abs().max() * 127) / 127 * block.abs().max() for block in centred.split(256)
    ]) + absmax.mean()
    restored = dequantize_scales(codes, scale, offset)
    assert torch.allclose(restored, expected, atol=1e-7)
    spread = torch.stack([block.abs().max() for block in centred.split(256)]).repeat_interleave(256)[:600]
    assert torch.all((restored - absmax).abs() <= spread / 254 + 1e-7)

    weight = torch.randn(128, 300)
    on, off = (QuantizedLinear(weight, None, "nf4", 64, double_quant=flag) for flag in (True, False))
    blocks = math.ceil(weight.numel() / 64)
    assert off.weight_bytes() == weight.numel() // 2 + 4 * blocks
    assert on.weight_bytes() == weight.numel() // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    assert on.weight_bytes() / (4 * weight.numel()) < 0.135 < off.weight_bytes() / (4 * weight.numel())
    assert set(dict(on.named_buffers())) == {"codes", "absmax_codes", "absmax_scale", "absmax_offset"}
    assert set(dict(off.named_buffers())) == {"codes", "absmax"}
    # The second-level quantization adds little to the weight error.
    error_on = (on.dequantize() - weight).norm() / weight.norm()
    error_off = (off.dequantize() - weight).norm() / weight.norm()
    assert error_off < 0.11 and error_on < error_off * 1.02


def test_forward_and_input_gradient_equal_a_float_linear_with_the_dequantized_weight():
    torch.manual_seed(3)
    linear = nn.Linear(40, 24)
    layer = QuantizedLinear.from_linear(linear, "nf4", 64)
    x = torch.randn(5, 7, 40, requires_grad=True)
    reference_x = x.detach().clone().requires_grad_(True)
    output = layer(x)
    reference = F.linear(reference_x, layer.dequantize(), linear.bias.detach())
    assert torch.allclose(output, reference, atol=1e-6)
    gradient = torch.randn_like(output)
    output.backward(gradient)
    reference.backward(gradient)
    assert torch.allclose(x.grad, reference_x.grad, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight.shape == (24, 40) and (layer.in_features, layer.out_features) == (40, 24)
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_scratch_dequantization_gives_the_same_values_and_reuses_one_buffer_per_size(scheme):
    """Forward and backward dequantize into a reused buffer; the values are bit for bit the fresh ones, two
    layers of one size share it, and the public weight never hands it out."""
    torch.manual_seed(4)
    first, second = (QuantizedLinear.from_linear(nn.Linear(64, 48), scheme, 64) for _ in range(2))
    fresh = first.dequantize()
    scratch = first.dequantize(scratch=True)
    assert torch.equal(scratch, fresh)
    assert second.dequantize(scratch=True).data_ptr() == scratch.data_ptr()  # the same buffer, overwritten
    assert torch.equal(second.dequantize(), second.dequantize(scratch=True))
    assert first.weight.data_ptr() != scratch.data_ptr() and torch.equal(first.weight, fresh)
    # Two layers of one size in one graph: each backward pass uses its own layer's values.
    x, mix = torch.randn(3, 64, requires_grad=True), torch.randn(48, 64)
    second(first(x) @ mix + x).sum().backward()
    upstream = torch.ones(3, 48) @ second.dequantize()  # the gradient reaching first(x) @ mix + x
    assert torch.allclose(x.grad, upstream @ mix.T @ first.dequantize() + upstream, atol=1e-4)


def test_quantize_model_skips_heads_says_so_and_stays_close_to_float():
    model = tiny_bert()
    reference = tiny_bert()
    ids = torch.randint(0, 120, (3, 12), generator=torch.Generator().manual_seed(0))
    report = quantize_model(model, "int8", task_type="SEQ_CLS")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    assert isinstance(model.bert.pooler.dense, QuantizedLinear)
    assert type(model.classifier) is nn.Linear and set(report.skipped) == {"classifier"}
    assert "classification head" in report.skipped["classifier"] and "classifier" in report.summary()
    assert len(report.quantized) == 3 * 6 + 1 and 0.25 < report.ratio < 0.28
    with torch.no_grad():
        float_logits, int8_logits = reference(ids).logits, model(ids).logits
    assert torch.allclose(int8_logits, float_logits, atol=0.02 * float_logits.abs().max())

    nf4 = tiny_bert()
    quantize_model(nf4, "nf4", task_type="SEQ_CLS")
    float_hidden = reference.bert(ids).last_hidden_state.detach()
    nf4_hidden = nf4.bert(ids).last_hidden_state.detach()
    assert F.cosine_similarity(nf4_hidden.flatten(), float_hidden.flatten(), dim=0) > 0.97

    llama = tiny_llama()
    report = quantize_model(llama, "nf4", skip=["layers.1.mlp"])
    assert type(llama.lm_head) is nn.Linear and "LM head" in report.skipped["lm_head"]
    assert report.skipped["model.layers.1.mlp.down_proj"] == "named in skip"
    assert isinstance(llama.model.layers[0].mlp.down_proj, QuantizedLinear)
    sizes = base_weight_bytes(llama)
    assert sizes["quantized_linear"] == report.quantized_bytes
    assert sizes["float_linear"] == sum(m.weight.numel() * 4 for m in llama.modules() if type(m) is nn.Linear)
    assert sizes["whole_model"] == sum(t.numel() * t.element_size() for t in [*llama.parameters(), *llama.buffers()])


@pytest.mark.parametrize("scheme,block_size,message", [
    ("nf3", 64, "unknown quantization scheme 'nf3'; choose one of: nf4, int8"),
    ("nf4", 63, "block_size must be an even integer"),
    ("int8", 0, "block_size must be an even integer"),
    ("nf4", True, "block_size must be an even integer"),
])
def test_bad_scheme_or_block_size_is_a_clear_error(scheme, block_size, message):
    with pytest.raises(PeftkitError, match=message):
        quantize_model(tiny_bert(), scheme, block_size)


def test_quantizing_after_adapters_or_a_model_without_linear_layers_is_refused():
    wrapped = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"]))
    with pytest.raises(PeftkitError, match="quantize the base model first"):
        quantize_model(wrapped.base_model)
    with pytest.raises(PeftkitError, match="no nn.Linear layer to quantize"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)))


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 120, (8, 10), generator=generator),
            "labels": torch.randint(0, 3, (8,), generator=generator)}


def _quantized_lora(seed=0, scheme="nf4", **lora):
    base = tiny_bert(seed=seed)
    quantize_model(base, scheme, task_type="SEQ_CLS")
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", **lora))


def test_lora_on_an_nf4_base_trains_and_never_touches_the_base():
    model = _quantized_lora()
    frozen = {name: tensor.clone() for name, tensor in model.named_buffers() if ".base_layer." in name}
    assert frozen and all("codes" in n or "absmax" in n for n in frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, tensor in model.named_buffers():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "classifier" in n for n in trained)


def test_saved_adapter_loads_on_a_freshly_quantized_base_with_identical_outputs(tmp_path):
    model = _quantized_lora(init_lora_weights=False)
    batch = _batch(1)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = tiny_bert()
    quantize_model(fresh, "nf4", task_type="SEQ_CLS")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch["input_ids"]).logits, expected)
    # The quantized base itself round-trips through safetensors (codes and scales are buffers).
    source, target = tiny_bert(seed=0), tiny_bert(seed=5)
    for model_ in (source, target):
        quantize_model(model_, "nf4", task_type="SEQ_CLS")
    io.write_tensors(tmp_path / "base.safetensors", {k: v.contiguous() for k, v in source.state_dict().items()})
    target.load_state_dict(io.read_tensors(tmp_path / "base.safetensors"))
    assert torch.equal(target.bert.encoder.layer[1].output.dense.weight, source.bert.encoder.layer[1].output.dense.weight)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merging_requantizes_reports_the_error_and_keeps_outputs_within_it(scheme):
    model = _quantized_lora(scheme=scheme, init_lora_weights=False).eval()
    ids = _batch(2)["input_ids"]
    layer_path = "bert.encoder.layer.0.attention.self.query"
    wrapper = model.base_model.get_submodule(layer_path)
    quantized = wrapper.base_layer
    before_state = quantized.quantized_state()
    x = torch.randn(6, 32)
    with torch.no_grad():
        unmerged_layer = wrapper(x)
        unmerged = model(input_ids=ids).logits
    model.merge_adapter()
    report = merge_error_report(model)
    assert len(report["layers"]) == 3 * 6 + 1
    error = quantized.merge_error
    assert error["max_abs_error"] > 0 and 0 < report["relative_error"] < (0.12 if scheme == "nf4" else 0.01)
    assert report["update_relative_error"] > 0
    with torch.no_grad():
        merged_layer = quantized(x)  # the merged base alone
        merged = model(input_ids=ids).logits
    # One layer: |(W_q - W_exact) x| <= ||W_q - W_exact||_F ||x|| for every row.
    bound = math.sqrt(error["error_sq"]) * x.norm(dim=1, keepdim=True)
    assert torch.all((merged_layer - unmerged_layer).abs() <= bound * (1 + 1e-4) + 1e-5)
    # The whole model moves by an amount of the order of the reported relative error.
    change = (merged - unmerged).norm() / unmerged.norm()
    assert change < 5 * report["relative_error"] + 1e-4
    # Unmerging restores the codes saved before the merge, bit for bit.
    model.unmerge_adapter()
    for name, tensor in quantized.quantized_state().items():
        assert torch.equal(tensor, before_state[name]), name
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-5)
    assert merge_error_report(model)["layers"] == {}
    plain = model.merge_and_unload()
    assert isinstance(plain.bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    assert merge_error_report(plain)["relative_error"] == pytest.approx(report["relative_error"])


def test_a_merge_into_a_quantized_layer_is_never_a_silent_no_op():
    model = _quantized_lora(init_lora_weights=False)
    quantized = model.base_model.bert.encoder.layer[0].output.dense.base_layer
    before = quantized.dequantize()
    delta = model.base_model.bert.encoder.layer[0].output.dense.adapters["default"].delta_weight().detach()
    model.merge_adapter()
    after = quantized.dequantize()
    # The stored weight moved towards W + delta: closer to it than the old weight was.
    assert (after - (before + delta)).norm() < 0.5 * delta.norm()


@pytest.mark.parametrize("options", [dict(use_dora=True), dict(bias="all")])
def test_dora_and_trained_biases_merge_into_a_quantized_base(options):
    model = _quantized_lora(init_lora_weights=False, **options).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and "lora_" not in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    ids = _batch(3)["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    report = merge_error_report(model)
    assert (merged - unmerged).norm() / unmerged.norm() < 5 * report["relative_error"] + 1e-4


def test_methods_that_train_the_base_weights_are_refused_with_quantize():
    from peftkit.train.job import train_classifier

    for method, reason in [("full", "nothing would stay frozen"), ("freeze", "fixed codes"), ("sparse", "entries")]:
        with pytest.raises(PeftkitError, match=f"--quantize cannot be used with --method {method}: .*{reason}"):
            train_classifier("minilm", "sst2", method, "unused", quantize="nf4")
    with pytest.raises(PeftkitError, match="unknown quantization scheme 'nf2'"):
        train_classifier("minilm", "sst2", "lora", "unused", quantize="nf2")


def _peftkit(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "peftkit.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"peftkit {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_cli_train_eval_merge_with_quantize_nf4(tiny_model_folder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftkit.train.job import load_run

    data = tmp_path / "data.jsonl"
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(48)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    _peftkit("train", "--model", tiny_model_folder, "--task", data, "--method", "lora", "--quantize", "nf4",
             "--output-dir", run, "--max-steps", "4", "--batch-size", "8", "--no-progress")
    info = json.loads((run / "adapter" / "peftkit_run.json").read_text())
    assert info["quantize"] == {"scheme": "nf4", "block_size": 64, "double_quant": True}
    assert json.loads((run / "job.json").read_text())["quantize"] == "nf4"
    model, _, _ = load_run(run / "adapter")
    assert isinstance(model.base_model.bert.encoder.layer[0].attention.self.query.base_layer, QuantizedLinear)
    merged = tmp_path / "merged"
    output = _peftkit("merge", run / "adapter", "--output", merged).stdout
    assert "merged into a quantized base" in output and "% of the adapter's update" in output
    plain = AutoModelForSequenceClassification.from_pretrained(merged)
    assert type(plain.bert.encoder.layer[0].attention.self.query) is nn.Linear

    refused = _peftkit("train", "--model", tiny_model_folder, "--task", data, "--method", "full", "--quantize", "nf4",
                       "--output-dir", tmp_path / "full", "--max-steps", "1", check=False)
    assert refused.returncode != 0 and "--quantize cannot be used with --method full" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_parameter_report_counts_the_quantized_weights_and_lora_export_is_exact():
    from peftkit.export import layer_updates

    float_model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    model = _quantized_lora(init_lora_weights=False)
    assert model.trainable_parameters_report().total == float_model.trainable_parameters_report().total
    assert model.trainable_parameters_report().trainable == float_model.trainable_parameters_report().trainable
    # Converting to plain LoRA (and adapter arithmetic) measures each update on a float copy: exact,
    # and the quantized base is left untouched.
    before = {n: t.clone() for n, t in model.named_buffers()}
    updates = layer_updates(model, "default", skip_modules_to_save=True)
    assert len(updates) == 3 * 6 + 1
    assert all(torch.equal(t, before[n]) for n, t in model.named_buffers())
    for path, update in updates.items():
        delta = model.base_model.get_submodule(path).adapters["default"].delta_weight()
        assert torch.allclose(update, delta, atol=1e-6), path


def test_causal_training_with_quantize_nf4_saves_and_reloads_the_quantized_base(tmp_path):
    from conftest import tiny_chat_model_folder

    from peftkit.cli import main
    from peftkit.train.instruct import load_causal_run

    folder = tiny_chat_model_folder(tmp_path / "tiny-chat")
    output = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--task", "trec-instruct", "--method", "lora", "--quantize", "nf4",
                 "--max-steps", "2", "--max-train-examples", "16", "--max-eval-examples", "4", "--batch-size", "4",
                 "--no-progress", "--output-dir", str(output)]) == 0
    info = json.loads((output / "adapter" / "peftkit_run.json").read_text())
    assert info["quantize"]["scheme"] == "nf4" and info["kind"] == "causal"
    model, tokenizer, _ = load_causal_run(output / "adapter")
    layers = model.base_model.model.layers[0]
    assert isinstance(layers.self_attn.q_proj.base_layer, QuantizedLinear)
    assert type(model.base_model.lm_head) is nn.Linear
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)
