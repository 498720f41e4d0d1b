"""Training step time and memory of every method: peftkit against Hugging Face peft and full fine-tuning.

    python benchmarks/methods_step_time.py                       # every method, minilm, batch 32 x 64 tokens
    python benchmarks/methods_step_time.py --methods lora,ia3 --rounds 9

Each method uses the config `peftkit train --method NAME` uses (`METHOD_DEFAULTS`); where peft has
the method, peft gets the very same config (same field values, its own config class of the same
name) and the model is built the same way. One process times all variants in interleaved rounds
(the machine is shared and noisy: each figure is the median over rounds, and every ratio is the
median of per-round ratios, so variants compared ran back to back). A step is forward, backward,
AdamW step and zero_grad, plus the method's own per-step work (AdaLoRA's rank update) where it has
one. Training memory is measured in a fresh subprocess per variant: peak RSS growth over the same
steps after loading the model (activations, gradients, optimizer state).

Target (issue 3): each method's step time at most that of the same method in peft (ratio <= 1.00).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_step_time import _status_mb, interleaved_step_times, make_batch  # noqa: E402


def has_peft_twin(config) -> bool:
    import peft

    return hasattr(peft, type(config).__name__) and type(config).__name__ not in {"BitFitConfig", "FreezeConfig", "FullFinetuneConfig"}


def peft_config_for(config):
    """peft's config of the same name with the same field values, or None where peft lacks the method."""
    import peft

    if not has_peft_twin(config):
        return None
    cls = getattr(peft, type(config).__name__)
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.to_dict().items() if k in known and k != "peft_type"}
    return cls(**values)


def build(variant: str, args, total_steps: int):
    """(model, optimizer, per-step hook, trainable count) for "peftkit:M", "peft:M" or "full"."""
    from peftkit import zoo
    from peftkit.train.job import method_config

    torch.manual_seed(0)
    model, _ = zoo.load_classifier(args.model, num_labels=2, seed=0)
    hook = None
    batch = make_batch(args)
    if variant != "full":
        library, method = variant.split(":")
        config = method_config(method)
        if _needs_total_step(config):
            # AdaLoRA's schedule in whole steps for both libraries (peftkit also takes shares of the run).
            steps = {k: round(getattr(config, k) * total_steps) if isinstance(getattr(config, k), float) else getattr(config, k)
                     for k in ("tinit", "tfinal")}
            config = config.replace(total_step=total_steps, **steps)
        if library == "peftkit":
            import peftkit

            model = peftkit.get_peft_model(model, config)
            model.prepare_training([batch])
            hook = model.on_optimizer_step
        else:
            import peft

            if getattr(config, "target_modules", "unset") is None:
                # Where peft has no default targets for this model (LN tuning on BERT), give it the ones
                # peftkit resolved, so both train the same modules.
                import peftkit

                probe, _ = zoo.load_classifier(args.model, num_labels=2, seed=0)
                config = peftkit.get_peft_model(probe, config).peft_config["default"]
                del probe
            model = peft.get_peft_model(model, peft_config_for(config))
            if hasattr(model.base_model, "update_and_allocate"):  # AdaLoRA: peft's documented per-step call
                hook = lambda step, total: model.base_model.update_and_allocate(step)  # noqa: E731
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    return model, optimizer, hook, sum(p.numel() for p in parameters)


def _needs_total_step(config) -> bool:
    return "total_step" in {f.name for f in dataclasses.fields(config)}


class Runner:
    def __init__(self, variant, args, total_steps):
        self.model, self.optimizer, self.hook, self.trainable = build(variant, args, total_steps)
        self.step_count = 0
        self.total_steps = total_steps

    def step(self, batch):
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        if self.hook is not None:
            self.hook(self.step_count, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)


def measure_memory(variant: str, args) -> None:
    """In a fresh subprocess: print JSON with the peak RSS growth during training (MiB)."""
    runner = Runner(variant, args, total_steps=1000)
    batch = make_batch(args)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    loaded = _status_mb("VmRSS")
    for _ in range(args.memory_steps):
        runner.step(batch)
    print(json.dumps({"variant": variant, "training_mb": _status_mb("VmHWM") - loaded}))


def main() -> int:
    from peftkit.train.job import list_methods, method_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(m for m in list_methods() if m != "full"))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.memory_only:
        measure_memory(args.memory_only, args)
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "full"]
    variants = ["full"]
    for method in methods:
        variants.append(f"peftkit:{method}")
        if has_peft_twin(method_config(method)):
            variants.append(f"peft:{method}")
    total_steps = 1 + args.rounds * args.steps_per_round
    runners = {}
    for variant in variants:
        try:
            runners[variant] = Runner(variant, args, total_steps)
        except Exception as error:  # a method peft cannot build on this model is reported, not fatal
            print(f"{variant}: could not build ({type(error).__name__}: {error})", flush=True)
    batch = make_batch(args)
    times = interleaved_step_times({v: (lambda r=r: r.step(batch)) for v, r in runners.items()},
                                   args.rounds, args.steps_per_round)
    trainable = {v: r.trainable for v, r in runners.items()}
    del runners

    memory = {}
    for variant in times:
        command = [sys.executable, __file__, "--memory-only", variant, "--model", args.model, "--batch-size",
                   str(args.batch_size), "--seq-len", str(args.seq_len), "--memory-steps", str(args.memory_steps)]
        result = subprocess.run(command, capture_output=True, text=True)
        memory[variant] = json.loads(result.stdout.strip().splitlines()[-1])["training_mb"] if result.returncode == 0 else None

    def ratio(variant: str, reference: str) -> float | None:
        if reference not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[variant], times[reference]))

    import peft

    lines = [
        f"{args.model}, batch {args.batch_size} x {args.seq_len} tokens, AdamW, each method's `peftkit train` default config "
        f"(peft given the same config); median of {args.rounds} interleaved rounds of {args.steps_per_round} steps; "
        f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads. Ratios are medians of "
        "per-round ratios. Training memory = peak RSS growth over the steps after loading, fresh process per variant.",
        "",
        "| method | trainable params | peftkit step | peft step | peftkit / peft | peftkit / full FT | peftkit memory | peft memory | full FT memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows, verdicts = [], []
    for method in methods:
        ours, theirs = f"peftkit:{method}", f"peft:{method}"
        if ours not in times:
            continue
        row = {
            "method": method, "trainable_parameters": trainable[ours],
            "peftkit_step_s": statistics.median(times[ours]),
            "peft_step_s": statistics.median(times[theirs]) if theirs in times else None,
            "vs_peft": ratio(ours, theirs), "vs_full": ratio(ours, "full"),
            "peftkit_memory_mb": memory.get(ours), "peft_memory_mb": memory.get(theirs), "full_memory_mb": memory.get("full"),
        }
        rows.append(row)

        def ms(value):
            return "" if value is None else f"{1000 * value:.0f} ms"

        def mb(value):
            return "" if value is None else f"{value:.0f} MiB"

        def x(value):
            return "n/a" if value is None else f"{value:.2f}x"

        lines.append(f"| {method} | {row['trainable_parameters']:,d} | {ms(row['peftkit_step_s'])} | "
                     f"{ms(row['peft_step_s']) or 'no peft method'} | {x(row['vs_peft'])} | {x(row['vs_full'])} | "
                     f"{mb(row['peftkit_memory_mb'])} | {mb(row['peft_memory_mb'])} | {mb(row['full_memory_mb'])} |")
        if row["vs_peft"] is not None:
            verdicts.append(f"- {'PASS' if row['vs_peft'] <= 1.0 else 'FAIL'}: {method} step {row['vs_peft']:.3f}x peft (median of per-round ratios)")
    markdown = "\n".join(lines + [""] + verdicts)
    print("\n" + markdown)
    if args.json:
        command = "python benchmarks/methods_step_time.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        Path(args.json).write_text(json.dumps({"command": command, "measured_at": time.strftime("%Y-%m-%d"),
                                               "markdown": markdown, "rows": rows, "times": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
