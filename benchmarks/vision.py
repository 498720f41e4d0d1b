"""Vision: LoRA, full fine-tuning, the linear probe and BitFit on the real EfficientNet-Lite0 and real digits.

    python benchmarks/vision.py                                   # efficientnet-lite0 / mnist-5k, 1 epoch each
    python benchmarks/vision.py --max-steps 10 --max-eval-examples 100 --methods lora,full   # smoke
    python benchmarks/vision.py --json benchmarks/results/vision.json

Each method is trained by `peftkit compare` (one `peftkit train` child per method, one after another,
same data, steps, batch size, schedule and seed; each method's own default learning rate; the runs
are kept under --workdir, so a second call reuses finished ones), then scored by `peftkit eval`'s
function on the test split (1,500 digits, 150 per class; the validation split, 500 digits, picks
each run's best evaluation). Columns: test and validation accuracy, trainable share, median training
step time (forward, backward, optimizer), peak resident memory of the training process, and the size
of what the run saves (the adapter, or the whole model for full fine-tuning).

Targets (issue 17): LoRA within 2 points of full fine-tuning on test accuracy, with under 5% of the
parameters trainable. Prints a markdown table and PASS/FAIL per target; exits 0 either way (1 if a run fails).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from default_job import human_bytes, load_average, write_results_json  # noqa: E402

from peftkit.bench.compare import Budget, compare  # noqa: E402
from peftkit.train.image_job import evaluate_image_run  # noqa: E402

TARGET_GAP_POINTS = 2.0
TARGET_TRAINABLE_SHARE = 0.05
METHODS = "lora,full,linear_probe,bitfit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--task", default="mnist-5k")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--max-steps", type=int, default=94, help="optimizer steps per method (94 x 32 = 1 epoch of 3,000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the model's, 224)")
    parser.add_argument("--max-eval-examples", type=int, default=None, help="validation images scored during training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/bench-vision", help="where the runs and compare's reports go")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    train_args = ["--batch-size", str(args.batch_size)]
    if args.image_size:
        train_args += ["--image-size", str(args.image_size)]
    if args.max_eval_examples:
        train_args += ["--max-eval-examples", str(args.max_eval_examples)]
    workdir = Path(args.workdir)
    command = "python benchmarks/vision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command}: load average before {load_average()}", flush=True)
    rows = compare(args.model, args.task, args.methods.split(","), workdir, budget=Budget(max_steps=args.max_steps),
                   seed=args.seed, train_args=train_args, command=command, log=lambda line: print(line, flush=True))
    failed = [row for row in rows if row["status"] != "ok"]
    results = []
    for row in rows:
        if row["status"] != "ok":
            continue
        started = time.perf_counter()
        test = evaluate_image_run(Path(row["run_dir"]) / "adapter", split="test")
        results.append({
            "method": row["method"], "test_accuracy": test["accuracy"], "test_examples": test["examples"],
            "validation_accuracy": row["accuracy"], "trainable_parameters": row["trainable_parameters"],
            "total_parameters": row["total_parameters"], "trainable_share": row["trainable_share"],
            "median_step_time_s": row["median_step_time_s"], "peak_rss_mib": row["peak_rss_mib"],
            "saved_bytes": row["adapter_bytes"], "steps": row["steps"], "learning_rate": row["learning_rate"],
            "train_time_s": row["train_time_s"], "process_wall_time_s": row["wall_time_s"],
            "test_eval_time_s": time.perf_counter() - started, "command": row["command"],
        })
    lines = ["| method | test accuracy | validation accuracy | trainable | step time | peak RSS | saved |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {100 * r['test_accuracy']:.2f}% | {100 * r['validation_accuracy']:.2f}% | "
                     f"{r['trainable_parameters']:,} ({100 * r['trainable_share']:.2f}%) | "
                     f"{r['median_step_time_s']:.2f} s | {r['peak_rss_mib']:,.0f} MiB | {human_bytes(r['saved_bytes'])} |")
    markdown = "\n".join(lines)
    print(markdown)
    by_method = {r["method"]: r for r in results}
    verdicts = {}
    if "lora" in by_method and "full" in by_method:
        gap = 100 * (by_method["full"]["test_accuracy"] - by_method["lora"]["test_accuracy"])
        verdicts["lora_within_2_points_of_full"] = {"gap_points": gap, "pass": gap <= TARGET_GAP_POINTS}
        print(f"LoRA vs full fine-tuning: {gap:+.2f} points (target: at most {TARGET_GAP_POINTS}): "
              f"{'PASS' if gap <= TARGET_GAP_POINTS else 'FAIL'}")
    if "lora" in by_method:
        share = by_method["lora"]["trainable_share"]
        verdicts["lora_under_5_percent_trainable"] = {"share": share, "pass": share < TARGET_TRAINABLE_SHARE}
        print(f"LoRA trainable share: {100 * share:.2f}% (target: under 5%): {'PASS' if share < TARGET_TRAINABLE_SHARE else 'FAIL'}")
    if args.json:
        write_results_json(args.json, {"command": command, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                       "model": args.model, "task": args.task, "budget_steps": args.max_steps,
                                       "batch_size": args.batch_size, "results": results, "targets": verdicts,
                                       "failed": [{"method": r["method"], "reason": r.get("reason")} for r in failed],
                                       "markdown": markdown, "load_average_after": load_average()})
    for row in failed:
        print(f"{row['method']}: {row['status']}: {row.get('reason')}", file=sys.stderr)
    return 1 if any(row["status"] == "failed" for row in failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
