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
   given as run folders (`--nf4-run`, `--float-run`; `--train-missing` trains an empty one here). The
   accuracy on the validation split (872 sentences) is compared at every step both runs evaluated;
   the verdict uses the best epoch of each finished run, or, while a run is still training, the last
   step both evaluated (reported as partial).
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, peftkit_command, write_results_json  # noqa: E402
from lora_step_time import interleaved_step_times, step  # noqa: E402

from peftkit import zoo  # noqa: E402
from peftkit.quantize import base_weight_bytes, quantize_model  # noqa: E402

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
    return f"{count / 2**20:,.1f} MiB" if count >= 2**20 / 10 else f"{count / 2**10:,.1f} KiB"


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
            if settings is None:  # the float32 row: the same layers and the whole model as they were
                layers_bytes, sizes["whole_model"] = report.float_bytes, base_weight_bytes(original)["whole_model"]
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


def read_run(folder: Path, quantize: str | None, train_missing: bool) -> dict | None:
    """What a run folder measured: the finished run (job.json, metrics.json), else the evaluations in
    its newest checkpoint (a run still training: `complete` False), else (with train_missing) the run
    trained here; None when there is nothing."""
    command = TRAIN_COMMAND + (["--quantize", quantize] if quantize else [])
    if not (folder / "job.json").is_file() and not list(folder.glob("checkpoints/step-*/state.json")) and train_missing:
        print(f"training {folder}: peftkit {' '.join(command)}", flush=True)
        subprocess.run(peftkit_command() + command + ["--output-dir", str(folder), "--no-progress"], check=True)
    run = {"command": "peftkit " + " ".join(command), "run_folder": str(folder)}
    if (folder / "job.json").is_file():
        job = json.loads((folder / "job.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        info = json.loads((folder / "adapter" / "peftkit_run.json").read_text())
        return {**run, "complete": True, "quantize": info.get("quantize"), "best_accuracy": job["validation_accuracy"],
                "evaluations": _evaluations(metrics["history"]), "steps": job["steps"],
                "train_time_s": job["train_time_s"], "examples_per_second": job["examples_per_second"],
                "peak_rss_mb": job["peak_rss_mb"]}
    states = sorted(folder.glob("checkpoints/step-*/state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return None
    progress = json.loads(states[-1].read_text())["progress"]
    return {**run, "complete": False, "best_accuracy": progress["best_eval"]["accuracy"],
            "evaluations": _evaluations(progress["history"]), "steps": progress["step"]}


def _evaluations(history: list[dict]) -> dict[int, float]:
    return {record["step"]: record["eval"]["accuracy"] for record in history if record.get("eval")}


def accuracy_section(nf4_run: dict, float_run: dict) -> tuple[dict, str]:
    """Compare at every step both runs evaluated; the verdict uses the last such step (the best
    epoch when both are finished)."""
    shared = sorted(set(nf4_run["evaluations"]) & set(float_run["evaluations"]))
    if not shared:
        return {"nf4": nf4_run, "float32": float_run}, "no evaluation step measured by both runs yet"
    both_complete = nf4_run["complete"] and float_run["complete"]
    if both_complete:
        gap = 100 * (float_run["best_accuracy"] - nf4_run["best_accuracy"])
        basis = "the best evaluated epoch of each finished run"
    else:
        step = shared[-1]
        gap = 100 * (float_run["evaluations"][step] - nf4_run["evaluations"][step])
        basis = f"step {step} (the NF4 run is {'finished' if nf4_run['complete'] else 'still training'}: partial)"
    passed = gap <= TARGET_ACCURACY_POINTS
    table = ["| step | float32 base | NF4 base | difference |", "|---:|---:|---:|---:|"]
    for step in shared:
        a, b = float_run["evaluations"][step], nf4_run["evaluations"][step]
        table.append(f"| {step} | {100 * a:.2f}% | {100 * b:.2f}% | {100 * (b - a):+.2f} points |")
    if both_complete:
        table.append(f"| best | {100 * float_run['best_accuracy']:.2f}% | {100 * nf4_run['best_accuracy']:.2f}% | "
                     f"{-gap:+.2f} points |")
    text = ("LoRA on minilm / sst2 with every default, validation accuracy (872 sentences) at each evaluation; "
            f"commands: `{float_run['command']}` and `{nf4_run['command']}`:\n\n" + "\n".join(table)
            + f"\n\n- {'PASS' if passed else 'FAIL'}: NF4 is {abs(gap):.2f} points {'below' if gap > 0 else 'above'} "
            f"float32 at {basis} (target: at most {TARGET_ACCURACY_POINTS} point below)")
    return {"nf4": nf4_run, "float32": float_run, "points_below_float32": gap, "basis": basis, "pass": passed}, text


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
    parser.add_argument("--nf4-run", default="/tmp/peftkit-quantize/sst2-nf4", help="run folder of the NF4 job")
    parser.add_argument("--float-run", default="/tmp/peftkit-quantize/sst2-float32", help="run folder of the float32 job")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["memory", "accuracy", "steps"])
    parser.add_argument("--keep", action="append", default=[], metavar="JSON",
                        help="also keep the sections of this earlier results file that this invocation skips")
    parser.add_argument("--train-missing", action="store_true", help="train a run folder that holds no run")
    parser.add_argument("--json", default=None, help="write the results here; sections skipped in this invocation "
                        "are kept from the file when it has them (each section records when it was measured)")
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
        nf4_run = read_run(Path(args.nf4_run), "nf4", args.train_missing)
        float_run = read_run(Path(args.float_run), None, args.train_missing)
        if nf4_run is None or float_run is None:
            raise SystemExit(f"no run measured in {args.nf4_run if nf4_run is None else args.float_run}; pass --train-missing")
        results["accuracy"], text = accuracy_section(nf4_run, float_run)
        sections.append(text)
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
    for name in ("memory", "accuracy", "step_time"):
        if name in results:
            results[name + "_measured"] = {"command": results["command"], "at": datetime.datetime.now().isoformat(timespec="minutes"),
                                           "load_average_before": results["load_average_before"]}
            results[name + "_markdown"] = sections.pop(0)
    earlier_files = [Path(p) for p in args.keep] + ([Path(args.json)] if args.json and Path(args.json).is_file() else [])
    for earlier_file in earlier_files:  # keep what this invocation did not measure
        earlier = json.loads(earlier_file.read_text())
        for name in ("memory", "memory_targets", "accuracy", "step_time"):
            if name not in results and name in earlier:
                results[name] = earlier[name]
                for suffix in ("_measured", "_markdown"):
                    if name + suffix in earlier:
                        results[name + suffix] = earlier[name + suffix]
    markdown = "\n\n".join(results[n + "_markdown"] for n in ("memory", "accuracy", "step_time") if n + "_markdown" in results)
    results["markdown"] = markdown
    print(markdown)
    if args.json:
        write_results_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
