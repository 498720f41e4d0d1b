"""Instruction tuning of a real chat model: exact match on trec-instruct, tuned against untuned.

    python benchmarks/instruct.py                                   # LoRA on smollm2 / trec-instruct
    python benchmarks/instruct.py --methods lora,dora,ia3,prompt,prefix --json benchmarks/results/instruct.json

Each method runs as the commands a user types, in subprocesses:

    peftkit train --model smollm2 --task trec-instruct --method NAME --max-train-examples N --epochs E
    peftkit eval RUN/adapter --split test --json      # greedy answers, exact match, beside the untuned model

Training time is the job's own (model loading excluded, as reported in job.json); the wall time of
the whole command and its peak RSS (kernel high-water mark) are reported too. Exact match is on the
whole trec test split (500 questions): the answer, normalised (first line, lower case, trailing
punctuation removed), must equal the question type word. The untuned model answers the same prompts.

Targets (issue 4): LoRA at least +40 points over the untuned model, after a training run of under 20
minutes on this machine. Finished runs under --workdir are reused (delete the folder to measure anew);
each row is written to --json as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import human_bytes, peftkit_command, run_measured, write_results_json  # noqa: E402

TARGET_POINTS = 40.0
TARGET_TRAIN_MINUTES = 20.0


def run_method(method: str, args, workdir: Path) -> dict:
    run_dir = workdir / method
    train = peftkit_command() + [
        "train", "--model", args.model, "--task", args.task, "--method", method, "--output-dir", str(run_dir),
        "--epochs", str(args.epochs), "--max-train-examples", str(args.train_examples), "--seed", str(args.seed),
        "--no-progress",
    ] + (["--lr", str(args.lr)] if args.lr else [])
    evaluate = peftkit_command() + ["eval", str(run_dir / "adapter"), "--split", args.split, "--json"] + (
        ["--max-examples", str(args.eval_examples)] if args.eval_examples else [])
    record = run_dir / "benchmark_run.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("train_command") == train[1:] and saved.get("eval_command") == evaluate[1:]:
            print(f"{method}: reusing {run_dir}", flush=True)
            return saved
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{method}: {' '.join(train)}", flush=True)
    wall, peak_mb, code = run_measured(train, workdir / f"{method}-train.log", cwd=workdir)
    if code != 0:
        tail = (workdir / f"{method}-train.log").read_text(errors="replace").strip().splitlines()[-3:]
        return {"method": method, "failed": True, "error": " | ".join(tail)}
    print(f"{method}: {' '.join(evaluate)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(evaluate, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        return {"method": method, "failed": True, "error": result.stderr.strip().splitlines()[-1:]}
    scores = json.loads(result.stdout)
    job = json.loads((run_dir / "job.json").read_text())
    row = {
        "method": method, "failed": False, "train_command": train[1:], "eval_command": evaluate[1:],
        "tuned_exact_match": scores["tuned"]["accuracy"], "base_exact_match": scores["base"]["accuracy"],
        "tuned_invalid": scores["tuned"]["invalid"], "base_invalid": scores["base"]["invalid"],
        "eval_examples": scores["examples"], "eval_seconds": time.perf_counter() - started,
        "samples": scores["tuned"]["samples"], "base_samples": scores["base"]["samples"],
        "train_time_s": job["train_time_s"], "wall_s": wall, "peak_rss_mb": peak_mb, "steps": job["steps"],
        "trainable_parameters": job["trainable_parameters"], "trainable_share": job["trainable_share"],
        "adapter_bytes": job["adapter_bytes"], "validation_loss": job["validation_loss"],
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
    record.write_text(json.dumps(row, indent=2))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="trec-instruct")
    parser.add_argument("--split", default="test")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--train-examples", type=int, default=1600, help="training conversations (the first N)")
    parser.add_argument("--eval-examples", type=int, default=None, help="default: the whole split")
    parser.add_argument("--lr", type=float, default=None, help="default: each method's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/peftkit-bench-instruct")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    command = "python benchmarks/instruct.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        rows.append(run_method(method, args, workdir))
        if args.json:
            write_results_json(args.json, {"command": command, "measured_at": time.strftime("%Y-%m-%d"),
                                    "markdown": "(incomplete: the benchmark is still running)", "rows": rows})
    lines = [
        f"{args.model} / {args.task}: `peftkit train` on the first {args.train_examples} training conversations for "
        f"{args.epochs:g} epoch(s) (batch 8, each method's default config and learning rate), then `peftkit eval` "
        f"on the {args.split} split: greedy answers, exact match after normalisation, the untuned model on the "
        f"same prompts. {os.cpu_count()} CPUs ({platform.machine()}); training time excludes model loading.",
        "",
        "| method | exact match (tuned) | untuned | gain | answers outside the label set (tuned / untuned) | "
        "training time | steps | trainable params | adapter file | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for row in rows:
        if row["failed"]:
            lines.append(f"| {row['method']} | failed: {str(row['error'])[:80]} | | | | | | | | |")
            verdicts.append(f"- FAIL: {row['method']} did not finish")
            continue
        gain = 100 * (row["tuned_exact_match"] - row["base_exact_match"])
        minutes = row["train_time_s"] / 60
        lines.append(
            f"| {row['method']} | {100 * row['tuned_exact_match']:.1f}% | {100 * row['base_exact_match']:.1f}% | "
            f"{gain:+.1f} | {row['tuned_invalid']} / {row['base_invalid']} | {minutes:.1f} min | {row['steps']} | "
            f"{row['trainable_parameters']:,d} ({100 * row['trainable_share']:.2f}%) | {human_bytes(row['adapter_bytes'])} | "
            f"{row['peak_rss_mb']:,.0f} MiB |"
        )
        if row["method"] == "lora":
            verdicts.append(f"- {'PASS' if gain >= TARGET_POINTS else 'FAIL'}: LoRA gains {gain:+.1f} points over the "
                            f"untuned model (target: at least +{TARGET_POINTS:g})")
            verdicts.append(f"- {'PASS' if minutes < TARGET_TRAIN_MINUTES else 'FAIL'}: LoRA trained in {minutes:.1f} "
                            f"minutes (target: under {TARGET_TRAIN_MINUTES:g})")
    markdown = "\n".join(lines + [""] + verdicts)
    print("\n" + markdown)
    if args.json:
        write_results_json(args.json, {"command": command, "measured_at": time.strftime("%Y-%m-%d"), "markdown": markdown,
                                "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
