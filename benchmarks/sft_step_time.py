"""Supervised fine-tuning step on smollm2: peftkit LoRA against Hugging Face peft LoRA and full fine-tuning.

    python benchmarks/sft_step_time.py        # smollm2, LoRA r=16 all-linear, batch 8 x 128 tokens, 5 rounds x 3 steps
    python benchmarks/sft_step_time.py --json benchmarks/results/sft_step_time.json
    python benchmarks/sft_step_time.py --variants peftkit-lora,peft-lora --rounds 9

What is measured. One training step of a causal language model (smollm2 = SmolLM2-135M-Instruct,
float32, CPU): forward with labels = input_ids (the causal LM loss), backward, AdamW step, zero_grad,
on one fixed batch of random token ids from the vocabulary (batch 8 x 128 tokens by default). The
variants:

    peftkit-lora      peftkit LoRA r=16, alpha 32, dropout 0, on every attention and MLP projection
                      (q,k,v,o,gate,up,down: target_modules="all-linear")
    peft-lora         Hugging Face peft LoRA with the same config
    full              full fine-tuning (every weight trained)
    peftkit-lora-gc   peftkit-lora with gradient checkpointing on the transformers model
    peft-lora-gc      peft-lora with gradient checkpointing on the transformers model

Gradient checkpointing is `gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
False})` on the underlying transformers model (peftkit: `wrapped.base_model`; peft:
`wrapped.get_base_model()`). Every variant sets `config.use_cache = False`, so no variant builds a
KV cache during training and the only difference the -gc variants make is checkpointing.

Step time: one process builds every variant, runs one warm-up step each, then times them in
interleaved rounds (each round runs --steps steps of every variant back to back). The machine is
shared and noisy, so each figure is the median over rounds, and every ratio is the median of
per-round ratios (the variants compared ran back to back under the same load). "vs peft" compares
with the peft variant with the same gradient-checkpointing setting (full: with peft-lora).

Memory: one fresh subprocess per variant builds it, resets the kernel's resident-set high-water mark
(writing 5 to /proc/self/clear_refs), and runs --memory-steps steps; training memory is the
high-water mark (VmHWM) minus the resident size right after loading (VmRSS), i.e. activations,
gradients and optimizer state, not the weights every variant shares. (transformers memory-maps the
weights file, so every weight is read once right after loading, before the baseline is taken.)

Targets (issue 4): peftkit-lora step time <= 0.90x peft-lora; peftkit-lora training memory <= peft-lora's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import write_results_json  # noqa: E402
from lora_step_time import _status_mb, interleaved_step_times  # noqa: E402

VARIANTS = ("peftkit-lora", "peft-lora", "full", "peftkit-lora-gc", "peft-lora-gc")
STEP_TARGET = 0.90  # peftkit-lora step time / peft-lora step time


def build(variant: str, args):
    """(model to call, optimizer, trainable parameter count) for one variant."""
    from peftkit import zoo

    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; pick from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model, _ = zoo.load_causal_lm(args.model, seed=0)
    fault_in(model)
    model.config.use_cache = False
    library = variant.split("-")[0]
    if library == "peftkit":
        import peftkit

        wrapped = peftkit.get_peft_model(model, peftkit.LoraConfig(
            r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        base = wrapped.base_model
    elif library == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
        base = wrapped.get_base_model()
    else:
        wrapped = base = model
    assert base is model
    if variant.endswith("-gc"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped.train()
    parameters = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    return wrapped, optimizer, sum(p.numel() for p in parameters)


def fault_in(model) -> None:
    """Read every weight once, so that the model is resident before anything is measured.

    transformers maps safetensors files into memory: right after loading, the weights are mapped but
    not yet read, so the process's resident size does not count them, and the first forward pass
    reads them from the file. Without this, "training memory" would include the weights themselves
    (about 513 MiB for smollm2) and the first timed step would pay for reading them.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def make_batch(args, vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_memory(variant: str, args) -> None:
    """In a fresh subprocess: print JSON with the peak RSS growth during training (MiB)."""
    model, optimizer, _ = build(variant, args)
    batch = make_batch(args, model.config.vocab_size)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    loaded = _status_mb("VmRSS")
    for _ in range(args.memory_steps):
        step(model, optimizer, batch)
    peak = _status_mb("VmHWM")
    print(json.dumps({"variant": variant, "loaded_mb": loaded, "peak_mb": peak, "training_mb": peak - loaded}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha is 2r)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps run in each memory subprocess")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    if args.memory_only:
        measure_memory(args.memory_only, args)
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; pick from {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in variants]  # fixed order, no duplicates

    started_at = time.perf_counter()
    built = {v: build(v, args) for v in variants}
    vocab_size = next(iter(built.values()))[0].config.vocab_size
    batch = make_batch(args, vocab_size)
    times = interleaved_step_times({v: (lambda m=m, o=o: step(m, o, batch)) for v, (m, o, _) in built.items()},
                                   args.rounds, args.steps)
    trainable = {v: built[v][2] for v in variants}
    del built
    timing_s = time.perf_counter() - started_at

    memory = {}
    for variant in variants:
        command = [sys.executable, __file__, "--memory-only", variant, "--model", args.model, "--r", str(args.r),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--memory-steps", str(args.memory_steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[variant] = json.loads(output.strip().splitlines()[-1])
    memory_s = time.perf_counter() - started_at - timing_s

    def ratio(variant: str, reference: str) -> float | None:
        # Median of per-round ratios: a round's variants ran back to back under the same load.
        if variant not in times or reference not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[variant], times[reference]))

    def peft_twin(variant: str) -> str:
        return "peft-lora-gc" if variant.endswith("-gc") else "peft-lora"

    def x(value):
        return "n/a" if value is None else f"{value:.2f}x"

    rows = []
    for variant in variants:
        rows.append({
            "variant": variant,
            "trainable_parameters": trainable[variant],
            "step_s_median": statistics.median(times[variant]),
            "step_vs_peft": ratio(variant, peft_twin(variant)),
            "step_vs_full": ratio(variant, "full"),
            "training_memory_mb": memory[variant]["training_mb"],
            "peak_rss_mb": memory[variant]["peak_mb"],
        })
    import peft

    lines = [
        f"{args.model} (float32, CPU), causal LM loss (labels = input_ids) on random token ids, batch {args.batch_size} x "
        f"{args.seq_len} tokens, AdamW; LoRA r={args.r} (alpha {2 * args.r}, dropout 0) on all-linear "
        "(q,k,v,o,gate,up,down); -gc = gradient checkpointing (non-reentrant); use_cache off in every variant. "
        f"Median of {args.rounds} interleaved rounds of {args.steps} steps after 1 warm-up step; torch {torch.__version__}, "
        f"peft {peft.__version__}, {torch.get_num_threads()} threads. Ratios are medians of per-round ratios; \"vs peft\" "
        "compares with the peft variant with the same checkpointing setting. Training memory = peak RSS growth over "
        f"{args.memory_steps} steps after loading (activations, gradients, optimizer state), in a fresh process per variant.",
        "",
        "| variant | trainable params | step time (median) | vs peft | vs full FT | training memory | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['trainable_parameters']:,d} | {row['step_s_median']:.2f} s | "
                     f"{x(row['step_vs_peft'])} | {x(row['step_vs_full'])} | {row['training_memory_mb']:.0f} MiB | "
                     f"{row['peak_rss_mb']:.0f} MiB |")

    checkpointing = []
    for plain in ("peftkit-lora", "peft-lora"):
        gc = plain + "-gc"
        if plain in times and gc in times:
            without, with_gc = memory[plain]["training_mb"], memory[gc]["training_mb"]
            checkpointing.append({
                "variant": plain, "memory_without_mb": without, "memory_with_mb": with_gc,
                "memory_saved_mb": without - with_gc,
                "memory_saved_share": (without - with_gc) / without if without > 0 else None,
                "time_ratio": ratio(gc, plain),
            })
    if checkpointing:
        lines += ["", "Gradient checkpointing: training memory and step time with it against without (same library).", "",
                  "| LoRA | training memory without | with | saved | step time with / without |",
                  "|---|---:|---:|---:|---:|"]
        for c in checkpointing:
            share = "" if c["memory_saved_share"] is None else f" ({100 * c['memory_saved_share']:.0f}%)"
            lines.append(f"| {c['variant']} | {c['memory_without_mb']:.0f} MiB | {c['memory_with_mb']:.0f} MiB | "
                         f"{c['memory_saved_mb']:.0f} MiB{share} | {x(c['time_ratio'])} |")

    verdicts = []
    if "peftkit-lora" in times and "peft-lora" in times:
        step_ratio = ratio("peftkit-lora", "peft-lora")
        per_round = [a / b for a, b in zip(times["peftkit-lora"], times["peft-lora"])]
        verdicts.append(f"- {'PASS' if step_ratio <= STEP_TARGET else 'FAIL'}: peftkit-lora step time {step_ratio:.2f}x "
                        f"peft-lora (target <= {STEP_TARGET:.2f}x; per-round {min(per_round):.2f}x to {max(per_round):.2f}x)")
        ours, theirs = memory["peftkit-lora"]["training_mb"], memory["peft-lora"]["training_mb"]
        verdicts.append(f"- {'PASS' if ours <= theirs else 'FAIL'}: peftkit-lora training memory {ours:.0f} MiB against "
                        f"peft-lora {theirs:.0f} MiB (target <= peft)")
    markdown = "\n".join(lines + ([""] + verdicts if verdicts else []))
    print("\n" + markdown)
    print(f"\n(timing {timing_s:.0f} s, memory subprocesses {memory_s:.0f} s)", file=sys.stderr)
    if args.json:
        write_results_json(args.json, {
            "command": "python benchmarks/sft_step_time.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
            "measured_at": time.strftime("%Y-%m-%d"), "markdown": markdown,
            "settings": {k: v for k, v in vars(args).items() if k not in {"json", "memory_only"}},
            "rows": rows, "gradient_checkpointing": checkpointing, "times": times, "memory": memory,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
