"""Experiment tracking (report_to / --report-to) through Accelerate's trackers: what is logged, where, and the errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

from peftkit import LoraConfig, PeftkitError, get_peft_model
from peftkit.train import tracking
from peftkit.train.loop import TrainingArguments, train
from peftkit.train.schedule import lr_multiplier

STEPS, EVAL_STEPS, BATCH = 6, 3, 4


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        label = int(torch.randint(0, 3, (1,), generator=generator))
        ids = torch.randint(3, 120, (10,), generator=generator)
        ids[0] = label  # a learnable signal in the first token
        rows.append({"input_ids": ids, "labels": torch.tensor(label)})
    return rows


def collate(batch):
    input_ids = torch.stack([row["input_ids"] for row in batch])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.stack([row["labels"] for row in batch])}


def train_tiny_lora(output_dir: Path, report_to: str):
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=STEPS, eval_steps=EVAL_STEPS, batch_size=BATCH,
                             learning_rate=1e-2, warmup_ratio=0.2, progress=False, report_to=report_to)
    return train(model, examples(40, seed=1), examples(12, seed=2), args, collate)


def check_logged(result, series: dict[str, list[tuple[int, float]]]) -> None:
    """series: metric name -> [(step, value)] as a tracker stored them; checks steps and values against the run."""
    steps = list(range(1, STEPS + 1))
    for name in ("train/loss", "train/learning_rate", "train/examples_per_second", "train/epoch", "train/peak_rss_mb"):
        assert [step for step, _ in series[name]] == steps, name
    losses = [value for _, value in series["train/loss"]]
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses)
    # The history's train_loss is the mean step loss since the previous record (evaluations at steps 3 and 6).
    assert [h["step"] for h in result.history] == [3, 6]
    assert sum(losses[:3]) / 3 == pytest.approx(result.history[0]["train_loss"], rel=1e-5)
    assert sum(losses[3:]) / 3 == pytest.approx(result.history[1]["train_loss"], rel=1e-5)
    schedule = lr_multiplier("linear", math.ceil(0.2 * STEPS), STEPS)
    assert [v for _, v in series["train/learning_rate"]] == pytest.approx([1e-2 * schedule(s - 1) for s in steps], rel=1e-5)
    assert [v for _, v in series["train/epoch"]] == pytest.approx([s * BATCH / 40 for s in steps], rel=1e-5)
    assert all(v > 0 for _, v in series["train/examples_per_second"])
    rss = [v for _, v in series["train/peak_rss_mb"]]
    assert all(10 < v <= result.peak_rss_mb + 1e-3 for v in rss) and rss == sorted(rss)  # a high-water mark
    for key in ("accuracy", "loss"):
        logged = series[f"eval/{key}"]
        assert [step for step, _ in logged] == [3, 6]
        assert [v for _, v in logged] == pytest.approx([h["eval"][key] for h in result.history], rel=1e-5)
    assert all(0 <= v <= 1 for _, v in series["eval/accuracy"])


def test_tensorboard_logs_loss_rate_accuracy_speed_and_memory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train_tiny_lora(tmp_path / "run", "tensorboard")
    log_dir = tmp_path / "run" / "logs" / "peftkit"
    assert list(log_dir.glob("events.out.tfevents.*")), "no event file under output_dir/logs/peftkit"
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    check_logged(result, series)
    assert "train/peak_cuda_memory_mb" not in series  # CPU run


def test_mlflow_logs_to_a_local_store_under_the_output_dir(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's own default would be ./mlflow.db
    result = train_tiny_lora(tmp_path / "run", "mlflow")
    store = tmp_path / "run" / "mlruns"
    assert store.is_dir() and not (tmp_path / "mlflow.db").exists()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run's setting does not outlive it

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when allowed
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name(tracking.PROJECT_NAME)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert float(run.data.params["learning_rate"]) == 1e-2 and run.data.params["report_to"] == "mlflow"
    series = {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
              for name in run.data.metrics}
    check_logged(result, series)


def test_mlflow_tracking_uri_from_the_environment_wins(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    train_tiny_lora(tmp_path / "run", "mlflow")
    assert elsewhere.is_dir() and not (tmp_path / "run" / "mlruns").exists()


def test_no_tracking_writes_no_logs(tmp_path):
    train_tiny_lora(tmp_path / "run", "none")
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "mlruns").exists()


@pytest.mark.parametrize("report_to, expected", [
    ("none", []), (None, []), ("", []), ("tensorboard", ["tensorboard"]), ("TensorBoard, mlflow", ["tensorboard", "mlflow"]),
    (["wandb", "wandb"], ["wandb"]),
])
def test_report_to_names_trackers(report_to, expected):
    assert tracking.trackers_of(report_to) == expected


def test_unknown_tracker_is_named(tmp_path):
    with pytest.raises(PeftkitError, match="--report-to neptune: unknown tracker; use one of tensorboard, mlflow, wandb or none"):
        TrainingArguments(output_dir=str(tmp_path), report_to="neptune").validate()


def test_uninstalled_tracker_fails_before_training_with_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_is_installed", lambda name: name != "tensorboard")
    message = "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
    with pytest.raises(PeftkitError, match=message):
        train_tiny_lora(tmp_path / "run", "tensorboard")
    assert not (tmp_path / "run").exists()  # nothing started

    # The jobs check it before loading anything: here the model does not even exist.
    from peftkit.cli import main

    assert main(["train", "--model", str(tmp_path / "no-such-model"), "--report-to", "tensorboard", "--no-progress",
                 "--output-dir", str(tmp_path / "cli")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"peftkit: error: {message}, or pip install 'peftkit[tensorboard]'")
    assert main(["train", "--model", str(tmp_path / "no-such-model"), "--task", "sst2,trec", "--report-to", "tensorboard",
                 "--no-progress", "--output-dir", str(tmp_path / "co")]) == 2
    assert message in capsys.readouterr().err
    monkeypatch.setattr(tracking, "_is_installed", lambda name: name != "mlflow")
    with pytest.raises(PeftkitError, match=r"--report-to mlflow needs the mlflow package: pip install mlflow-skinny \(or mlflow\)"):
        TrainingArguments(output_dir=str(tmp_path), report_to="tensorboard,mlflow").validate()


def _write_task(path: Path, words: list[str], count: int, validation: int = 0) -> Path:
    """A .jsonl task, or with `validation` rows a folder with train.jsonl and validation.jsonl."""
    rows = lambda n, offset: "\n".join(json.dumps({"text": f"{words[i % len(words)]} thing {offset + i}",  # noqa: E731
                                                   "label": f"c{i % len(words)}"}) for i in range(n))
    if not validation:
        path.with_suffix(".jsonl").write_text(rows(count, 0))
        return path.with_suffix(".jsonl")
    path.mkdir()
    (path / "train.jsonl").write_text(rows(count, 0))
    (path / "validation.jsonl").write_text(rows(validation, 1000))
    return path


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_cli_train_and_cotrain_report_to_tensorboard(tiny_model_folder, tmp_path, capsys):
    from peftkit.cli import main

    data = _write_task(tmp_path / "pos_neg", ["good great fine", "bad awful poor"], 24, validation=8)
    other = _write_task(tmp_path / "colors", ["red blue", "cat dog", "one two"], 16)
    run = tmp_path / "single"
    assert main(["train", "--model", str(tiny_model_folder), "--task", str(data), "--output-dir", str(run), "--max-steps", "3",
                 "--batch-size", "8", "--no-progress", "--report-to", "tensorboard"]) == 0
    series = _scalars(run / "logs" / "peftkit")
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3] and [s for s, _ in series["eval/accuracy"]] == [3]

    co = tmp_path / "co"
    assert main(["train", "--model", str(tiny_model_folder), "--task", f"{data},{other}", "--output-dir", str(co), "--epochs", "1",
                 "--batch-size", "8", "--no-progress", "--report-to", "tensorboard"]) == 0
    capsys.readouterr()
    series = _scalars(co / "logs" / "peftkit")
    # Each adapter's steps: pos_neg has 3 batches; colors (a single file: 3 of its 16 examples held out for
    # validation, one per class) 2, and its held-out split is evaluated at its last step.
    assert [s for s, _ in series["pos_neg/train/loss"]] == [1, 2, 3] and [s for s, _ in series["pos_neg/eval/accuracy"]] == [3]
    assert [s for s, _ in series["colors/eval/accuracy"]] == [2]
    assert [s for s, _ in series["colors/train/learning_rate"]] == [1, 2]
    assert series["train/examples_per_second"] and all(v > 0 for _, v in series["train/peak_rss_mb"])
