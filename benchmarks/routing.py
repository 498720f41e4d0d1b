"""Automatic routing against the oracle and against one merged adapter, on mixed-task traffic.

    python benchmarks/routing.py --json benchmarks/results/routing.json     # trains 4 adapters first (~10 min on 2 cores)
    python benchmarks/routing.py --workdir /tmp/routing --max-per-task 200  # quicker; reuses trained adapters

What runs. Four LoRA adapters on minilm (r=8, alpha 16, all-linear, peftkit's defaults), one per task:
sst2, trec, cr, mr, each trained by `peftkit.train.job.train_classifier` (what `peftkit train` runs) for
--steps optimizer steps of 16 examples (a short run, not the full 2 epochs), which also writes each
adapter's routing data (embeddings of 512 of its training inputs, computed with the adapter off; 256 kept). One
adapter merged from the four with TIES (density --density, weights 1, `peftkit combine`'s code),
saved four times, each with one task's own classification head (the tasks' label sets differ, so a
merged body needs a task's head to classify that task at all).

All served by one in-process `AdapterServer` (the server `peftkit serve` runs, without HTTP): the
mixed traffic is the test splits of the four tasks (up to --max-per-task each), shuffled together,
sent as /v1/classify requests of --request-texts texts. Each text is answered by
  oracle     its own task's adapter, named by hand
  routed     "auto": the centroid router and the knn router (k=16) choose per text
  merged     the TIES-merged body with the text's own task's head (given the task, like the oracle)
A routed answer counts as right when its label name equals the text's gold label name (sst2, cr and
mr all say negative / positive; trec's six classes are its own). Routing accuracy = texts sent to their
own task's adapter. sst2 and mr are sentences of the same Rotten Tomatoes reviews (SST was built on
MR's sentences), so no router can tell them apart from the text; the table also gives routing accuracy
counting sst2 <-> mr as the same task, and the end-task accuracy is what matters there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, write_results_json  # noqa: E402

TASKS = ("sst2", "trec", "cr", "mr")
SAME_SOURCE = {"sst2": "rt", "mr": "rt", "trec": "trec", "cr": "cr"}  # sst2 and mr: the same review sentences


def train_adapters(workdir: Path, steps: int, seed: int) -> dict[str, dict]:
    from peftkit.train.job import train_classifier

    jobs = {}
    for task in TASKS:
        run = workdir / "runs" / task
        if (run / "job.json").is_file() and (run / "adapter" / "routing.safetensors").is_file():
            jobs[task] = json.loads((run / "job.json").read_text())
            print(f"{task}: reusing {run}", file=sys.stderr)
            continue
        started = time.perf_counter()
        job = train_classifier("minilm", task, "lora", run, training={"max_steps": steps, "batch_size": 16},
                               max_eval_examples=300, seed=seed)
        jobs[task] = job.to_dict()
        print(f"{task}: trained {steps} steps in {time.perf_counter() - started:.0f} s, validation accuracy "
              f"{job.validation_accuracy:.3f} (300 examples)", file=sys.stderr, flush=True)
    return jobs


def build_adapter_dir(workdir: Path, density: float) -> Path:
    """served/: the four adapters (copies: the server refuses links out of its folder) and merged-TASK (the TIES
    merge with TASK's head)."""
    import shutil

    from peftkit.merging import combine_adapters, save_combined

    served = workdir / "served"
    served.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        if not (served / task).exists():
            shutil.copytree(workdir / "runs" / task / "adapter", served / task)
    if not all((served / f"merged-{task}").is_dir() for task in TASKS):
        combined = combine_adapters([workdir / "runs" / task / "adapter" for task in TASKS], method="ties", density=density)
        print(f"TIES merge (density {density}): SVD relative error {combined.overall_relative_error:.2e}", file=sys.stderr)
        for index, task in enumerate(TASKS):
            if not (served / f"merged-{task}").is_dir():
                save_combined(combined.with_head(index), served / f"merged-{task}")
    return served


def mixed_traffic(max_per_task: int | None, seed: int) -> list[tuple[str, str, str]]:
    """(task, text, gold label name) of the four test splits, shuffled together."""
    from peftkit import zoo

    traffic = []
    for task in TASKS:
        data = zoo.load_task(task)
        examples = data.test[:max_per_task] if max_per_task else data.test
        traffic += [(task, e.text, data.label_names[e.label]) for e in examples]
    random.Random(seed).shuffle(traffic)
    return traffic


async def answer_all(server, traffic, adapter_of, request_texts: int, concurrency: int = 4) -> tuple[list[dict], float]:
    """Every text's result (label, and the adapter used), in traffic order; and the seconds it took."""
    chunks = [traffic[i:i + request_texts] for i in range(0, len(traffic), request_texts)]
    results: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(chunks), concurrency):
        group = chunks[start:start + concurrency]
        answers = await asyncio.gather(*(_answer_chunk(server, chunk, adapter_of) for chunk in group))
        for answer in answers:
            results += answer
    return results, time.perf_counter() - started


async def _answer_chunk(server, chunk, adapter_of) -> list[dict]:
    by_adapter: dict[str, list[int]] = {}
    for index, (task, _, _) in enumerate(chunk):
        by_adapter.setdefault(adapter_of(task), []).append(index)
    out: list[dict | None] = [None] * len(chunk)
    for adapter, rows in by_adapter.items():
        body = await server.classify(adapter, [chunk[i][1] for i in rows])
        for row, result in zip(rows, body["results"]):
            out[row] = {"label": result["label"], "adapter": result.get("adapter", adapter)}
    return out


def score(traffic, results, routed: bool) -> dict:
    per_task = {}
    for task in TASKS:
        rows = [(t, r) for t, r in zip(traffic, results) if t[0] == task]
        entry = {"texts": len(rows), "accuracy": sum(r["label"] == t[2] for t, r in rows) / len(rows)}
        if routed:
            entry["routing_accuracy"] = sum(r["adapter"] == task for t, r in rows) / len(rows)
            entry["routed_to"] = {name: sum(r["adapter"] == name for _, r in rows) for name in TASKS}
        per_task[task] = entry
    total = {"accuracy": sum(r["label"] == t[2] for t, r in zip(traffic, results)) / len(traffic),
             "macro_accuracy": sum(e["accuracy"] for e in per_task.values()) / len(TASKS)}
    if routed:
        total["routing_accuracy"] = sum(r["adapter"] == t[0] for t, r in zip(traffic, results)) / len(traffic)
        total["routing_accuracy_same_source"] = sum(SAME_SOURCE[r["adapter"]] == SAME_SOURCE[t[0]]
                                                    for t, r in zip(traffic, results)) / len(traffic)
    return {"total": total, "per_task": per_task}


async def measure(served: Path, traffic, request_texts: int, routers: list[str]) -> dict:
    from peftkit.serve import ServeSettings, load_server
    from peftkit.serve.routing import make_router

    server = load_server("minilm", served, ServeSettings(max_batch_size=64, max_texts=request_texts, max_wait_ms=2))
    await server.start()
    try:
        rows = {}
        texts = len(traffic)
        results, seconds = await answer_all(server, traffic, lambda task: task, request_texts)
        rows["oracle"] = {**score(traffic, results, routed=False), "texts_per_s": texts / seconds}
        for name in routers:
            server.router = make_router(name)
            results, seconds = await answer_all(server, traffic, lambda task: "auto", request_texts)
            rows[f"routed-{name}"] = {**score(traffic, results, routed=True), "texts_per_s": texts / seconds}
        results, seconds = await answer_all(server, traffic, lambda task: f"merged-{task}", request_texts)
        rows["merged-ties"] = {**score(traffic, results, routed=False), "texts_per_s": texts / seconds}
        return rows
    finally:
        await server.stop()


def markdown(rows: dict, args, jobs: dict, count: int, load: str) -> str:
    lines = [
        f"minilm, four LoRA adapters (r=8 all-linear, {args.steps} steps of 16 examples each) with routing data written "
        f"at training time; {count} test texts of sst2, trec, cr and mr (up to {args.max_per_task or 'all'} per task) "
        f"shuffled together, {args.request_texts} texts per /v1/classify request, in-process AdapterServer; 2-core "
        f"CPU (load average {load}).",
        "",
        "| answered by | routing accuracy | same source (sst2 = mr) | accuracy | macro accuracy | sst2 | trec | cr | mr | texts/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"oracle": "oracle (the task's own adapter, named)", "merged-ties": "one TIES-merged adapter (+ the task's head)"}
    for name, row in rows.items():
        total, per = row["total"], row["per_task"]
        routing = f"{100 * total['routing_accuracy']:.1f}%" if "routing_accuracy" in total else "-"
        same = f"{100 * total['routing_accuracy_same_source']:.1f}%" if "routing_accuracy" in total else "-"
        label = labels[name] if name in labels else f"auto, {name.split('-', 1)[1]} router"
        lines.append(f"| {label} | {routing} | {same} | {100 * total['accuracy']:.1f}% | {100 * total['macro_accuracy']:.1f}% | "
                     + " | ".join(f"{100 * per[t]['accuracy']:.1f}%" for t in TASKS) + f" | {row['texts_per_s']:.0f} |")
    routed = [n for n in rows if n.startswith("routed-")]
    lines += ["", "Routing accuracy per task (texts sent to their own task's adapter):", "",
              "| router | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for name in routed:
        per = rows[name]["per_task"]
        lines.append(f"| {name.split('-', 1)[1]} | " + " | ".join(f"{100 * per[t]['routing_accuracy']:.1f}%" for t in TASKS) + " |")
    trained = ", ".join(f"{t} {100 * jobs[t]['validation_accuracy']:.1f}%" for t in TASKS if jobs[t].get("validation_accuracy"))
    lines += ["", f"Validation accuracy of the adapters after their short training (300 examples): {trained}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (16 examples each) per adapter")
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each update kept")
    parser.add_argument("--max-per-task", type=int, default=None, help="test texts per task (default: all)")
    parser.add_argument("--request-texts", type=int, default=16)
    parser.add_argument("--routers", default="centroid,knn")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/peftkit-routing-bench", help="trained adapters are kept here and reused")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    jobs = train_adapters(workdir, args.steps, args.seed)
    served = build_adapter_dir(workdir, args.density)
    traffic = mixed_traffic(args.max_per_task, args.seed)
    rows = asyncio.run(measure(served, traffic, args.request_texts, args.routers.split(",")))
    load = load_average()
    table = markdown(rows, args, jobs, len(traffic), load)
    print(table)
    oracle = rows["oracle"]["total"]["accuracy"]
    merged = rows["merged-ties"]["total"]["accuracy"]
    checks = []
    for name in (n for n in rows if n.startswith("routed-")):
        total = rows[name]["total"]
        checks += [(f"{name}: routing accuracy {100 * total['routing_accuracy']:.1f}% >= 95%", total["routing_accuracy"] >= 0.95),
                   (f"{name}: accuracy {100 * total['accuracy']:.1f}% within 1 point of the oracle's {100 * oracle:.1f}%",
                    oracle - total["accuracy"] <= 0.01),
                   (f"{name}: accuracy above the merged adapter's {100 * merged:.1f}%", total["accuracy"] > merged)]
    print()
    for text, ok in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    if args.json:
        command = "python benchmarks/routing.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results_json(args.json, {"command": command.strip(), "measured_at": time.strftime("%Y-%m-%d"), "markdown": table,
                                       "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
                                       "rows": rows, "checks": [{"check": t, "pass": ok} for t, ok in checks],
                                       "adapters": {t: {"validation_accuracy": jobs[t].get("validation_accuracy"),
                                                        "steps": jobs[t].get("steps")} for t in TASKS},
                                       "load_average": load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
