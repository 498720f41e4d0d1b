"""Federated LoRA on Flower's simulation engine: aggregation rules, IID against non-IID data, centralized
training and each client alone, communication, and personalization.

    python benchmarks/federated.py                                  # minilm on sst2 and trec (about 30 minutes on 2 quiet cores)
    python benchmarks/federated.py --tasks sst2 --partitions iid --aggregations delta --rounds 2   # smoke
    python benchmarks/federated.py --json benchmarks/results/federated.json --plot benchmarks/results/federated.png

For each task and partition (IID, Dirichlet alpha=0.5 over the labels) of the task's training examples
among 10 clients (Flower Datasets), every aggregation rule runs a Flower simulation: each round 4 of
the 10 clients (fraction 0.4) train LoRA (r=8 on query,value, plus the new head) for one local epoch on
their own examples, and every client scores the global adapter on its own held-out part (20% of its
examples). To keep the run short each client owns at most --max-examples-per-client examples (240 by
default: 192 to train on, 48 held out; 2,400 of the task's training examples are used, the same ones by
every contender), for 8 rounds.

Against the same examples, and for centralized training the same budget of optimizer steps (rounds x
clients per round x a client's mean steps per local epoch):
- centralized: one model trained on all the clients' training examples together;
- each client alone: every client trains on its own examples only, for as many epochs as there are
  rounds (as if it were sampled every round), scored on its own held-out part.
All scored as the federation is: the mean of the clients' held-out accuracies, weighted by their sizes.

Privacy: for each task, the IID federation with --dp-rule runs once more with Flower's differential-privacy
mods (client-side clipping at norm 1, server noise multiplier --dp-noise); its final accuracy against the
same run without.

Personalization: after the federation (the rule that scored best under Dirichlet), each client
fine-tunes the global adapter on its own examples for --personal-steps steps; the gain is its held-out
accuracy after against before.

Targets (the issue): delta or frozen-a at least as accurate as fedavg-factors under Dirichlet 0.5;
IID federated within 3 points of centralized; per-round traffic per client at most 2% of the whole model.
Prints markdown tables and PASS/FAIL lines; exits 0 either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from peftkit.federated import local
from peftkit.federated.privacy import describe as describe_budget
from peftkit.federated.settings import FederationSettings
from peftkit.federated.simulation import simulate
from peftkit.io import write_json

TARGET_IID_GAP_POINTS = 3.0
TARGET_SHARE = 0.02


def weighted_accuracy(pairs):
    total = sum(n for _, n in pairs)
    return sum(a * n for a, n in pairs) / total


def baselines(settings: FederationSettings, global_adapter: dict | None, personal_steps: int) -> dict:
    """Centralized and client-alone accuracy with the federation's step budget; personalization from
    `global_adapter` (the federated adapter's whole state), each client fine-tuning a copy on its own examples."""
    parts = [local.client_data(settings, c) for c in range(settings.clients)]
    epoch_steps = [-(-len(p.train) // settings.batch_size) for p in parts]  # one local epoch of each client
    budget = round(settings.rounds * settings.clients_per_round * sum(epoch_steps) / len(parts))
    adapted = local.build_adapted_model(settings)
    start = adapted.shared_state()
    union = [e for p in parts for e in p.train]
    local.train_locally(adapted, union, seed=settings.seed, steps=budget)
    centralized = weighted_accuracy([(local.evaluate_locally(adapted, p.held_out)["accuracy"], len(p.held_out)) for p in parts])
    alone, personal = [], []
    for client, part in enumerate(parts):
        adapted.load_shared_state(start)
        local.train_locally(adapted, part.train, seed=settings.seed + client, steps=settings.rounds * epoch_steps[client])
        alone.append((local.evaluate_locally(adapted, part.held_out)["accuracy"], len(part.held_out)))
        if global_adapter is not None:
            adapted.model.load_adapter_state(local.ADAPTER, global_adapter, where="the federated adapter")
            before = local.evaluate_locally(adapted, part.held_out)["accuracy"]
            local.train_locally(adapted, part.train, seed=settings.seed + client, steps=personal_steps)
            after = local.evaluate_locally(adapted, part.held_out)["accuracy"]
            personal.append((before, after, len(part.held_out)))
    result = {"budget_steps": budget, "centralized": centralized, "alone": weighted_accuracy(alone),
              "alone_per_client": [a for a, _ in alone]}
    if personal:
        result["personal_before"] = weighted_accuracy([(b, n) for b, _, n in personal])
        result["personal_after"] = weighted_accuracy([(a, n) for _, a, n in personal])
    return result


def run_federation(base: FederationSettings, workdir: Path, task: str, partition: str, rule: str, dp_noise: float = 0.0) -> dict:
    name = f"{task}-{partition.replace(':', '')}-{rule}" + (f"-dp{dp_noise:g}" if dp_noise else "")
    settings = dataclasses.replace(base, task=task, partition=partition, aggregate=rule, dp_noise_multiplier=dp_noise,
                                   output_dir=str(workdir / name))
    started = time.perf_counter()
    report = simulate(settings)
    report["wall_s"] = time.perf_counter() - started
    report["task"], report["partition"], report["rule"] = task, partition, rule
    return report


def final_state(report: dict) -> dict:
    from peftkit import io

    adapter = io.read_tensors(Path(report["settings"]["output_dir"]) / "adapter" / io.WEIGHTS_NAME)
    return adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tasks", default="sst2,trec")
    parser.add_argument("--partitions", default="iid,dirichlet:0.5")
    parser.add_argument("--aggregations", default="fedavg-factors,delta,frozen-a")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-examples-per-client", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--personal-steps", type=int, default=10)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--dp-noise", type=float, default=0.5, help="noise multiplier of the privacy run (IID, --dp-rule); 0: none")
    parser.add_argument("--dp-rule", default="delta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()

    base = FederationSettings(model=args.model, method="lora", method_options={"r": args.r, "lora_alpha": 2 * args.r,
                                                                               "target_modules": ["query", "value"]},
                              clients=args.clients, rounds=args.rounds, fraction=args.fraction, local_epochs=1.0,
                              batch_size=args.batch_size, learning_rate=args.learning_rate, max_length=64,
                              max_examples_per_client=args.max_examples_per_client, seed=args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peftkit-federated-bench-"))
    runs, comparisons, privacy = [], [], []
    tables = [f"{args.model}, LoRA r={args.r} on query,value (+ the head); {args.clients} clients, {args.fraction:g} of them sampled "
              f"per round, {args.rounds} rounds of one local epoch; at most {args.max_examples_per_client} examples per client "
              f"(80% to train on, 20% held out for its own evaluation); batch {args.batch_size}, learning rate "
              f"{args.learning_rate:g}; Flower's simulation engine on {os.cpu_count()} CPU cores. Accuracy: the clients' "
              "held-out accuracies of the global adapter, weighted by their sizes."]
    for task in args.tasks.split(","):
        for partition in args.partitions.split(","):
            reports = [run_federation(base, workdir, task, partition, rule) for rule in args.aggregations.split(",")]
            runs.extend(reports)
            best = max(reports, key=lambda r: r["rounds"][-1]["client_accuracy"] or 0)
            settings = dataclasses.replace(base, task=task, partition=partition, aggregate="fedavg-factors")
            started = time.perf_counter()
            comparison = baselines(settings, final_state(best), args.personal_steps)
            comparison.update(task=task, partition=partition, personalized_rule=best["rule"],
                              personal_steps=args.personal_steps, wall_s=time.perf_counter() - started)
            comparisons.append(comparison)
            tables.append(print_partition(task, partition, reports, comparison))
            if args.dp_noise and partition == "iid":
                plain = next(r for r in reports if r["rule"] == args.dp_rule)
                private = run_federation(base, workdir, task, partition, args.dp_rule, dp_noise=args.dp_noise)
                entry = {"task": task, "partition": partition, "rule": args.dp_rule, "noise_multiplier": args.dp_noise,
                         "clipping_norm": base.dp_clipping_norm, "accuracy": private["rounds"][-1]["client_accuracy"],
                         "accuracy_without": plain["rounds"][-1]["client_accuracy"], "wall_s": private["wall_s"],
                         "privacy": private.get("privacy")}
                privacy.append(entry)
                text = (f"Differential privacy ({task}, {partition}, {args.dp_rule}; Flower's client-side clipping at norm "
                        f"{base.dp_clipping_norm:g}, server noise multiplier {args.dp_noise:g}): final accuracy "
                        f"{100 * entry['accuracy']:.2f} against {100 * entry['accuracy_without']:.2f} without "
                        f"({100 * (entry['accuracy'] - entry['accuracy_without']):+.2f} points)"
                        + (f"; privacy budget: {describe_budget(entry['privacy'])}." if entry["privacy"] else "."))
                print("\n" + text)
                tables.append(text)
            save(args, runs, comparisons, verdicts=None, tables=tables, privacy=privacy)  # what is done so far
            sys.stdout.flush()
    verdicts = print_targets(runs, comparisons)
    tables.append("Targets:\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in verdicts.items()))
    save(args, runs, comparisons, verdicts=verdicts, tables=tables, privacy=privacy)
    return 0


def save(args, runs, comparisons, verdicts, tables, privacy) -> None:
    payload = {"command": "python benchmarks/federated.py " + " ".join(sys.argv[1:]), "settings": vars(args),
               "measured_at": time.strftime("%Y-%m-%d"), "complete": verdicts is not None,
               "markdown": "\n\n".join(tables).replace("### ", "#### "),
               "runs": [{k: r[k] for k in ("task", "partition", "rule", "rounds", "adapter_tensor_bytes", "adapter_bytes_per_message",
                                             "whole_model_bytes", "share_of_whole_model", "wall_s")} for r in runs],
               "baselines": comparisons, "privacy": privacy, "targets": verdicts}
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        plot(runs, comparisons, args.plot)


def print_partition(task, partition, reports, comparison) -> str:
    rounds = len(reports[0]["rounds"])
    lines = [f"### {task}, {partition}: client held-out accuracy per round (weighted mean over the 10 clients)", "",
             "| rule | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | max SVD error | bytes / round | wall s |",
             "|---|" + "---|" * (rounds + 3)]
    for report in reports:
        cells = [f"{100 * r['client_accuracy']:.2f}" if r["client_accuracy"] is not None else "-" for r in report["rounds"]]
        errors = [r["factorization_error"] for r in report["rounds"] if r["factorization_error"] is not None]
        error = f"{max(errors):.3f}" if errors else "-"
        traffic = report["rounds"][-1]["bytes_down"] + report["rounds"][-1]["bytes_up"]
        lines.append(f"| {report['rule']} | " + " | ".join(cells) + f" | {error} | {traffic:,} | {report['wall_s']:.0f} |")
    lines += ["", f"centralized (same {comparison['budget_steps']} steps, all clients' examples): {100 * comparison['centralized']:.2f}; "
              f"each client alone: {100 * comparison['alone']:.2f}"]
    if "personal_after" in comparison:
        lines.append(f"personalization ({comparison['personalized_rule']}, then {comparison.get('personal_steps', '')} steps on each "
                     f"client's own examples): {100 * comparison['personal_before']:.2f} -> {100 * comparison['personal_after']:.2f}")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def print_targets(runs, comparisons) -> dict:
    verdicts = {}
    for comparison in comparisons:
        task, partition = comparison["task"], comparison["partition"]
        final = {r["rule"]: r["rounds"][-1]["client_accuracy"] for r in runs if (r["task"], r["partition"]) == (task, partition)}
        if partition.startswith("dirichlet") and "fedavg-factors" in final:
            exact = max(final.get("delta") or 0, final.get("frozen-a") or 0)
            verdicts[f"{task} {partition}: delta or frozen-a >= fedavg-factors"] = exact >= final["fedavg-factors"]
        if partition == "iid":
            gap = 100 * (comparison["centralized"] - max(v for v in final.values() if v is not None))
            verdicts[f"{task} iid: within {TARGET_IID_GAP_POINTS} points of centralized (gap {gap:.2f})"] = gap <= TARGET_IID_GAP_POINTS
    share = max(r["share_of_whole_model"] for r in runs)
    verdicts[f"per-client message <= 2% of the whole model ({100 * share:.3f}%)"] = share <= TARGET_SHARE
    print("\n### targets\n")
    for name, ok in verdicts.items():
        print(f"- {'PASS' if ok else 'FAIL'}: {name}")
    return verdicts


def plot(runs, comparisons, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(c["task"], c["partition"]) for c in comparisons]
    figure, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for axis, (task, partition), comparison in zip(axes[0], groups, comparisons):
        for run in (r for r in runs if (r["task"], r["partition"]) == (task, partition)):
            points = [(r["round"], 100 * r["client_accuracy"]) for r in run["rounds"] if r["client_accuracy"] is not None]
            axis.plot(*zip(*points), marker="o", label=run["rule"])
        axis.axhline(100 * comparison["centralized"], color="black", linestyle="--", label="centralized")
        axis.axhline(100 * comparison["alone"], color="gray", linestyle=":", label="each client alone")
        axis.set_title(f"{task}, {partition}")
        axis.set_xlabel("round")
        axis.set_ylabel("client held-out accuracy (%)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
