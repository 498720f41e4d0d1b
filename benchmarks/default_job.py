"""The default job, measured: run `peftkit train` with no arguments and check it against its targets.

    python benchmarks/default_job.py                      # in a fresh temporary folder
    python benchmarks/default_job.py --workdir /tmp/dj --json benchmarks/results/default_job.json

The command is run exactly as a user types it (`peftkit train`, no arguments) in a subprocess whose
working folder is `--workdir` (so the run lands in `<workdir>/runs/minilm-sst2-lora`). Wall time is
the whole process, from start to exit (imports, model and data loading, training, evaluation,
saving); peak memory is the process's resident-set high-water mark from the kernel (`wait4`). The
rest comes from the run's own `job.json` and `metrics.json`.

Targets (the issue): under 10 minutes wall time on a 2-core CPU machine, and at least 85% accuracy
on the sst2 validation split (872 sentences). The accuracy is that of the best evaluated epoch, the
weights the run keeps (model selection on the validation split, as the training loop does).
Prints a markdown table row and PASS/FAIL per target; exits 0 either way (1 only if the job fails).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# The measuring is the library's (peftkit compare uses it too); the other benchmark scripts import it from here.
from peftkit.bench.compare import peftkit_command, run_measured  # noqa: F401
from peftkit.bench.report import human_bytes  # noqa: F401

TARGET_WALL_TIME_S = 600.0
TARGET_ACCURACY = 0.85
RUN_FOLDER = Path("runs") / "minilm-sst2-lora"  # where `peftkit train` puts the default run


def write_results_json(path: str | os.PathLike, payload: dict) -> None:
    """Write a benchmark's results atomically: a temporary file beside the target, then os.replace."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None,
                        help="working folder for the run (default: a new temporary folder, removed afterwards)")
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)

    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="peftkit-default-job-")
        workdir = Path(temporary.name)
    else:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if (workdir / RUN_FOLDER).exists():
            print(f"{workdir / RUN_FOLDER} exists already; give an empty --workdir", file=sys.stderr)
            return 2
    command = peftkit_command() + ["train"]
    log_path = workdir / "train.log"
    load_before = load_average()
    print(f"running `peftkit train` in {workdir} (log: {log_path}); load average before: {load_before}", flush=True)
    wall, peak_rss_mb, code = run_measured(command, log_path, cwd=workdir)
    load_after = load_average()
    if code != 0:
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        print(f"`peftkit train` failed with exit code {code}", file=sys.stderr)
        return 1

    run = workdir / RUN_FOLDER
    job = json.loads((run / "job.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = [
        {"epoch": h["epoch"], "step": h["step"], "accuracy": h["eval"]["accuracy"]}
        for h in metrics["history"] if h.get("eval")
    ]
    accuracy = job["validation_accuracy"]
    result = {
        "job_command": "peftkit train",
        "model": job["model"],
        "task": job["task"],
        "method": job["method"],
        "validation_accuracy": accuracy,
        "best_step": metrics["best_step"],
        "evaluations": epochs,
        "trainable_parameters": job["trainable_parameters"],
        "total_parameters": job["total_parameters"],
        "trainable_share": job["trainable_share"],
        "adapter_bytes": job["adapter_bytes"],
        "steps": job["steps"],
        "process_wall_time_s": wall,
        "job_wall_time_s": job["wall_time_s"],
        "train_time_s": job["train_time_s"],
        "examples_per_second": job["examples_per_second"],
        "peak_rss_mb": peak_rss_mb,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "targets": {
            "wall_time_under_s": TARGET_WALL_TIME_S,
            "wall_time_pass": wall < TARGET_WALL_TIME_S,
            "accuracy_at_least": TARGET_ACCURACY,
            "accuracy_pass": accuracy is not None and accuracy >= TARGET_ACCURACY,
        },
    }

    targets = result["targets"]
    lines = [
        f"{job['method']} on {job['model']} / {job['task']} with every default ({job['steps']} steps); accuracy on the "
        f"{job['task']} validation split at the best evaluated epoch (the weights the run keeps); "
        f"wall time and peak RSS of the whole process; {os.cpu_count()} CPUs, load average before {load_before}.",
        "",
        "| job | validation accuracy | trainable parameters | trainable share | adapter file | wall time | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| `peftkit train` | {100 * accuracy:.2f}% | {job['trainable_parameters']:,d} of {job['total_parameters']:,d} "
        f"| {100 * job['trainable_share']:.2f}% | {human_bytes(job['adapter_bytes'])} "
        f"| {wall:.0f} s ({wall / 60:.1f} min) | {peak_rss_mb:,.0f} MiB |",
        "",
        "Evaluations: " + ", ".join(f"step {e['step']} {100 * e['accuracy']:.2f}%" for e in epochs)
        + f"; kept: step {metrics['best_step']}.",
        "",
        f"- {'PASS' if targets['wall_time_pass'] else 'FAIL'}: wall time {wall:.0f} s < {TARGET_WALL_TIME_S:.0f} s",
        f"- {'PASS' if targets['accuracy_pass'] else 'FAIL'}: accuracy {100 * accuracy:.2f}% >= {100 * TARGET_ACCURACY:.0f}%",
    ]
    markdown = "\n".join(lines)
    print()
    print(markdown)
    print(f"load average after: {load_after}")
    result = {
        "command": "python benchmarks/default_job.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "measured_at": time.strftime("%Y-%m-%d"),
        "markdown": markdown,
        **result,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if temporary is not None:
        temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
