"""Fused LoRA training step: peftkit's FusedLoraLinear against unfused peftkit, Hugging Face peft, full fine-tuning.

    python benchmarks/lora_fused.py                       # minilm and smollm2, dropout 0.0 and 0.1
    python benchmarks/lora_fused.py --models minilm --dropouts 0.1 --rounds 9
    python benchmarks/lora_fused.py --json benchmarks/results/lora_fused.json

What is measured. One training step (forward, backward, AdamW step, zero_grad) on one fixed batch of
random token ids: minilm (sequence classification, 2 labels) at batch 32 x 64 tokens and smollm2
(causal LM loss, labels = input_ids) at batch 8 x 128 tokens, float32 on CPU. LoRA r=8, alpha 16, on
every linear layer (target_modules="all-linear", the same config for peft), lora_dropout 0.0 and 0.1.

    peftkit-fused     peftkit LoRA, fused layer on (the default)
    peftkit-unfused   peftkit LoRA after set_lora_fused(model, False): base layer, then the low-rank path
    peft              Hugging Face peft LoRA, same config
    full              full fine-tuning (every weight trained)

Step time: one process builds all four variants, runs one warm-up step each, then times them in
interleaved rounds (each round runs --steps-per-round steps of every variant back to back), so load
from other jobs on the shared machine hits all of them alike. Figures are medians over rounds and
ratios are medians of per-round ratios.

Activation memory is counted exactly, not from the resident set: during one forward pass every
tensor that autograd saves for backward goes through `torch.autograd.graph.saved_tensors_hooks`, and
the figure is the sum of the sizes of the distinct storages saved, leaving out storages of model
parameters (frozen weights saved by a matmul are the model, not activations).

Where the time goes: one extra step per variant under torch.profiler; the table splits self CPU time
into matrix products (mm, addmm, bmm, attention), dropout random numbers, and everything else.

Targets (issue 6): peftkit-fused step <= 0.75x peft; activation memory <= peft's; fused / full
reported against the arithmetic floor of about 0.6x (a frozen linear layer does two of the three
matrix products of a trained one).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import human_bytes, load_average, write_results_json  # noqa: E402
from lora_step_time import interleaved_step_times  # noqa: E402

VARIANTS = ("peftkit-fused", "peftkit-unfused", "peft", "full")
SHAPES = {"minilm": (32, 64), "smollm2": (8, 128)}
STEP_TARGET = 0.75
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
RNG_OPS = {"aten::bernoulli_", "aten::random_", "aten::uniform_", "aten::native_dropout", "aten::dropout"}


def load_model(model_name: str):
    from peftkit import zoo

    if model_name == "minilm":
        model, _ = zoo.load_classifier("minilm", num_labels=2, seed=0)
        return model, "SEQ_CLS"
    model, _ = zoo.load_causal_lm(model_name, seed=0)
    model.config.use_cache = False
    return model, "CAUSAL_LM"


def build(variant: str, model_name: str, r: int, dropout: float):
    """(model, optimizer, trainable parameter count) for one variant."""
    torch.manual_seed(0)
    model, task_type = load_model(model_name)
    with torch.no_grad():  # read memory-mapped weights now, not in the first timed step
        for tensor in model.parameters():
            tensor.sum()
    lora = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear", task_type=task_type)
    if variant.startswith("peftkit"):
        import peftkit

        model = peftkit.get_peft_model(model, peftkit.LoraConfig(**lora))
        fused = peftkit.set_lora_fused(model, variant == "peftkit-fused")
        assert fused > 0, "no LoRA layer can be fused"
    elif variant == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    elif variant != "full":
        raise SystemExit(f"unknown variant {variant!r}; pick from {', '.join(VARIANTS)}")
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(parameters, lr=1e-4), sum(p.numel() for p in parameters)


def make_batch(model_name: str, model) -> dict:
    batch_size, seq_len = SHAPES[model_name]
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(1000, vocab - 1, (batch_size, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator) if model_name == "minilm" else input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (then runs backward)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # Saved tensors stay alive until backward, so a storage address names one storage here.
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def profile_step(model, optimizer, batch) -> dict:
    """Self CPU milliseconds of one step by kind of op, and the five most expensive ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step(model, optimizer, batch)
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1000
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1000
    rng = sum(e.self_cpu_time_total for e in events if e.key in RNG_OPS) / 1000
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return {"total_ms": total, "matmul_ms": matmul, "dropout_rng_ms": rng, "other_ms": total - matmul - rng,
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in top]}


def run_case(model_name: str, dropout: float, args) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {model_name}, dropout {dropout}: building (load {load_average()})", flush=True)
    built = {variant: build(variant, model_name, args.r, dropout) for variant in VARIANTS}
    batch = make_batch(model_name, built["full"][0])
    activations = {v: saved_activation_bytes(built[v][0], batch) for v in VARIANTS}
    load_before = load_average()
    times = interleaved_step_times({v: (lambda m=m, o=o: step(m, o, batch)) for v, (m, o, _) in built.items()},
                                   args.rounds, args.steps_per_round)
    load_after = load_average()
    profiles = {v: profile_step(built[v][0], built[v][1], batch) for v in VARIANTS} if args.profile else {}
    trainable = {v: built[v][2] for v in VARIANTS}
    del built

    def ratio(variant: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(times[variant], times[reference]))

    rows = [{
        "variant": v, "trainable_parameters": trainable[v], "step_s_median": statistics.median(times[v]),
        "step_vs_peft": ratio(v, "peft"), "step_vs_full": ratio(v, "full"),
        "activation_bytes": activations[v], "activation_vs_peft": activations[v] / activations["peft"],
    } for v in VARIANTS]
    fused = rows[0]
    checks = {
        "step_vs_peft": {"value": fused["step_vs_peft"], "target": STEP_TARGET, "met": fused["step_vs_peft"] <= STEP_TARGET},
        "activation_vs_peft": {"value": fused["activation_vs_peft"], "target": 1.0, "met": fused["activation_vs_peft"] <= 1.0},
        "step_vs_full": {"value": fused["step_vs_full"], "floor": 0.6},
    }
    batch_size, seq_len = SHAPES[model_name]
    case = {"model": model_name, "dropout": dropout, "batch_size": batch_size, "seq_len": seq_len, "rows": rows,
            "times": times, "checks": checks, "profile": profiles, "load_average": [load_before, load_after]}
    print(case_markdown(case), flush=True)
    return case


def case_markdown(case: dict) -> str:
    lines = [
        f"**{case['model']}**, batch {case['batch_size']} x {case['seq_len']} tokens, lora_dropout {case['dropout']}"
        f" (load average before / after timing: {case['load_average'][0]} / {case['load_average'][1]})",
        "",
        "| variant | trainable params | step (median) | vs peft | vs full FT | activation memory | vs peft |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in case["rows"]:
        lines.append(f"| {row['variant']} | {row['trainable_parameters']:,d} | {1000 * row['step_s_median']:.0f} ms | "
                     f"{row['step_vs_peft']:.2f}x | {row['step_vs_full']:.2f}x | {human_bytes(row['activation_bytes'])} | "
                     f"{row['activation_vs_peft']:.2f}x |")
    checks = case["checks"]
    lines += ["",
              f"- {'PASS' if checks['step_vs_peft']['met'] else 'MISS'}: fused step {checks['step_vs_peft']['value']:.3f}x peft "
              f"(target <= {STEP_TARGET}x)",
              f"- {'PASS' if checks['activation_vs_peft']['met'] else 'MISS'}: fused activation memory "
              f"{checks['activation_vs_peft']['value']:.3f}x peft (target <= 1x)",
              f"- fused step {checks['step_vs_full']['value']:.3f}x full fine-tuning (arithmetic floor about 0.6x)"]
    if case["profile"]:
        lines += ["", "| variant | profiled step | matrix products | dropout RNG | other ops | top op |", "|---|---:|---:|---:|---:|---|"]
        for variant, p in case["profile"].items():
            top = p["top_ops"][0]
            lines.append(f"| {variant} | {p['total_ms']:.0f} ms | {p['matmul_ms']:.0f} ms | {p['dropout_rng_ms']:.0f} ms | "
                         f"{p['other_ms']:.0f} ms | {top['op']} {top['self_ms']:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--dropouts", default="0.0,0.1")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (alpha is 2r)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler breakdown")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; pick from {', '.join(SHAPES)}")
    dropouts = [float(d) for d in args.dropouts.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft

    header = (f"LoRA r={args.r}, alpha {2 * args.r}, all-linear; AdamW; median of {args.rounds} interleaved rounds of "
              f"{args.steps_per_round} steps; torch {torch.__version__}, peft {peft.__version__}, "
              f"{torch.get_num_threads()} threads. Ratios are medians of per-round ratios. Activation memory: distinct "
              "non-parameter storages saved for backward in one step (saved_tensors_hooks).")
    print(header, flush=True)
    command = "python benchmarks/lora_fused.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    # Cases of other (model, dropout) pairs already in the JSON file are kept, each with its own command.
    kept = json.loads(Path(args.json).read_text())["cases"] if args.json and Path(args.json).exists() else []
    cases = []
    for model in models:
        for dropout in dropouts:
            case = run_case(model, dropout, args)
            cases.append({**case, "command": command, "measured_at": time.strftime("%Y-%m-%d %H:%M"), "header": header})
            gc.collect()  # the four models of this case go before the next case loads its own
            if args.json:  # after every case, so a long run keeps what it measured
                new_keys = {(c["model"], c["dropout"]) for c in cases}
                all_cases = [c for c in kept if (c["model"], c["dropout"]) not in new_keys] + cases
                all_cases.sort(key=lambda c: (list(SHAPES).index(c["model"]), c["dropout"]))
                write_results_json(args.json, {
                    "markdown": "\n\n".join(f"{c['header']}\n\n{case_markdown(c)}\n\n(`{c['command']}`, {c['measured_at']})"
                                            for c in all_cases),
                    "cases": all_cases})
    print("\n" + "\n\n".join([header, *(case_markdown(c) for c in cases)]))


if __name__ == "__main__":
    main()
