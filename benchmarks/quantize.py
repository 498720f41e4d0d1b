"""A quantized frozen base (QLoRA-style): base-weight memory, sst2 accuracy and LoRA step time.

    python benchmarks/quantize.py --nf4-run RUN --float-run RUN --json benchmarks/results/quantize.json

1. Memory: bytes the base weights hold in minilm and smollm2, float32 against NF4 (with and without
   double quantization) and int8 (blocks of 64), counted from the tensors themselves. "Quantized
   linear layers" are the nn.Linear layers quantize_model replaces (the same layers in every row, in
   float32 for the float32 row: codes + scales for the others); "heads left in float" are the linear
   layers it leaves alone (the classifier; smollm2's LM head, which is tied to the token embedding);
   "whole model" is every parameter and buffer once (tied weights once), embeddings and norms
   included, which stay float32.
2. Accuracy: LoRA on minilm / sst2 with every default, `peftkit train --method lora --model minilm
   --task sst2 --seed 0`, once with `--quantize nf4`. The runs are slow (minutes each), so they are
   given as run folders (`--nf4-run`, `--float-run`); a folder without job.json is trained here with
   the command above. Accuracy is the best evaluated epoch on the validation split (872 sentences).
3. Step time: one LoRA training step (the job's config: r=8, alpha 16, every linear layer) on minilm,
   batch 32 x 64 tokens, on a float32, an NF4 and an int8 base, timed in interleaved rounds in one
   process (median over rounds, ratios from the same run). Hugging Face peft's QLoRA needs
   bitsandbytes, which is not installed here (and is CUDA-first), so peft is timed on the float32 base only.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, peftkit_command, write_results_json  # noqa: E402
from lora_step_time import interleaved_step_times, step  # noqa: E402

from peftkit import zoo  # noqa: E402
from peftkit.quantize import QuantizedLinear, base_weight_bytes, quantize_model  # noqa: E402

FORMATS = {  # label -> quantize_model arguments (None: the float32 base)
    "float32": None,
    "nf4 + double quant": dict(scheme="nf4", block_size=64, double_quant=True),
    "nf4": dict(scheme="nf4", block_size=64, double_quant=False),
    "int8 + double quant": dict(scheme="int8", block_size=64, double_quant=True),
    "int8": dict(scheme="int8", block_size=64, double_quant=False),
}
TRAIN_COMMAND = ["train", "--method", "lora", "--model", "minilm", "--task", "sst2", "--seed", "0"]
TARGET_MEMORY_RATIO = 0.2
TARGET_ACCURACY_POINTS = 1.0


def mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def measure_memory() -> list[dict]:
    """Per model and format: bytes of the layers quantize_model replaces (in float32 for the float32
    row), of the linear layers it leaves in float (heads), and of the whole model."""
    rows = []
    loaders = {
        "minilm": (lambda: zoo.load_classifier("minilm", num_labels=2, seed=0)[0], "SEQ_CLS"),
        "smollm2": (lambda: zoo.load_causal_lm("smollm2")[0], "CAUSAL_LM"),
    }
    for model_name, (load, task_type) in loaders.items():
        original = load()
        reference = None
        for label, settings in FORMATS.items():
            model = copy.deepcopy(original)
            report = quantize_model(model, **(settings or FORMATS["nf4"]), task_type=task_type)
            sizes = base_weight_bytes(model)
            if settings is None:  # the float32 row: the same layers, as they were
                layers_bytes, sizes = report.float_bytes, base_weight_bytes(original)
            else:
                layers_bytes = report.quantized_bytes
            row = {"model": model_name, "format": label, "quantized_layers": len(report.quantized),
                   "left_in_float": sorted(report.skipped), "layers_bytes": layers_bytes,
                   "float_linear_bytes": sizes["float_linear"], "whole_model_bytes": sizes["whole_model"]}
            reference = reference or row
            row["layers_ratio"] = row["layers_bytes"] / reference["layers_bytes"]
            row["whole_model_ratio"] = row["whole_model_bytes"] / reference["whole_model_bytes"]
            rows.append(row)
            del model
        del original
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| model | base format | quantized linear layers | vs float32 | heads left in float | whole model | vs float32 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['format']} | {mib(row['layers_bytes'])} ({row['quantized_layers']} layers) | "
                     f"{row['layers_ratio']:.3f}x | {mib(row['float_linear_bytes'])} ({', '.join(row['left_in_float'])}) | "
                     f"{mib(row['whole_model_bytes'])} | {row['whole_model_ratio']:.3f}x |")
    return "\n".join(lines)


def read_or_train(folder: Path, quantize: str | None) -> dict:
    """The job.json and metrics.json of a run folder, training it first when it has none."""
    command = TRAIN_COMMAND + (["--quantize", quantize] if quantize else [])
    if not (folder / "job.json").is_file():
        print(f"training {folder}: peftkit {' '.join(command)}", flush=True)
        subprocess.run(peftkit_command() + command + ["--output-dir", str(folder), "--no-progress"], check=True)
    job = json.loads((folder / "job.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    run_info = json.loads((folder / "adapter" / "peftkit_run.json").read_text())
    return {"command": "peftkit " + " ".join(command), "run_folder": str(folder), "quantize": run_info.get("quantize"),
            "validation_accuracy": job["validation_accuracy"], "steps": job["steps"],
            "train_time_s": job["train_time_s"], "examples_per_second": job["examples_per_second"],
            "peak_rss_mb": job["peak_rss_mb"], "evaluations": metrics.get("evaluations", metrics.get("eval_history"))}


def measure_step_times(rounds: int, steps_per_round: int) -> dict[str, dict]:
    import peft

    import peftkit

    torch.manual_seed(0)
    original, _ = zoo.load_classifier("minilm", num_labels=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (32, 64), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.randint(0, 2, (32,), generator=generator)}
    config = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS")
    steps = {}
    for label in ("float32", "nf4 + double quant", "int8 + double quant", "peft, float32"):
        model = copy.deepcopy(original)
        if label == "peft, float32":
            model = peft.get_peft_model(model, peft.LoraConfig(**config))
        else:
            if FORMATS[label] is not None:
                quantize_model(model, **FORMATS[label], task_type="SEQ_CLS")
            torch.manual_seed(0)
            model = peftkit.get_peft_model(model, peftkit.LoraConfig(**config))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        steps[label] = lambda model=model, optimizer=optimizer: step(model, optimizer, batch)
    times = interleaved_step_times(steps, rounds, steps_per_round)
    base = statistics.median(times["float32"])
    return {label: {"median_s": statistics.median(values), "ratio_vs_float32": statistics.median(values) / base,
                    "rounds": values} for label, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nf4-run", default="/tmp/peftkit-quantize/sst2-nf4", help="run folder of the NF4 job (trained here if empty)")
    parser.add_argument("--float-run", default="/tmp/peftkit-quantize/sst2-float32", help="run folder of the float32 job")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["memory", "accuracy", "steps"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    results: dict = {
        "command": "python benchmarks/quantize.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "measured_at": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "load_average_before": load_average(), "torch": torch.__version__,
    }
    sections = []
    if "memory" not in args.skip:
        rows = measure_memory()
        results["memory"] = rows
        nf4 = {r["model"]: r for r in rows if r["format"] == "nf4 + double quant"}
        results["memory_targets"] = {
            model: {"nf4_linear_ratio": row["layers_ratio"], "nf4_whole_model_ratio": row["whole_model_ratio"],
                    "linear_pass": row["layers_ratio"] <= TARGET_MEMORY_RATIO,
                    "whole_model_pass": row["whole_model_ratio"] <= TARGET_MEMORY_RATIO} for model, row in nf4.items()}
        verdicts = [f"- {'PASS' if t['linear_pass'] else 'FAIL'}: {m} NF4 quantized linear layers {t['nf4_linear_ratio']:.3f}x <= "
                    f"{TARGET_MEMORY_RATIO}x; whole model {t['nf4_whole_model_ratio']:.3f}x "
                    f"({'within' if t['whole_model_pass'] else 'above'} {TARGET_MEMORY_RATIO}x: embeddings, norms and heads stay float32)"
                    for m, t in results["memory_targets"].items()]
        sections.append("Base-weight memory (tensor bytes; blocks of 64 values):\n\n" + memory_table(rows) + "\n\n" + "\n".join(verdicts))
    if "accuracy" not in args.skip:
        nf4_run = read_or_train(Path(args.nf4_run), "nf4")
        float_run = read_or_train(Path(args.float_run), None)
        gap = 100 * (float_run["validation_accuracy"] - nf4_run["validation_accuracy"])
        results["accuracy"] = {"nf4": nf4_run, "float32": float_run, "points_below_float32": gap,
                               "pass": gap <= TARGET_ACCURACY_POINTS}
        table = ["| base | validation accuracy | training time | examples/s | peak RSS | command |", "|---|---:|---:|---:|---:|---|"]
        for label, run in (("float32", float_run), ("NF4 + double quant", nf4_run)):
            table.append(f"| {label} | {100 * run['validation_accuracy']:.2f}% | {run['train_time_s']:.0f} s | "
                         f"{run['examples_per_second']:.1f} | {run['peak_rss_mb']:,.0f} MiB | `{run['command']}` |")
        sections.append("LoRA on minilm / sst2, every default (best evaluated epoch, 872 validation sentences):\n\n"
                        + "\n".join(table) + f"\n\n- {'PASS' if gap <= TARGET_ACCURACY_POINTS else 'FAIL'}: NF4 is "
                        f"{gap:+.2f} points from float32 (target: at most {TARGET_ACCURACY_POINTS} point below)")
    if "steps" not in args.skip:
        load_before = load_average()
        timing = measure_step_times(args.rounds, args.steps_per_round)
        results["step_time"] = {"load_average_before": load_before, "load_average_after": load_average(),
                                "rounds": args.rounds, "steps_per_round": args.steps_per_round, "variants": timing}
        table = ["| LoRA step on | median step | vs float32 base |", "|---|---:|---:|"]
        for label, figures in timing.items():
            table.append(f"| {label} | {1000 * figures['median_s']:.0f} ms | {figures['ratio_vs_float32']:.2f}x |")
        sections.append(f"LoRA training step, minilm, batch 32 x 64 tokens, r=8 on every linear layer; median of "
                        f"{args.rounds} interleaved rounds of {args.steps_per_round} steps; load average "
                        f"{load_before} before:\n\n" + "\n".join(table))
    markdown = "\n\n".join(sections)
    results["markdown"] = markdown
    print(markdown)
    if args.json:
        write_results_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
