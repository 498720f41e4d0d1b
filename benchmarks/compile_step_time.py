"""torch.compile and LoRA training steps: compiled against eager step time, peftkit (fused and unfused) and peft.

    python benchmarks/compile_step_time.py        # minilm, LoRA r=8 on every linear layer, batch 16 x 128, 2 threads

Each variant is one model; its eager step and its compiled step (torch.compile of forward + loss, the
Inductor backend; backward runs the compiled backward graph; AdamW stays eager) train that same model.
One process times all of them in interleaved rounds (the machine is shared and noisy): the figure of
each is the median over rounds, and each ratio is the median of per-round ratios. "compile" is the
wall time of the first compiled step (tracing and code generation included).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("peftkit-fused", "peftkit-unfused", "peft")


def build(variant: str, args):
    from peftkit import zoo

    model, _ = zoo.load_classifier(args.model, num_labels=2, seed=0)
    settings = dict(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=args.targets, task_type="SEQ_CLS")
    if variant.startswith("peftkit"):
        import peftkit
        from peftkit.methods.lora import set_lora_fused

        model = peftkit.get_peft_model(model, peftkit.LoraConfig(**settings))
        set_lora_fused(model, variant == "peftkit-fused")
    elif variant == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**settings))
    else:
        raise SystemExit(f"unknown variant {variant}")
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(parameters, lr=1e-4), sum(p.numel() for p in parameters)


def make_batch(args):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def make_step(model, optimizer, batch, compiled: bool):
    def loss_of(batch):
        return model(**batch).loss

    loss_fn = torch.compile(loss_of) if compiled else loss_of

    def step():
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", default="query,key,value,dense", help="comma-separated module names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--json", nargs="?", const="benchmarks/results/compile_step_time.json", default=None,
                        help="also write the results to this JSON file (default path: %(const)s)")
    args = parser.parse_args()
    command = "python benchmarks/compile_step_time.py" + ("" if len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:]))
    print(command, flush=True)
    args.targets = args.targets.split(",")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    batch = make_batch(args)
    built = {v: build(v, args) for v in VARIANTS}
    steps, compile_s = {}, {}
    for variant, (model, optimizer, _) in built.items():
        steps[f"{variant} eager"] = make_step(model, optimizer, batch, compiled=False)
        compiled = make_step(model, optimizer, batch, compiled=True)
        started = time.perf_counter()
        compiled()  # compiles
        compile_s[variant] = time.perf_counter() - started
        print(f"{variant}: first compiled step {compile_s[variant]:.1f} s", flush=True)
        steps[f"{variant} compiled"] = compiled
    for run_step in steps.values():  # warm up allocators and kernels
        run_step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, run_step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps_per_round):
                run_step()
            times[name].append((time.perf_counter() - started) / args.steps_per_round)
    load_after = os.getloadavg()

    def ratio(name: str, reference: str) -> float:
        # Median of per-round ratios: a round's steps ran back to back under the same load.
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    rows = []
    for variant in VARIANTS:
        eager, compiled = f"{variant} eager", f"{variant} compiled"
        rows.append({
            "variant": variant, "trainable_parameters": built[variant][2],
            "eager_step_s_median": statistics.median(times[eager]),
            "compiled_step_s_median": statistics.median(times[compiled]),
            "compiled_vs_eager": ratio(compiled, eager),
            "compiled_vs_peft_compiled": ratio(compiled, "peft compiled"),
            "eager_vs_peft_eager": ratio(eager, "peft eager"),
            "first_compiled_step_s": compile_s[variant],
        })
    import peft

    lines = [
        f"{args.model}, LoRA r={args.r} (alpha {2 * args.r}, dropout {args.dropout}) on {','.join(args.targets)}, batch "
        f"{args.batch_size} x {args.seq_len} tokens, AdamW; torch.compile (Inductor) of forward + loss; median of "
        f"{args.rounds} interleaved rounds of {args.steps_per_round} steps; torch {torch.__version__}, peft {peft.__version__}, "
        f"{args.threads} threads; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after. "
        "Ratios are medians of per-round ratios.",
        "",
        "| variant | trainable params | eager step | compiled step | compiled / eager | eager vs peft | compiled vs peft | first compiled step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['trainable_parameters']:,d} | {1000 * row['eager_step_s_median']:.0f} ms | "
                     f"{1000 * row['compiled_step_s_median']:.0f} ms | {row['compiled_vs_eager']:.2f}x | "
                     f"{row['eager_vs_peft_eager']:.2f}x | {row['compiled_vs_peft_compiled']:.2f}x | "
                     f"{row['first_compiled_step_s']:.0f} s |")
    markdown = "\n".join(lines)
    print("\n" + markdown)
    if args.json:
        from peftkit.io import write_json

        write_json(Path(args.json), {
            "command": command, "measured_at": time.strftime("%Y-%m-%d"), "markdown": markdown,
            "load_average": {"before": load_before, "after": load_after},
            "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "times": times})


if __name__ == "__main__":
    main()
