"""Interference table: four task adapters, each task's accuracy with its own adapter, with merged ones, co-trained.

    python benchmarks/interference.py --json benchmarks/results/interference.json

Adapters: LoRA (the job's defaults: r=8 on every linear layer, alpha 16) on minilm, one per task
(sst2, trec, cr, mr), trained by `peftkit train --method lora --model minilm --task T --output-dir
RUNS/T --no-progress --seed 0`; a missing one is trained here with exactly that command.

For each merge method the four adapters are combined once (peftkit.merging.combine_adapters: delta
space, then truncated SVD to the default rank, the sum of the input ranks = 32) and each task is
evaluated with the merged LoRA plus that task's own classification head (heads are task-specific:
a merge has none of its own). Co-trained adapters are read from --cotrain-dir/<task> when present.
Accuracy is on each task's validation split, computed by peftkit.train.job.evaluate_run, the code
behind `peftkit eval`. The SVD step's relative reconstruction error (Frobenius, all layers) is shown
per method. Prints a markdown table and writes the results JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, peftkit_command, write_results_json  # noqa: E402

from peftkit.merging import combine_adapters, resolve_adapter_folder, save_combined  # noqa: E402
from peftkit.train.job import evaluate_run  # noqa: E402

DEFAULT_TASKS = "sst2,trec,cr,mr"
# (column, method, weight of each adapter, rank): task arithmetic and TIES at lambda = 1 (TIES's disjoint mean
# already averages where updates agree), the plain mean (weights 1/4) as a second linear column, and TIES /
# DARE-TIES once more at full rank (no SVD truncation), to separate the merge from the factoring step.
FULL_RANK = 10**9  # lowered to the largest layer's full rank by combine_adapters
VARIANTS = [
    ("linear", "linear", 1.0, None),
    ("ties", "ties", 1.0, None),
    ("dare_linear", "dare_linear", 1.0, None),
    ("dare_ties", "dare_ties", 1.0, None),
    ("magnitude_prune", "magnitude_prune", 1.0, None),
    ("linear (mean)", "linear", 0.25, None),
    ("ties, full rank", "ties", 1.0, FULL_RANK),
    ("dare_ties, full rank", "dare_ties", 1.0, FULL_RANK),
]


def train_missing(runs: Path, task: str) -> None:
    if (runs / task / "adapter" / "adapter_config.json").is_file() and (runs / task / "metrics.json").is_file():
        return
    command = peftkit_command() + ["train", "--method", "lora", "--model", "minilm", "--task", task,
                                   "--output-dir", str(runs / task), "--no-progress", "--seed", "0"]
    print(f"training the missing {task} adapter: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def accuracy(folder: Path, max_examples: int | None) -> float:
    return evaluate_run(folder, split="validation", max_examples=max_examples)["accuracy"]


def markdown(results: dict, columns: list[str], cotrained: bool, tasks: list[str]) -> str:
    header = ["task", "own adapter", *[f"merged: {c}" for c in columns], "co-trained"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for task in tasks:
        row = results["accuracy"][task]
        cells = [task, f"{100 * row['own']:.2f}"]
        for column in columns:
            value, delta = row[column], 100 * (row[column] - row["own"])
            cells.append(f"{100 * value:.2f} ({delta:+.1f})")
        co = row.get("co-trained")
        cells.append("not run" if co is None else f"{100 * co:.2f} ({100 * (co - row['own']):+.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    means = ["mean", f"{100 * sum(results['accuracy'][t]['own'] for t in tasks) / len(tasks):.2f}"]
    for column in columns:
        means.append(f"{100 * sum(results['accuracy'][t][column] for t in tasks) / len(tasks):.2f}")
    means.append(f"{100 * sum(results['accuracy'][t]['co-trained'] for t in tasks) / len(tasks):.2f}" if cotrained else "not run")
    lines.append("| " + " | ".join(means) + " |")
    errors = ["SVD error (overall / largest layer)", ""]
    for column in columns:
        e = results["reconstruction"][column]
        errors.append(f"{e['overall_relative_error']:.3f} / {e['max_relative_error']:.3f}")
    errors.append("")
    lines.append("| " + " | ".join(errors) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated tasks (the table's rows)")
    parser.add_argument("--runs-dir", default="/work/bench-tasks", help="folder of the per-task LoRA runs (RUNS/<task>)")
    parser.add_argument("--cotrain-dir", default="/work/bench-cotrain", help="folder of co-trained per-task runs")
    parser.add_argument("--workdir", default="/work/bench-merging", help="where the merged adapters are written")
    parser.add_argument("--density", type=float, default=0.5, help="TIES / DARE / pruning: fraction of values kept")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank of the merges (default: sum of input ranks)")
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded machine more threads make SVD and matmuls far slower)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    started = time.perf_counter()
    runs, workdir = Path(args.runs_dir), Path(args.workdir)
    for task in tasks:
        train_missing(runs, task)
    sources = [runs / task for task in tasks]
    results: dict = {"accuracy": {t: {} for t in tasks}, "reconstruction": {}}
    for task in tasks:
        results["accuracy"][task]["own"] = accuracy(resolve_adapter_folder(runs / task), args.max_eval_examples)
        print(f"{task}: own adapter {100 * results['accuracy'][task]['own']:.2f}%", flush=True)

    cotrain = Path(args.cotrain_dir)
    cotrained = all((cotrain / t).exists() for t in tasks)

    def save(columns: list[str], complete: bool) -> str:
        table = markdown(results, columns, cotrained and complete, tasks)
        if args.json:
            command = "python benchmarks/interference.py " + " ".join(sys.argv[1:])
            note = (f"Each cell: validation accuracy (%) and, in brackets, points against the task's own adapter. Merged "
                    f"columns: the {len(tasks)} LoRA adapters (r=8 each) combined in delta space and factored back to LoRA "
                    f"r={results['reconstruction'][columns[0]]['rank']} by truncated SVD ('full rank' columns: exact), "
                    f"evaluated with the task's own head; weights 1 each (task arithmetic / TIES lambda = 1) except "
                    f"'linear (mean)' (1/{len(tasks)} each); density {args.density} for TIES, DARE and pruning; DARE seed 0. "
                    + ("Co-trained: each task's adapter from one `peftkit train --method lora --model minilm --task "
                       "sst2,trec,cr,mr --seed 0` run (benchmarks/cotrain.py), evaluated the same way." if cotrained
                       else "Co-trained adapters: not run yet (no run folders in " + str(cotrain) + ").")
                    + ("" if complete else " INCOMPLETE: the run was still going when this was written."))
            write_results_json(args.json, {
                "command": command, "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "markdown": table, "note": note, "complete": complete, "tasks": tasks, "runs_dir": str(runs),
                "cotrain_dir": str(cotrain), "cotrained_present": cotrained, "density": args.density, **results,
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                            "load_average_at_end": load_average()},
                "wall_time_s": time.perf_counter() - started,
            })
        return table

    columns = []
    for column, method, weight, rank in VARIANTS:
        density = args.density if method != "linear" else None
        combined = combine_adapters(sources, [weight] * len(sources), method=method, density=density,
                                    rank=rank or args.rank, seed=0)
        results["reconstruction"][column] = {
            "method": method, "weights": combined.weights, "density": density, "rank": combined.config.r,
            "overall_relative_error": combined.overall_relative_error, "max_relative_error": combined.max_relative_error,
        }
        for index, task in enumerate(tasks):
            folder = workdir / "".join(c if c.isalnum() else "_" for c in column) / task
            if folder.exists():
                shutil.rmtree(folder)
            save_combined(combined.with_head(index), folder)
            results["accuracy"][task][column] = accuracy(folder, args.max_eval_examples)
            if rank == FULL_RANK:
                shutil.rmtree(folder)  # r=384 on every layer: ~60 MB a folder, not worth keeping
        columns.append(column)
        print(f"{column}: " + ", ".join(f"{t} {100 * results['accuracy'][t][column]:.2f}%" for t in tasks)
              + f"; SVD error {combined.overall_relative_error:.3f}", flush=True)
        save(columns, complete=False)

    for task in tasks:
        results["accuracy"][task]["co-trained"] = (
            accuracy(resolve_adapter_folder(cotrain / task), args.max_eval_examples) if cotrained else None)
    print(save(columns, complete=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
