"""The training loop: learning, exact resume, accumulation, atomic checkpoints, data parallel."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import PeftkitError
from peftkit.train import checkpoint as ckpt
from peftkit.train.loop import TrainingArguments, TrainResult, train
from peftkit.train.schedule import lr_multiplier

_WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("peftkit_tests_ddp_worker", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
TinyClassifier, make_examples, collate = worker.TinyClassifier, worker.make_examples, worker.collate

TRAIN = make_examples(200, seed=1)  # 200 = 12 full batches of 16 + one of 8
EVAL = make_examples(96, seed=2, split="eval")


def arguments(tmp_path: Path, name: str, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / name),
        epochs=2,
        batch_size=16,
        eval_batch_size=64,
        learning_rate=0.05,
        progress=False,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in ckpt.trainable_parameters(model).items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max()}"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=f"{name} differs")


class KillAfter:
    """collate_fn that raises on its n-th training batch, as a kill in the middle of a run would."""

    def __init__(self, batches: int):
        self.remaining = batches

    def __call__(self, examples):
        if examples[0]["split"] == "train":
            self.remaining -= 1
            if self.remaining < 0:
                raise KeyboardInterrupt("simulated kill")
        return collate(examples)


def test_training_learns_and_reports(tmp_path):
    model = TinyClassifier()
    frozen_before = model.embedding.weight.detach().clone()
    best_calls = []
    args = arguments(tmp_path, "run", epochs=4, save_steps=10)

    result = train(model, TRAIN, EVAL, args, collate, on_save_best=lambda m: best_calls.append(m))

    assert isinstance(result, TrainResult)
    assert torch.equal(model.embedding.weight, frozen_before)
    assert model.embedding.weight.grad is None
    assert result.steps == 4 * 13 and result.epochs == 4
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]
    assert result.final_eval["accuracy"] >= 0.95 and result.best_eval["accuracy"] >= 0.95
    assert best_calls and all(m is model for m in best_calls)
    assert [r["step"] for r in result.history] == [13, 26, 39, 52]
    assert result.trainable_parameters == 16 * 2 + 2
    assert result.total_parameters == 32 * 16 + 16 * 2 + 2

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected_keys = {
        "final_eval",
        "best_eval",
        "best_step",
        "metric_for_best",
        "history",
        "train_loss",
        "final_train_loss",
        "steps",
        "epochs",
        "examples_seen",
        "examples_per_second",
        "wall_time_s",
        "peak_rss_mb",
        "peak_cuda_memory_mb",
        "trainable_parameters",
        "total_parameters",
        "num_processes",
        "global_batch_size",
        "resumed_from",
        "output_dir",
        "median_step_time_s",
        "stopped_by_time_limit",
        "cpu_seconds",
        "energy_kwh",
        "energy_note",
    }
    assert set(metrics) == expected_keys
    assert metrics["examples_seen"] == 4 * 200 and metrics["peak_rss_mb"] > 10
    assert metrics["median_step_time_s"] > 0 and metrics["stopped_by_time_limit"] is False
    assert metrics["best_eval"] == result.best_eval

    # The model ends with the best weights, which best/ also holds.
    best = load_file(tmp_path / "run" / "best" / "trainable.safetensors")
    assert_same_tensors(best, trainable_state(model))

    # Every .pt file of a checkpoint loads with weights_only=True.
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step-52"
    for file in latest.glob("*.pt"):
        torch.load(file, weights_only=True)


@pytest.mark.parametrize("kills", [(12,), (17, 6)], ids=["kill-in-epoch-1", "kill-twice-epoch-2"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, kills, capsys):
    """Dropout is on (p=0.1), so equality needs the RNG restored as well as the weights."""
    reference_model = TinyClassifier()
    train(reference_model, TRAIN, EVAL, arguments(tmp_path, "uninterrupted", save_steps=5), collate)

    model = TinyClassifier()
    for kill_after in kills:
        resume = (tmp_path / "killed" / "checkpoints").exists()
        with pytest.raises(KeyboardInterrupt):
            train(model, TRAIN, EVAL, arguments(tmp_path, "killed", save_steps=5, resume=resume), KillAfter(kill_after))
        model = TinyClassifier()  # a fresh process would start from fresh weights
    latest = ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints")
    state = ckpt.read_state(latest)["progress"]
    assert state["batch_in_epoch"] > 0, "the test should resume in the middle of an epoch"

    capsys.readouterr()
    resumed_step = state["step"]
    result = train(model, TRAIN, EVAL, arguments(tmp_path, "killed", save_steps=5, resume=True), collate)

    assert result.resumed_from == str(latest)
    # the console says so, with the step it continues from
    assert f"resumed from {latest} at step {resumed_step} of " in capsys.readouterr().out
    assert_same_tensors(trainable_state(model), trainable_state(reference_model))

    def last_checkpoint(name):
        return load_file(tmp_path / name / "checkpoints" / "step-26" / "trainable.safetensors")

    assert_same_tensors(last_checkpoint("killed"), last_checkpoint("uninterrupted"))
    reference = json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())
    assert result.history == reference["history"]
    assert result.best_step == reference["best_step"]


def test_resume_of_finished_run_changes_nothing(tmp_path):
    model = TinyClassifier()
    first = train(model, TRAIN, None, arguments(tmp_path, "run", max_steps=7), collate)
    after_first = trainable_state(model)
    again = train(TinyClassifier(), TRAIN, None, arguments(tmp_path, "run", max_steps=7, resume=True), collate)
    assert again.steps == first.steps == 7 and again.history == first.history
    assert_same_tensors(load_file(tmp_path / "run" / "checkpoints" / "step-7" / "trainable.safetensors"), after_first)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    # 200 examples: the last step of each epoch has 8 examples either way (one short micro-batch).
    big = TinyClassifier(dropout=0.0)
    accumulated = TinyClassifier(dropout=0.0)
    result_big = train(big, TRAIN, None, arguments(tmp_path, "big", batch_size=16), collate)
    result_acc = train(
        accumulated, TRAIN, None, arguments(tmp_path, "acc", batch_size=8, gradient_accumulation_steps=2), collate
    )
    assert result_big.steps == result_acc.steps == 26
    assert result_acc.global_batch_size == 16
    assert_same_tensors(trainable_state(big), trainable_state(accumulated), atol=1e-6)
    for a, b in zip(result_big.history, result_acc.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


def test_checkpoints_are_pruned_and_half_written_ones_ignored(tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"

    def args(**more):
        return arguments(tmp_path, "run", max_steps=20, save_steps=3, keep_checkpoints=2, **more)

    with pytest.raises(KeyboardInterrupt):
        train(TinyClassifier(), TRAIN, None, args(), KillAfter(10))
    assert sorted(p.name for p in root.iterdir()) == ["step-6", "step-9"]

    # A kill in the middle of a save: the files go into a temporary folder that never gets its name.
    calls = {"count": 0}
    real_save_file = ckpt.save_file

    def dying_save_file(*a, **kw):
        calls["count"] += 1
        if calls["count"] == 2:  # the save at step 13 (the end of epoch 1)
            raise KeyboardInterrupt("killed while saving")
        return real_save_file(*a, **kw)

    monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        train(TinyClassifier(), TRAIN, None, args(resume=True), collate)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-13", "step-12", "step-9"]
    # A folder with a checkpoint's name but no state.json (never made by the save protocol) is no checkpoint.
    (root / "step-99").mkdir()
    (root / "step-99" / "trainable.safetensors").write_bytes(b"garbage")

    model = TinyClassifier()
    resumed = train(model, TRAIN, None, args(resume=True), collate)
    assert resumed.resumed_from == str(root / "step-12")
    assert not (root / ".tmp-step-13").exists()
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step-18", "step-20"]

    uninterrupted = TinyClassifier()
    train(uninterrupted, TRAIN, None, arguments(tmp_path, "reference", max_steps=20), collate)
    assert_same_tensors(trainable_state(model), trainable_state(uninterrupted))


def test_resume_errors_name_the_problem(tmp_path):
    with pytest.raises(PeftkitError, match="no complete checkpoint"):
        train(TinyClassifier(), TRAIN, None, arguments(tmp_path, "empty", resume=True), collate)

    train(TinyClassifier(), TRAIN, None, arguments(tmp_path, "run", max_steps=3), collate)
    with pytest.raises(PeftkitError, match="already holds checkpoints"):
        train(TinyClassifier(), TRAIN, None, arguments(tmp_path, "run", max_steps=3), collate)
    with pytest.raises(PeftkitError, match=r"'head\.weight' has shape \(2, 16\) in the checkpoint but \(3, 16\)"):
        train(TinyClassifier(num_classes=3), TRAIN, None, arguments(tmp_path, "run", max_steps=6, resume=True), collate)
    with pytest.raises(PeftkitError, match="examples_per_global_batch=16"):
        train(
            TinyClassifier(), TRAIN, None, arguments(tmp_path, "run", max_steps=6, batch_size=8, resume=True), collate
        )
    with pytest.raises(PeftkitError, match="lr_scheduler"):
        train(TinyClassifier(), TRAIN, None, arguments(tmp_path, "x", lr_scheduler="step"), collate)
    with pytest.raises(PeftkitError, match="metric_for_best='f1' is not an eval metric"):
        train(TinyClassifier(), TRAIN, EVAL, arguments(tmp_path, "x", metric_for_best="f1"), collate)
    with pytest.raises(PeftkitError, match="greater_is_better=False"):
        train(TinyClassifier(), TRAIN, EVAL, arguments(tmp_path, "x", metric_for_best="eval_loss"), collate)


def test_batch_order_is_used_and_checked(tmp_path):
    seen = []

    def recording_collate(examples):
        if examples[0]["split"] == "train":
            seen.extend(id(e) for e in examples)
        return collate(examples)

    def reverse(epoch):
        return list(range(len(TRAIN)))[::-1]

    train(TinyClassifier(), TRAIN, None, arguments(tmp_path, "run", epochs=1), recording_collate, batch_order=reverse)
    assert seen == [id(e) for e in reversed(TRAIN)]
    with pytest.raises(PeftkitError, match="one index per training example"):
        train(
            TinyClassifier(), TRAIN, None, arguments(tmp_path, "bad", epochs=1), collate, batch_order=lambda e: [0, 1]
        )


def test_each_epoch_has_its_own_order_independent_of_global_rng(tmp_path):
    def recorded_orders(global_seed):
        seen = []

        def recording_collate(examples):
            seen.extend(id(e) for e in examples)
            return collate(examples)

        torch.manual_seed(global_seed)  # train() seeds from args.seed; the order must not depend on this
        train(TinyClassifier(), TRAIN, None, arguments(tmp_path, f"run{global_seed}", epochs=2), recording_collate)
        return seen[: len(TRAIN)], seen[len(TRAIN) :]

    first, second = recorded_orders(1)
    assert sorted(first) == sorted(second) == sorted(id(e) for e in TRAIN)
    assert first != second
    assert recorded_orders(2) == (first, second)


def test_learning_rate_schedules():
    def multiplier(kind):
        return [lr_multiplier(kind, 2, 10)(step) for step in range(10)]

    linear, cosine, constant = multiplier("linear"), multiplier("cosine"), multiplier("constant")
    for values in (linear, cosine, constant):
        assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warmup, then the full rate
        assert all(v > 0 for v in values)  # no step is wasted with a zero rate
    assert linear[3:] == pytest.approx([1 - k / 8 for k in range(1, 8)])
    assert cosine[6] == pytest.approx(0.5)
    assert constant[3:] == [1.0] * 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x batch 8 = 1 process x batch 16; accumulation 2 and a short last batch (201 = 12x16+9)."""
    steps, accumulation = 9, 2  # 7 steps per epoch: step 7 has 9 examples, split 4/5 between processes
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(_WORKER), str(tmp_path / "ddp"),
        "--batch-size", "8", "--accumulation", str(accumulation), "--max-steps", str(steps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parallel = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert parallel["num_processes"] == 2

    worker.main(
        [str(tmp_path / "single"), "--batch-size", "16", "--accumulation", str(accumulation), "--max-steps", str(steps)]
    )
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert single["num_processes"] == 1 and single["global_batch_size"] == parallel["global_batch_size"] == 32

    assert_same_tensors(
        load_file(tmp_path / "ddp" / "final.safetensors"),
        load_file(tmp_path / "single" / "final.safetensors"),
        atol=1e-5,
    )
    assert_same_tensors(
        load_file(tmp_path / "ddp" / "checkpoints" / f"step-{steps}" / "trainable.safetensors"),
        load_file(tmp_path / "single" / "checkpoints" / f"step-{steps}" / "trainable.safetensors"),
        atol=1e-5,
    )
    for a, b in zip(parallel["history"], single["history"], strict=True):
        assert a["step"] == b["step"]
        assert a["eval"]["accuracy"] == b["eval"]["accuracy"]
        assert a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], abs=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
