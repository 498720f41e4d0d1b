"""Co-training four tasks in one run against four separate runs: LoRA on minilm, sst2 + trec + cr + mr.

    python benchmarks/cotrain.py --json benchmarks/results/cotrain.json        # the runs in /work/bench-*
    python benchmarks/cotrain.py --repeats 3 --separate-root /work/bench-cotrain-rep/tasks \
        --cotrain-dir /work/bench-cotrain-rep/cotrain --json benchmarks/results/cotrain.json   # the README's figures
    python benchmarks/cotrain.py --pass-times 16                                # passes only, interleaved

The co-trained run is `peftkit train --method lora --model minilm --task sst2,trec,cr,mr --seed 0
--output-dir /work/bench-cotrain`; the separate runs are `peftkit train --method lora --model minilm --task T
--output-dir /work/bench-tasks/T --no-progress --seed 0`, one per task. Runs already in those folders are
read, not repeated (a co-training run cut short is continued with --resume); missing ones are run here,
one after the other (on a quiet 2-core machine, about 14 minutes for the five; --repeats 3 takes 42). Training on CPU is
deterministic given the seed and thread count, so load changes the times but not the accuracies.

Accuracy: each task's validation split, at the best evaluated epoch (the adapter each run keeps), and the
co-trained adapters are scored once more with `peftkit eval`'s code (`evaluate_run`) from their folders.
Time: wall and CPU (user + system) time of the whole processes, from `/usr/bin/time -v` in the run's log
where it was started that way, else measured here. The runs share a 2-core machine with other jobs, at
different times, so wall times carry the load of their moment; CPU time is the steadier comparison and
the load averages are recorded. Targets (issue 5): every task within 1 point of its separate adapter, and
less total wall time than the four separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, peftkit_command, run_measured, write_results_json  # noqa: E402

TASKS = ("sst2", "trec", "cr", "mr")
TARGET_POINTS = 1.0


def separate_command(task: str, root: Path) -> list[str]:
    return peftkit_command() + ["train", "--method", "lora", "--model", "minilm", "--task", task,
                                "--output-dir", str(root / task), "--no-progress", "--seed", "0"]


def cotrain_command(folder: Path, resume: bool) -> list[str]:
    return peftkit_command() + ["train", "--method", "lora", "--model", "minilm", "--task", ",".join(TASKS),
                                "--seed", "0", "--output-dir", str(folder)] + (["--resume"] if resume else [])


def timing_from_log(log: Path) -> dict | None:
    """Wall and CPU seconds of a process started under `/usr/bin/time -v` (its report ends the log)."""
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    if not (elapsed and user and system) or (status and status.group(1) != "0"):
        return None
    wall = 0.0
    for part in elapsed.group(1).split(":"):
        wall = wall * 60 + float(part)
    return {"wall_s": wall, "cpu_s": float(user.group(1)) + float(system.group(1)), "source": f"/usr/bin/time -v in {log}"}


def training_in(folder: Path) -> bool:
    """Whether a running process (Linux /proc) has `--output-dir folder` on its command line."""
    wanted = [str(folder), str(folder.resolve())]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        for i, word in enumerate(words[:-1]):
            if word == b"--output-dir" and words[i + 1].decode(errors="replace").rstrip("/") in wanted:
                return True
    return False


def measured(command: list[str], log: Path) -> dict:
    """Run `command` here: wall time, CPU time of the child, load average around it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = load_average()
    print(f"running {' '.join(command)} (log {log}); load average {load_before}", flush=True)
    wall, peak_rss_mb, code = run_measured(command, log)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise SystemExit(f"{command} failed with exit code {code}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb, "source": f"measured by this script ({log})",
              "load_average_before": load_before, "load_average_after": load_average()}
    timing_file(log).write_text(json.dumps(timing, indent=1))  # so that a later report can read the finished run
    return timing


def timing_file(log: Path) -> Path:
    return log.with_name(log.name + ".timing.json")


def recorded_timing(log: Path) -> dict | None:
    """The timing of a run this script measured (its log's .timing.json), else its log's /usr/bin/time report."""
    if timing_file(log).is_file():
        return json.loads(timing_file(log).read_text())
    return timing_from_log(log)


def cotrain_complete(folder: Path) -> bool:
    path = folder / "metrics.json"
    if not path.is_file():
        return False
    tasks = json.loads(path.read_text())["tasks"]
    return set(tasks) == set(TASKS) and all(t["stopped_early"] or t["steps"] == t["total_steps"] for t in tasks.values())


def padded_tokens_separate() -> dict[str, int]:
    """Rows x padded length over every batch of each task's separate run (2 epochs, batch 32, seed 0)."""
    from peftkit import zoo
    from peftkit.train.cotrain import task_epoch_batches
    from peftkit.train.data import tokenize_examples

    _, tokenizer = zoo.load_classifier("minilm", num_labels=2)
    tokens = {}
    for task in TASKS:
        lengths = [len(f["input_ids"]) for f in tokenize_examples(zoo.load_task(task).train, tokenizer)]
        tokens[task] = sum(len(b) * max(lengths[i] for i in b) for e in range(2) for b in task_epoch_batches(lengths, 32, 0, e))
    return tokens


def pass_times(samples: int, threads: int) -> dict:
    """Co-trained passes against the same batches trained separately, interleaved in this process.

    Takes `samples` passes spread over the co-training plan of epoch 0 and times, for each, one co-trained
    step (MixedLoraModel forward and backward over the pass, per-slot clipping, SlotAdamW) and the
    separate steps on the same batches (one PeftModel per task: forward, backward, clip_grad_norm_,
    torch AdamW), alternating which goes first. Both see the same load; returns the sums and the median
    of the per-pass ratios.
    """
    import statistics

    import torch

    from peftkit import zoo
    from peftkit.mixed import MixedLoraModel
    from peftkit.model import get_peft_model
    from peftkit.train import cotrain
    from peftkit.train.data import PaddingCollator, tokenize_examples
    from peftkit.train.job import method_config

    torch.set_num_threads(threads)
    config = method_config("lora")
    data = {t: zoo.load_task(t) for t in TASKS}
    base, tokenizer = zoo.load_classifier("minilm", num_labels=2, seed=0)
    mixed = MixedLoraModel(base, config.target_modules, capacity=len(TASKS), max_rank=config.r, head="classifier",
                           max_labels=max(len(d.label_names) for d in data.values()))
    tasks, separate = [], {}
    for name, task_data in data.items():
        features = tokenize_examples(task_data.train, tokenizer)
        task = cotrain._Task(name=name, spec=name, label_names=task_data.label_names, train=features, evaluation=None,
                             lengths=[len(f["input_ids"]) for f in features], total_steps=434, batches_per_epoch=217)
        task.slot = mixed.add_adapter(name, config, num_labels=len(task_data.label_names))
        tasks.append(task)
        alone, _ = zoo.load_classifier("minilm", num_labels=len(task_data.label_names), seed=0)
        model = get_peft_model(alone, method_config("lora")).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        separate[name] = (model, trainable, torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0))
    collate = PaddingCollator(tokenizer)
    trainer = cotrain._Cotrainer(mixed, tasks, cotrain.CotrainArguments(output_dir="unused", progress=False), collate,
                                 Path("unused"), {})
    trainer.mixed.train()
    batches = {t.name: cotrain.task_epoch_batches(t.lengths, 32, 0, 0) for t in tasks}
    padded = {t.name: [max(t.lengths[i] for i in b) for b in batches[t.name]] for t in tasks}
    plan = cotrain.plan_epoch(batches, padded, 0, 0)
    chosen = [plan[round(i * (len(plan) - 1) / max(1, samples - 1))] for i in range(samples)]

    def co_step(one_pass):
        started = time.perf_counter()
        trainer._train_step(one_pass)
        return time.perf_counter() - started

    def separate_steps(one_pass):
        started = time.perf_counter()
        for name, indices in one_pass.items():
            model, trainable, optimizer = separate[name]
            task = tasks[TASKS.index(name)]
            loss = model(**collate([task.train[i] for i in indices])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    co_step(chosen[0]), separate_steps(chosen[0])  # warm up
    co_times, separate_times = [], []
    for i, one_pass in enumerate(chosen):
        if i % 2:
            separate_times.append(separate_steps(one_pass))
            co_times.append(co_step(one_pass))
        else:
            co_times.append(co_step(one_pass))
            separate_times.append(separate_steps(one_pass))
        print(f"pass {i + 1}/{samples} ({sum(len(b) for b in one_pass.values())} rows, {len(one_pass)} tasks): "
              f"co-trained {co_times[-1]:.2f} s, separate {separate_times[-1]:.2f} s", flush=True)
    return {"samples": samples, "threads": threads, "rows": [sum(len(b) for b in p.values()) for p in chosen],
            "tasks_per_pass": [len(p) for p in chosen], "cotrained_s": co_times, "separate_s": separate_times,
            "cotrained_total_s": sum(co_times), "separate_total_s": sum(separate_times),
            "median_ratio": statistics.median(c / s for c, s in zip(co_times, separate_times)),
            "passes_in_epoch": len(plan), "load_average": load_average()}


def collect_separate(root: Path) -> dict:
    """The four separate runs in root/<task>: run here where missing, else read (timing from their logs)."""
    separate = {}
    for task in TASKS:
        run = root / task
        if not (run / "job.json").is_file():
            # Never start a second run in a folder another process is training in, nor overwrite its log.
            log = root / f"{task}.log"
            if training_in(run):
                raise SystemExit(f"a peftkit process is training the separate {task} run in {run}; wait for it to finish, "
                                 "then run this again")
            root.mkdir(parents=True, exist_ok=True)
            resume = (run / "checkpoints").is_dir()
            if log.exists():
                log = root / f"{task}-benchmark-{int(time.time())}.log"
            timing = measured(separate_command(task, root) + (["--resume"] if resume else []), log)
        else:
            job = json.loads((run / "job.json").read_text())
            timing = recorded_timing(root / f"{task}.log") or {
                "wall_s": job["wall_time_s"], "cpu_s": None, "source": "job.json (interpreter start and imports not included)"}
        job = json.loads((run / "job.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        separate[task] = {"accuracy": job["validation_accuracy"], "steps": job["steps"], "best_step": metrics["best_step"],
                          "command": " ".join(["peftkit"] + separate_command(task, root)[len(peftkit_command()):]), **timing}

    return separate


def collect_cotrain(folder: Path, cotrain_log: Path) -> tuple[list[dict], dict]:
    """The co-training run in folder: run (or resume) here where unfinished, else read. (timings, metrics)"""
    cotrain_parts = []
    if not cotrain_complete(folder) and training_in(folder):
        raise SystemExit(f"a peftkit process is co-training in {folder}; wait for it to finish, then run this again")
    if not cotrain_complete(folder):
        resume = any((folder / "checkpoints").glob("step-*/state.json"))
        folder.parent.mkdir(parents=True, exist_ok=True)
        log = folder.parent / f"{folder.name}-{'resume' if resume else 'run'}-{int(time.time())}.log"
        cotrain_parts.append(measured(cotrain_command(folder, resume), log))
    else:
        measured_here = sorted(folder.parent.glob(f"{folder.name}-run-*.log.timing.json"))
        timing = json.loads(measured_here[-1].read_text()) if measured_here else timing_from_log(cotrain_log)
        if timing is None:
            raise SystemExit(f"{folder} holds a finished co-training run but {cotrain_log} has no /usr/bin/time report "
                             "for its timing; rerun it (delete the folder) or point --cotrain-log at its log")
        cotrain_parts.append(timing)
    metrics = json.loads((folder / "metrics.json").read_text())
    if metrics.get("resumed_from") and len(cotrain_parts) == 1 and cotrain_parts[0]["source"].startswith("/usr/bin/time"):
        print("note: the co-training run was resumed; its timing covers the last part only", file=sys.stderr)
    return cotrain_parts, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--separate-root", default="/work/bench-tasks", help="folder of the separate runs (one per task)")
    parser.add_argument("--cotrain-dir", default="/work/bench-cotrain", help="output folder of the co-training run")
    parser.add_argument("--cotrain-log", default="/work/bench-cotrain-logs/cotrain.log",
                        help="log of a co-training run started under /usr/bin/time -v, for its timing")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--pass-times", type=int, default=0, metavar="N",
                        help="only time N co-trained passes against the same batches trained separately (interleaved)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for --pass-times")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="run the five runs N times (in repeat-K subfolders, alternating which side goes first) "
                             "and compare the median wall times")
    args = parser.parse_args(argv)
    if args.pass_times:
        timing = pass_times(args.pass_times, args.threads)
        ratio = timing["cotrained_total_s"] / timing["separate_total_s"]
        markdown = "\n".join([
            f"{timing['samples']} passes spread over epoch 0 of the co-training plan ({timing['passes_in_epoch']} passes), each "
            "timed as one co-trained step and as the same batches' separate steps, interleaved in one process "
            f"({timing['threads']} threads, load average {timing['load_average']}).",
            "",
            "| | co-trained | separate | ratio |",
            "|---|---:|---:|---:|",
            f"| total of the sampled passes | {timing['cotrained_total_s']:.1f} s | {timing['separate_total_s']:.1f} s | {ratio:.2f}x |",
            f"| median per-pass ratio | | | {timing['median_ratio']:.2f}x |",
        ])
        print(markdown)
        if args.json:
            write_results_json(args.json, {"command": "python benchmarks/cotrain.py " + " ".join(sys.argv[1:]),
                                           "measured_at": time.strftime("%Y-%m-%d"), "markdown": markdown, **timing})
            print(f"wrote {args.json}")
        return 0
    repeats = []
    for k in range(args.repeats):
        root, folder = Path(args.separate_root), Path(args.cotrain_dir)
        if args.repeats > 1:
            root, folder = root / f"repeat-{k + 1}", folder / f"repeat-{k + 1}"
        # Alternate which goes first, so that a drift in the machine's speed falls on both sides.
        if k % 2:
            cotrain_parts, metrics = collect_cotrain(folder, Path(args.cotrain_log))
            separate = collect_separate(root)
        else:
            separate = collect_separate(root)
            cotrain_parts, metrics = collect_cotrain(folder, Path(args.cotrain_log))
        repeats.append({"separate": separate, "cotrain_parts": cotrain_parts, "metrics": metrics, "folder": folder,
                        "separate_wall_s": sum(t["wall_s"] for t in separate.values()),
                        "cotrain_wall_s": sum(t["wall_s"] for t in cotrain_parts)})
    separate, cotrain_parts, metrics, folder = (repeats[0][k] for k in ("separate", "cotrain_parts", "metrics", "folder"))

    from peftkit.train.job import evaluate_run

    rows, cotrained = [], {}
    for task in TASKS:
        result = metrics["tasks"][task]
        rescored = evaluate_run(folder / task)["accuracy"]
        cotrained[task] = {"accuracy": result["validation_accuracy"], "rescored_accuracy": rescored, "steps": result["steps"],
                           "best_step": result["best_step"], "stopped_early": result["stopped_early"]}
        difference = 100 * (result["validation_accuracy"] - separate[task]["accuracy"])
        cotrained[task]["difference_points"] = difference
        rows.append(f"| {task} | {100 * separate[task]['accuracy']:.2f}% | {100 * result['validation_accuracy']:.2f}% "
                    f"(eval: {100 * rescored:.2f}%) | {difference:+.2f} | {separate[task]['steps']} / {result['steps']} "
                    f"| {'yes' if abs(difference) <= TARGET_POINTS or difference > 0 else 'NO'} |")

    import statistics

    def cpu_of(repeat):
        values = [t["cpu_s"] for t in repeat["separate"].values()]
        return (sum(values) if all(v is not None for v in values) else None,
                sum(p["cpu_s"] for p in repeat["cotrain_parts"]))

    separate_wall = statistics.median(r["separate_wall_s"] for r in repeats)
    cotrain_wall = statistics.median(r["cotrain_wall_s"] for r in repeats)
    tokens_separate = padded_tokens_separate()
    within = all(abs(c["difference_points"]) <= TARGET_POINTS or c["difference_points"] > 0 for c in cotrained.values())
    faster = cotrain_wall < separate_wall
    # Training on CPU is deterministic: every repeat must reach the same accuracies.
    same_accuracy = all(
        r["separate"][t]["accuracy"] == separate[t]["accuracy"]
        and r["metrics"]["tasks"][t]["validation_accuracy"] == metrics["tasks"][t]["validation_accuracy"]
        for r in repeats for t in TASKS)
    time_rows = []
    for k, repeat in enumerate(repeats):
        separate_cpu, cotrain_cpu = cpu_of(repeat)
        order = "co-trained first" if k % 2 else "separate first"
        per_task = " + ".join(f"{repeat['separate'][t]['wall_s']:.0f}" for t in TASKS)
        cpu_cells = (f"{separate_cpu:.0f} s | {cotrain_cpu:.0f} s | {cotrain_cpu / separate_cpu:.2f}x" if separate_cpu
                     else f"n/a | {cotrain_cpu:.0f} s | n/a")
        time_rows.append(f"| {k + 1} ({order}) | {repeat['separate_wall_s']:.0f} s ({per_task}) | {repeat['cotrain_wall_s']:.0f} s "
                         f"| {repeat['cotrain_wall_s'] / repeat['separate_wall_s']:.2f}x | {cpu_cells} |")
    if len(repeats) > 1:
        time_rows.append(f"| median | {separate_wall:.0f} s | {cotrain_wall:.0f} s | {cotrain_wall / separate_wall:.2f}x | | | |")
    lines = [
        "LoRA (r=8, all linear layers, lr 1e-3, 2 epochs, batch 32 per task, seed 0) on minilm; accuracy on each "
        "task's validation split at the best evaluated epoch. Co-trained: one `peftkit train --task sst2,trec,cr,mr` run, "
        "one adapter per task in mixed batches (each task's own batches, matched by length); `eval` is the saved "
        "folder re-scored by `peftkit eval`'s code. Steps: separate / co-trained."
        + (f" The runs were repeated {len(repeats)} times, alternating which side went first; accuracies were "
           + ("identical in every repeat (training on CPU is deterministic)." if same_accuracy
              else "NOT identical across repeats (the table shows the first).") if len(repeats) > 1 else ""),
        "",
        "| task | separate | co-trained | difference (points) | steps | within 1 point |",
        "|---|---:|---:|---:|---:|:---:|",
        *rows,
        "",
        "Time of the whole processes (interpreter start to exit), the four separate runs summed:",
        "",
        "| repeat | wall: 4 separate runs (sst2 + trec + cr + mr) | wall: co-trained run | ratio "
        "| CPU: separate | CPU: co-trained | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *time_rows,
        "",
        f"Padded tokens trained: {sum(tokens_separate.values()):,d} separate, {metrics['padded_tokens']:,d} co-trained "
        f"({metrics['padded_tokens'] / sum(tokens_separate.values()):.2f}x); forward passes: "
        f"{sum(s['steps'] for s in separate.values())} separate, {metrics['forward_passes']} co-trained.",
        "",
        f"- {'PASS' if within else 'FAIL'}: every task within {TARGET_POINTS:g} point of its separate adapter (or better)",
        f"- {'PASS' if faster else 'FAIL'}: co-trained wall time {cotrain_wall:.0f} s < separate total {separate_wall:.0f} s"
        + (" (medians)" if len(repeats) > 1 else ""),
    ]
    markdown = "\n".join(lines)
    print(markdown)
    payload = {
        "command": "python benchmarks/cotrain.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "measured_at": time.strftime("%Y-%m-%d"),
        "markdown": markdown,
        "cotrain_command": " ".join(["peftkit"] + cotrain_command(folder, False)[len(peftkit_command()):]),
        "separate": separate,
        "cotrained": cotrained,
        "cotrain_timing": cotrain_parts,
        "repeats": [{"separate": r["separate"], "cotrain_timing": r["cotrain_parts"], "separate_wall_s": r["separate_wall_s"],
                     "cotrain_wall_s": r["cotrain_wall_s"], "cotrain_dir": str(r["folder"])} for r in repeats],
        "same_accuracy_in_every_repeat": same_accuracy,
        "cotrain_metrics": {k: v for k, v in metrics.items() if k != "tasks"},
        "padded_tokens_separate": tokens_separate,
        "load_average_at_report": load_average(),
        "cpu_count": os.cpu_count(),
        "targets": {"within_points": TARGET_POINTS, "accuracy_pass": within, "wall_time_pass": faster},
    }
    if args.json:
        write_results_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
