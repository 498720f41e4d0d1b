"""peftkit.estimate and `peftkit estimate`, the refusal in `peftkit train`, and low-memory loading (peftkit.loading)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_chat_model_folder

from peftkit.errors import PeftkitError
from peftkit.estimate import estimate_training_memory, parse_bytes
from peftkit.loading import load_model_layerwise

SCALING_CONFIGS = Path(__file__).resolve().parent.parent / "benchmarks" / "configs"


def llama_config_file(folder, **overrides):
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=400,
                  max_position_embeddings=256, tie_word_embeddings=False)
    config.update(overrides)
    path = Path(folder) / "config.json"
    path.write_text(json.dumps(config))
    return path


def peftkit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_trainable_parameters_are_counted_exactly_by_wrapping(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.model import get_peft_model
    from peftkit.registry import causal_method_config

    path = llama_config_file(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    for method, options in (("lora", {"r": 4}), ("full", None), ("ia3", None), ("ln_tuning", None)):
        real = get_peft_model(AutoModelForCausalLM.from_config(config), causal_method_config(method, **(options or {})))
        expected = sum(p.numel() for p in real.parameters() if p.requires_grad)
        estimate = estimate_training_memory(path, method, method_options=options, available_bytes=2**40)
        assert estimate.trainable_parameters == expected, method
    full = estimate_training_memory(path, "full", available_bytes=2**40)
    assert full.gradients_bytes == 4 * full.trainable_parameters and full.optimizer_bytes == 8 * full.trainable_parameters


def test_published_configs_have_their_published_sizes():
    sizes = {"smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384, "llama-3.2-3b": 3_212_749_824,
             "llama-2-7b": 6_738_415_616}
    for name, parameters in sizes.items():
        estimate = estimate_training_memory(SCALING_CONFIGS / f"{name}.json", "full", available_bytes=2**50)
        assert estimate.total_parameters == parameters, name


def test_quantizing_and_checkpointing_shrink_the_estimate(tmp_path):
    path = llama_config_file(tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    plain = estimate_training_memory(path, "lora", available_bytes=2**40)
    nf4 = estimate_training_memory(path, "lora", quantize="nf4", available_bytes=2**40)
    checkpointed = estimate_training_memory(path, "lora", quantize="nf4", gradient_checkpointing=True, available_bytes=2**40)
    assert nf4.weights_bytes < 0.5 * plain.weights_bytes
    assert checkpointed.activations_bytes < nf4.activations_bytes
    # Doubling the sequence doubles the activations that grow with its length and quadruples the attention
    # scores (L x L), so the ratio lies strictly between 2 and 4; a length-independent estimate gives 1.
    short = estimate_training_memory(path, "lora", max_length=256, available_bytes=2**40)
    longer = estimate_training_memory(path, "lora", max_length=512, available_bytes=2**40)
    assert 2 * short.activations_bytes < longer.activations_bytes < 4 * short.activations_bytes
    assert estimate_training_memory(path, "lora", available_bytes=1).fits is False


MEASURE = r"""
import json, resource, sys, torch
from peftkit.loading import load_model_layerwise
from peftkit.model import get_peft_model
from peftkit.registry import causal_method_config
torch.set_num_threads(1)
config, method, quantize = sys.argv[1], sys.argv[2], sys.argv[3] if sys.argv[3] != "none" else None
model, _ = load_model_layerwise(config, quantize)
wrapped = get_peft_model(model, causal_method_config(method, **({"r": 16} if method == "lora" else {})))
trainable = [p for p in wrapped.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
wrapped.train()
for _ in range(3):
    wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.parametrize("method, quantize", [("full", "none"), ("lora", "none"), ("lora", "nf4")])
def test_estimate_is_near_the_measured_peak(tmp_path, method, quantize):
    """A model big enough that the weights and activations, not the runtime, make the peak; generous tolerance
    (the 15% target is checked at real sizes by benchmarks/scaling.py)."""
    path = llama_config_file(tmp_path, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=32000,
                             num_attention_heads=8, num_key_value_heads=4)
    estimate = estimate_training_memory(path, method, quantize=None if quantize == "none" else quantize, batch_size=2,
                                        max_length=256, method_options={"r": 16} if method == "lora" else None,
                                        available_bytes=2**40)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path), method, quantize], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.splitlines()[-1])["peak"]
    assert 0.7 < estimate.peak_bytes / measured < 1.4, (estimate.to_dict(), measured)


def test_cli_estimate_prints_the_parts_and_a_verdict(tmp_path):
    path = llama_config_file(tmp_path)
    result = peftkit("estimate", "--model", path, "--method", "lora", "--quantize", "nf4", "--gradient-checkpointing")
    assert result.returncode == 0, result.stderr
    for label in ("trainable parameters", "weights", "gradients", "optimizer state", "activations", "predicted peak", "verdict"):
        assert label in result.stdout
    as_json = json.loads(peftkit("estimate", "--model", path, "--method", "full", "--json").stdout)
    assert as_json["trainable_parameters"] == as_json["total_parameters"] and as_json["peak_bytes"] > 0
    refused = peftkit("estimate", "--model", path, "--method", "full", env={"PEFTKIT_AVAILABLE_MEMORY": "1MiB"})
    assert "does NOT fit" in refused.stdout


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a valid JSON config file"),
    ('{"hidden_size": 8}', 'has no "model_type"'),
    ('{"model_type": "no-such-architecture"}', "does not know model_type"),
])
def test_cli_estimate_bad_config_gives_one_clear_line(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    result = peftkit("estimate", "--model", path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_estimate_unknown_model():
    result = peftkit("estimate", "--model", "no-such-model")
    assert result.returncode == 2 and "unknown model 'no-such-model'" in result.stderr and "Traceback" not in result.stderr


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("512") == 512
    with pytest.raises(PeftkitError, match="memory size"):
        parse_bytes("lots")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chat")
    tiny_chat_model_folder(folder)
    data = folder / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) for i in range(8)))
    return folder


def test_train_refuses_a_run_that_will_not_fit_and_names_a_cheaper_one(chat_folder, tmp_path):
    full = estimate_training_memory(chat_folder, "full", batch_size=2, max_length=64, available_bytes=2**40)
    cheap = estimate_training_memory(chat_folder, "lora", batch_size=2, max_length=64, available_bytes=2**40)
    assert cheap.peak_bytes < full.peak_bytes
    between = str((full.peak_bytes + cheap.peak_bytes) // 2)
    arguments = ["train", "--model", chat_folder, "--task", chat_folder / "chat.jsonl", "--method", "full", "--max-steps", "1",
                 "--batch-size", "2", "--max-length", "64", "--no-progress", "--output-dir", tmp_path / "run"]
    refused = peftkit(*arguments, env={"PEFTKIT_AVAILABLE_MEMORY": between})
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("peftkit: error: this run will not fit") and "--skip-memory-check" in line
    assert "a cheaper setting that fits: --method lora" in line and "available" in line
    assert not (tmp_path / "run" / "metrics.json").exists()
    nothing = peftkit(*arguments, env={"PEFTKIT_AVAILABLE_MEMORY": "1MiB"})
    assert nothing.returncode == 2 and "no cheaper setting fits either" in nothing.stderr
    forced = peftkit(*arguments, "--skip-memory-check", env={"PEFTKIT_AVAILABLE_MEMORY": "1MiB"})
    assert forced.returncode == 0, forced.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cpu_seconds"] > 0 and "energy_kwh" in metrics


def test_the_resource_meter_estimates_energy_with_codecarbon_quietly(tmp_path, monkeypatch):
    """With codecarbon (the energy extra) a span gets an energy figure labeled an estimate; no file is written
    and codecarbon's deprecation warnings stay out of the user's log."""
    import time
    import warnings

    pytest.importorskip("codecarbon", reason="the energy extra: pip install codecarbon")
    from peftkit.train.measure import ENERGY_NOTE, ResourceMeter, rapl_readable

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meter = ResourceMeter()
        meter.start()
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            sum(range(1000))
        result = meter.stop()
    assert result["cpu_seconds"] >= 0.3 and result["energy_kwh"] > 0
    assert result["energy_note"] == ("codecarbon, from RAPL power counters" if rapl_readable() else ENERGY_NOTE)
    assert list(tmp_path.iterdir()) == []
    assert not [w for w in caught if "codecarbon" in (w.filename or "")], [str(w.message) for w in caught]


# --------------------------------------------------------------------------- loading


def test_layerwise_loading_matches_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit.quantize import quantize_model

    folder = tiny_chat_model_folder(tmp_path / "model")
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    plain, report = load_model_layerwise(folder, None)
    assert not report.random_weights and report.quantized_layers == 0
    torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    quantized, report = load_model_layerwise(folder, "nf4")
    quantize_model(reference, "nf4", task_type="CAUSAL_LM")
    assert report.quantized_layers == 14
    torch.testing.assert_close(quantized(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_random_weight_loading_from_a_config_ties_and_seeds(tmp_path):
    path = llama_config_file(tmp_path, tie_word_embeddings=True)
    first, report = load_model_layerwise(path, "int8", seed=3)
    second, _ = load_model_layerwise(path, "int8", seed=3)
    assert report.random_weights and first.lm_head.weight is first.model.embed_tokens.weight
    assert not any(p.is_meta for p in first.parameters())
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits)


LOAD_PEAK = r"""
import json, sys
from pathlib import Path
def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
import torch, transformers
from peftkit.loading import load_model_layerwise
load_model_layerwise(transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, vocab_size=10), "nf4")  # imports the modelling code
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
model, report = load_model_layerwise(sys.argv[1], "nf4")
print(json.dumps({"growth": status("VmHWM") - before, "model_bytes": report.model_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_nf4_loading_never_holds_the_float_model(tmp_path):
    path = llama_config_file(tmp_path, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, vocab_size=1000,
                             num_attention_heads=8, num_key_value_heads=8)
    float_bytes = 4 * estimate_training_memory(path, "full", available_bytes=2**40).total_parameters  # ~540 MB
    result = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["growth"] < 0.35 * float_bytes, measured
    assert measured["growth"] < 1.3 * measured["model_bytes"] + 64 * 2**20, measured


def test_quantizing_in_slices_gives_the_same_codes(monkeypatch):
    from peftkit import quantize

    weight = torch.randn(130, 70)
    whole = quantize.quantize_blockwise(weight, "nf4", 64)
    monkeypatch.setattr(quantize, "QUANTIZE_SLICE_VALUES", 256)
    sliced = quantize.quantize_blockwise(weight, "nf4", 64)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs a GPU (bitsandbytes NF4 kernel, bf16)")
def test_cuda_layerwise_nf4_loading_in_bf16(tmp_path):
    path = llama_config_file(tmp_path)
    model, report = load_model_layerwise(path, "nf4", dtype=torch.bfloat16, device="cuda")
    from peftkit.quantize import QuantizedLinear

    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.codes.is_cuda for m in layers)
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
    estimate = estimate_training_memory(path, "lora", quantize="nf4", dtype=torch.bfloat16, available_bytes=2**40)
    assert estimate.weights_bytes > 0


def test_compare_report_shows_cpu_time_and_energy():
    from peftkit.bench.report import how_measured, markdown_table

    row = {"method": "lora", "status": "ok", "accuracy": 0.9, "cpu_seconds": 12.0, "energy_kwh": 0.0005,
           "energy_note": "estimate: codecarbon, from CPU TDP x load", "trainable_parameters": 10, "trainable_share": 0.1}
    table = markdown_table([row])
    assert "CPU time" in table and "12 s" in table and "0.5 Wh" in table
    settings = {"model": "m", "task": "t", "budget": "1 steps", "seed": 0}
    assert any("estimate: codecarbon" in line for line in how_measured([row], settings))
