"""LoRA training step time and peak memory: peftkit against Hugging Face peft and full fine-tuning.

    python benchmarks/lora_step_time.py            # minilm, LoRA r=8 on query,value, batch 32, 64 tokens

One process times all variants in interleaved rounds (the machine is shared and noisy, so each
variant's figure is the median over rounds, and ratios come from the same run). Peak memory is
measured separately, one fresh subprocess per variant, as the resident-set high-water mark after the
same training steps, minus the process's size right after loading the model (so it counts
activations, gradients and optimizer state, not the weights shared by all variants).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("peftkit-lora", "peft-lora", "full")


def build(variant: str, args):
    from peftkit import zoo

    model, _ = zoo.load_classifier(args.model, num_labels=2, seed=0)
    if variant == "peftkit-lora":
        import peftkit

        model = peftkit.get_peft_model(model, peftkit.LoraConfig(
            r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=args.targets, task_type="SEQ_CLS"))
    elif variant == "peft-lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=args.targets, task_type="SEQ_CLS"))
    elif variant != "full":
        raise SystemExit(f"unknown variant {variant}")
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    return model, optimizer, sum(p.numel() for p in parameters)


def make_batch(args):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def interleaved_step_times(steps: dict, rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each variant, one figure per round: every variant runs once (warm-up), then
    each round runs every variant's `steps_per_round` steps in turn, so all see the same machine load."""
    for run_step in steps.values():  # warm up allocators and kernels
        run_step()
    times: dict[str, list[float]] = {variant: [] for variant in steps}
    for _ in range(rounds):
        for variant, run_step in steps.items():
            started = time.perf_counter()
            for _ in range(steps_per_round):
                run_step()
            times[variant].append((time.perf_counter() - started) / steps_per_round)
    return times


def step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_memory(variant: str, args) -> None:
    """Runs in a fresh subprocess: prints JSON with the peak RSS growth during training (MiB).

    Loading a model briefly needs more memory than holding it, so the kernel's high-water mark is
    reset after loading (writing 5 to /proc/self/clear_refs) and read again after the steps.
    """
    model, optimizer, _ = build(variant, args)
    batch = make_batch(args)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    loaded = _status_mb("VmRSS")
    for _ in range(args.memory_steps):
        step(model, optimizer, batch)
    peak = _status_mb("VmHWM")
    print(json.dumps({"variant": variant, "loaded_mb": loaded, "peak_mb": peak, "training_mb": peak - loaded}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    args.targets = args.targets.split(",")
    torch.manual_seed(0)

    if args.memory_only:
        measure_memory(args.memory_only, args)
        return

    built = {v: build(v, args) for v in VARIANTS}
    batch = make_batch(args)
    times = interleaved_step_times({v: (lambda m=m, o=o: step(m, o, batch)) for v, (m, o, _) in built.items()},
                                   args.rounds, args.steps_per_round)
    trainable = {v: built[v][2] for v in VARIANTS}
    del built

    memory = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--memory-only", variant, "--model", args.model, "--r", str(args.r),
                   "--dropout", str(args.dropout), "--targets", ",".join(args.targets), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--memory-steps", str(args.memory_steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[variant] = json.loads(output.strip().splitlines()[-1])

    medians = {v: statistics.median(times[v]) for v in VARIANTS}

    def ratio(variant: str, reference: str) -> float:
        # Median of per-round ratios: a round's variants ran back to back under the same load.
        return statistics.median(a / b for a, b in zip(times[variant], times[reference]))

    rows = []
    for variant in VARIANTS:
        rows.append({
            "variant": variant,
            "trainable_parameters": trainable[variant],
            "step_s_median": medians[variant],
            "step_vs_peft": ratio(variant, "peft-lora"),
            "step_vs_full": ratio(variant, "full"),
            "training_memory_mb": memory[variant]["training_mb"],
            "peak_rss_mb": memory[variant]["peak_mb"],
        })
    import peft

    lines = [
        f"{args.model}, LoRA r={args.r} (alpha {2 * args.r}, dropout {args.dropout}) on {','.join(args.targets)}, "
        f"batch {args.batch_size} x {args.seq_len} tokens, AdamW; median of {args.rounds} interleaved rounds of "
        f"{args.steps_per_round} steps; torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads. "
        "Ratios are medians of per-round ratios. Training memory = peak RSS growth over the steps after loading "
        "(activations, gradients, optimizer state), in a fresh process per variant.",
        "",
        "| variant | trainable params | step time (median) | vs peft | vs full FT | training memory | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['trainable_parameters']:,d} | {1000 * row['step_s_median']:.0f} ms | "
                     f"{row['step_vs_peft']:.2f}x | {row['step_vs_full']:.2f}x | {row['training_memory_mb']:.0f} MiB | "
                     f"{row['peak_rss_mb']:.0f} MiB |")
    markdown = "\n".join(lines)
    print("\n" + markdown)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": "python benchmarks/lora_step_time.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
                       "measured_at": time.strftime("%Y-%m-%d"), "markdown": markdown,
                       "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "times": times},
                      handle, indent=2)


if __name__ == "__main__":
    main()
