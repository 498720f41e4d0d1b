"""`peftkit compare`: methods trained under one budget, reports written, finished runs kept, failures contained."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from peftkit import zoo
from peftkit.bench.compare import Budget, last_error_line, skip_reason
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.train.loop import TrainingArguments, train

_WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("peftkit_tests_ddp_worker_compare", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif("minilm" not in zoo.list_models(), reason="the tiny model uses minilm's tokenizer")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A user task folder: train.jsonl and validation.jsonl."""
    folder = tmp_path_factory.mktemp("task")
    for split, count in (("train", 32), ("validation", 16)):
        rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i}", "label": i % 2} for i in range(count)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def compared(tiny_model_folder, tiny_task, tmp_path_factory):
    """One comparison, then again for LoRA only: (output folder, exit code of each, LoRA's file times after the first)."""
    output = tmp_path_factory.mktemp("compare") / "out"
    # "--r 4" fits LoRA; for BitFit the child run fails ("--r does not apply"), which must not stop the
    # others. The default bottleneck (64) does not fit a 32-wide model: skipped before launching, as is "magic".
    command = ["compare", "--model", str(tiny_model_folder), "--task", str(tiny_task), "--max-steps", "2",
               "--train-args", "--r 4 --batch-size 8", "--no-progress"]
    # A run folder left by an interrupted run is started over, not taken as finished.
    (output / "runs" / "lora").mkdir(parents=True)
    (output / "runs" / "lora" / "left-over").write_text("from an interrupted run")
    first = main([*command, "--output-dir", str(output), "--methods", "lora,bitfit,adapter,magic"])
    rows = json.loads((output / "results.json").read_text())["rows"]
    stamps = {row["method"]: _stamps(Path(row["run_dir"])) for row in rows if row["status"] == "ok"}
    # The same run for LoRA, reports elsewhere: kept, not trained again.
    second = main([*command, "--output-dir", str(output / "second"), "--runs-dir", str(output / "runs"), "--methods", "lora"])
    return output, first, second, stamps


def _stamps(run_dir: Path) -> dict[str, int]:
    return {name: (run_dir / name).stat().st_mtime_ns for name in ("compare_row.json", "job.json", "metrics.json")}


def test_each_method_gets_a_row_with_its_status(compared):
    output, first, _, _ = compared
    assert first == 1  # one run failed
    rows = {row["method"]: row for row in json.loads((output / "results.json").read_text())["rows"]}
    assert list(rows) == ["lora", "bitfit", "adapter", "magic"]  # the order asked for
    assert rows["lora"]["status"] == "ok"
    assert rows["bitfit"]["status"] == "failed"
    assert "--r does not apply to --method bitfit" in rows["bitfit"]["reason"] and "exit code 2" in rows["bitfit"]["reason"]
    assert rows["adapter"]["status"] == "skipped" and "bottleneck size 64 is not smaller than the hidden size 32" in rows["adapter"]["reason"]
    assert rows["magic"]["status"] == "skipped" and "unknown method 'magic'" in rows["magic"]["reason"]
    assert "lora" in rows["magic"]["reason"] and "prefix" in rows["magic"]["reason"]  # the known methods are listed
    assert not (output / "runs" / "lora" / "left-over").exists()


def test_rows_carry_their_measurements_and_how(compared, tiny_model_folder):
    output = compared[0]
    rows = {row["method"]: row for row in json.loads((output / "results.json").read_text())["rows"]}
    method = "lora"
    row = rows[method]
    job = json.loads((Path(row["run_dir"]) / "job.json").read_text())
    metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
    assert row["steps"] == metrics["steps"] == 2
    assert row["accuracy"] == job["validation_accuracy"] and 0 <= row["accuracy"] <= 1
    assert row["trainable_parameters"] == job["trainable_parameters"]
    assert row["trainable_share"] == pytest.approx(job["trainable_parameters"] / job["total_parameters"])
    assert row["adapter_bytes"] == (Path(row["run_dir"]) / "adapter" / "adapter_model.safetensors").stat().st_size
    assert row["median_step_time_s"] == metrics["median_step_time_s"] > 0
    # RSS of a whole child process that imported torch: far above zero, far below the machine.
    assert 50 < row["peak_rss_mib"] < 16_000
    assert row["config"]["r"] == 4  # --train-args reached the run
    assert row["learning_rate"] == 1e-3 and row["seed"] == 0 and row["budget"] == "2 steps"
    assert row["command"].startswith(f"peftkit train --method {method} --model {tiny_model_folder}")
    assert "--max-steps 2" in row["command"] and "--r 4" in row["command"]
    context = row["context"]
    assert context["cores"] >= 1 and context["torch"] == torch.__version__ and context["python"]
    assert context["peftkit"] and context["cpu"]


def test_second_run_keeps_finished_rows(compared):
    output, _, second, stamps = compared
    assert second == 0
    rows = json.loads((output / "second" / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["lora"] and list(stamps) == ["lora"]
    assert rows[0]["kept_from_earlier_run"] is True and rows[0]["status"] == "ok"
    assert _stamps(Path(rows[0]["run_dir"])) == stamps["lora"]  # not trained again


def test_reports_markdown_csv_html_and_plots(compared):
    output = compared[0]
    for name in ("results.md", "results.csv", "results.json", "report.html", "compare.png", "accuracy_vs_trainable_share.png",
                 "peak_memory.png", "time_per_step.png", "adapter_size.png"):
        assert (output / name).is_file() and (output / name).stat().st_size > 0, name
    for name in ("compare.png", "peak_memory.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["method"]: row for row in json.loads((output / "results.json").read_text())["rows"]}

    with open(output / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table] == ["lora", "bitfit", "adapter", "magic"]
    assert float(table[0]["accuracy"]) == rows["lora"]["accuracy"]
    assert int(table[0]["trainable_parameters"]) == rows["lora"]["trainable_parameters"]
    assert table[1]["status"] == "failed" and table[1]["accuracy"] == ""
    assert table[0]["torch"] == torch.__version__ and json.loads(table[0]["config"])["r"] == 4

    markdown = (output / "results.md").read_text()
    lora_line = next(line for line in markdown.splitlines() if line.startswith("| lora |"))
    assert f"{100 * rows['lora']['accuracy']:.2f}%" in lora_line and f"{rows['lora']['trainable_parameters']:,d}" in lora_line
    assert "| magic | skipped: unknown method 'magic'" in markdown
    assert "peak RSS" in markdown and "![" in markdown and "(compare.png)" in markdown

    page = (output / "report.html").read_text()
    assert "<table>" in page and "<td class=\"\">lora</td>" in page and "failed: " in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    import base64

    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    assert rows["lora"]["context"]["cpu"] in page


def test_skip_reason_names_what_does_not_fit(tmp_path):
    from transformers import DistilBertConfig

    folder = tmp_path / "distilbert"
    DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=2, vocab_size=100).save_pretrained(folder)
    assert "key/value caches" in skip_reason("prefix", str(folder))  # DistilBERT takes no past_key_values
    assert "matched no module" in skip_reason("ia3", str(folder))
    assert skip_reason("lora", str(folder)) is None
    with pytest.raises(PeftkitError, match="unknown model"):
        skip_reason("lora", "no-such-model")


def test_last_error_line_finds_the_message():
    traceback = "train: 50%|####  | 1/2 [00:01<00:01]\rTraceback (most recent call last):\n  File \"x.py\", line 1\n" \
                "RuntimeError: shapes (2, 3) and (4, 5) do not fit\n"
    assert last_error_line(traceback, 1) == "RuntimeError: shapes (2, 3) and (4, 5) do not fit (exit code 1)"
    assert last_error_line("loading\npeftkit: error: no text\nbye\n", 2) == "peftkit: error: no text (exit code 2)"
    assert last_error_line("step 3\n", -9).startswith("killed by SIGKILL (out of memory?)")


def test_bad_budget_and_clashing_train_args_are_clear(tmp_path, capsys):
    with pytest.raises(PeftkitError, match="--max-steps must be a whole number"):
        Budget(max_steps=0)
    assert main(["compare", "--max-minutes", "-1", "--output-dir", str(tmp_path)]) == 2
    assert "--max-minutes must be > 0" in capsys.readouterr().err
    assert main(["compare", "--train-args", "--epochs 3", "--output-dir", str(tmp_path)]) == 2
    assert "--train-args may not set --epochs" in capsys.readouterr().err
    assert main(["compare", "--task", "no-such-task", "--output-dir", str(tmp_path)]) == 2
    assert "Built-in tasks are" in capsys.readouterr().err


def test_time_budget_stops_after_the_step_that_crosses_it_then_evaluates_and_saves(tmp_path):
    model = worker.TinyClassifier(dropout=0.0)
    examples, evaluation = worker.make_examples(64, seed=1), worker.make_examples(16, seed=2, split="eval")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), epochs=3, batch_size=8, max_time_s=1e-9, progress=False)
    result = train(model, examples, evaluation, args, worker.collate)
    assert result.steps == 1 and result.stopped_by_time_limit
    assert result.history[-1]["step"] == 1 and result.history[-1]["eval"] is not None  # evaluated at the end
    assert (tmp_path / "run" / "checkpoints").is_dir() and result.median_step_time_s > 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["stopped_by_time_limit"] is True and saved["median_step_time_s"] == result.median_step_time_s

    untimed = train(worker.TinyClassifier(dropout=0.0), examples, evaluation,
                    TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=3, batch_size=8, progress=False), worker.collate)
    assert untimed.steps == 3 and not untimed.stopped_by_time_limit
    with pytest.raises(PeftkitError, match="max_time_s must be > 0"):
        TrainingArguments(output_dir="x", max_time_s=0).validate()


def test_run_measured_logs_and_echoes_the_child_output(tmp_path, capfd):
    import sys

    from peftkit.bench.compare import run_measured

    script = "import sys; sys.stderr.write('step 1\\rstep 2\\n'); print('done'); raise SystemExit(3)"
    wall, peak_mib, code = run_measured([sys.executable, "-c", script], tmp_path / "child.log", echo=True)
    assert code == 3 and wall > 0 and peak_mib > 1
    assert (tmp_path / "child.log").read_bytes() == b"step 1\rstep 2\ndone\n"  # bar redraws kept as they came
    echoed = capfd.readouterr().err
    assert "step 1" in echoed and "step 2" in echoed and "done" in echoed
    _, _, code = run_measured([sys.executable, "-c", "print('quiet')"], tmp_path / "quiet.log")
    assert code == 0 and (tmp_path / "quiet.log").read_text() == "quiet\n" and capfd.readouterr().err == ""
