"""How training cost grows with model size, 135M to 7B here (projected to 70B), and the estimate against it.

    python benchmarks/scaling.py --json benchmarks/results/scaling.json --plot benchmarks/results/scaling.png
    python benchmarks/scaling.py --runtime            # the runtime constant of peftkit.estimate (RUNTIME_BYTES)
    python benchmarks/scaling.py --loading smollm2-1.7b   # low-memory NF4 loading: peak RSS / loaded model

Models (Llama architecture, real shapes): smollm2 (SmolLM2-135M-Instruct) with its real weights, and
SmolLM2-360M, SmolLM2-1.7B, Llama-3.2-3B and Llama-2-7B built from their published configs (benchmarks/configs/,
sources in its README) with random weights: memory and time do not depend on the values, and no
accuracy is reported for them. Methods: full fine-tuning, LoRA r=16 (alpha 32, all linear layers) on a
float32 base, LoRA on an NF4 base, LoRA on NF4 with gradient checkpointing.

Each row is one fresh child process (run one after the other): it loads the model layer by layer
(`peftkit.loading.load_model_layerwise`; NF4 layers quantized as they are made), wraps it with the method,
and trains W warm-up + N timed steps (causal LM loss on random token ids, batch x length tokens, AdamW,
gradient clipping at 1.0, as `peftkit train` steps). Peak RSS is the child's whole-life high-water mark
(the kernel's ru_maxrss from wait4; loading included). Step time is the median of the timed steps. CPU
time and energy are for all steps (codecarbon estimate: this machine has no power counters, so it is TDP x
load). Before a row starts, `peftkit.estimate` predicts its peak; a row whose prediction exceeds the memory
available (less a reserve for the other users of this machine) is not started, and says so. The
estimate/measured ratio is printed for every row that ran (target: within 15%).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from default_job import load_average, write_results_json  # noqa: E402

CONFIGS = HERE / "configs"
MODELS = {  # name -> (source for load_model_layerwise / estimate, weights)
    "smollm2": ("smollm2", "real"),
    "smollm2-360m": (str(CONFIGS / "smollm2-360m.json"), "random"),
    "smollm2-1.7b": (str(CONFIGS / "smollm2-1.7b.json"), "random"),
    "llama-3.2-3b": (str(CONFIGS / "llama-3.2-3b.json"), "random"),
    "llama-2-7b": (str(CONFIGS / "llama-2-7b.json"), "random"),  # float LoRA and full are refused by the estimate here
}
PROJECTED = {name: str(CONFIGS / f"{name}.json") for name in ("llama-2-7b", "llama-2-13b", "llama-2-70b")}
SETTINGS = {  # name -> (method, quantize, gradient checkpointing)
    "full": ("full", None, False),
    "lora": ("lora", None, False),
    "lora-nf4": ("lora", "nf4", False),
    "lora-nf4-gc": ("lora", "nf4", True),
}
LORA = {"r": 16, "lora_alpha": 32}
RESERVE_BYTES = 4 * 2**30  # left to the other users of this shared machine when deciding whether a row may start


def options_of(method: str) -> dict | None:
    return dict(LORA) if method == "lora" else None


def vm_status(field: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS (Linux)
        handle.write("5")


# --------------------------------------------------------------------------- children


def child_train(model_name: str, setting: str, batch_size: int, length: int, warmup: int, steps: int) -> dict:
    """One row: load, wrap, train; returns what it measured."""
    import torch

    from peftkit.loading import load_model_layerwise
    from peftkit.model import get_peft_model
    from peftkit.quantize import QuantizedLinear
    from peftkit.registry import causal_method_config
    from peftkit.train.loop import gradient_checkpointing
    from peftkit.train.measure import ResourceMeter

    torch.manual_seed(0)
    method, quantize, checkpointing = SETTINGS[setting]
    source, _ = MODELS.get(model_name, (model_name, "random"))
    started = time.perf_counter()
    base, report = load_model_layerwise(source, quantize)
    load_s = time.perf_counter() - started
    wrapped = get_peft_model(base, causal_method_config(method, **(options_of(method) or {})))
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5 if method == "full" else 2e-4)
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    times = []
    meter = ResourceMeter()
    wrapped.train()
    with gradient_checkpointing(wrapped, checkpointing):
        meter.start()
        for index in range(warmup + steps):
            step_started = time.perf_counter()
            loss = wrapped(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index >= warmup:
                times.append(time.perf_counter() - step_started)
        resources = meter.stop()
    result = {"load_s": load_s, "model_bytes": report.model_bytes, "step_times_s": times,
              "trainable_parameters": sum(p.numel() for p in trainable),
              "parameters": sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
              + sum(m.in_features * m.out_features for m in base.modules() if isinstance(m, QuantizedLinear)),
              "steps_metered": warmup + steps, **resources}
    if quantize:
        result["dequantize_s_per_step"] = dequantize_seconds(wrapped) * (3 if checkpointing else 2)
    return result


def dequantize_seconds(model) -> float:
    """Seconds to dequantize every quantized layer once (a training step does it in forward and backward,
    and once more in the recomputed forward with gradient checkpointing)."""
    import torch

    from peftkit.quantize import quantized_layers

    started = time.perf_counter()
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.dequantize(torch.float32)
    return time.perf_counter() - started


def child_loading(model_name: str, quantize: str | None) -> dict:
    """Low-memory loading: RSS before, peak while loading, and the loaded model's own bytes."""
    from peftkit.loading import load_model_layerwise

    source, weights = MODELS.get(model_name, (model_name, "random"))
    before = vm_status("VmRSS")
    reset_peak()
    started = time.perf_counter()
    _, report = load_model_layerwise(source, quantize)
    seconds = time.perf_counter() - started
    peak = vm_status("VmHWM")
    return {"model": model_name, "weights": weights, "quantize": quantize, "rss_before_bytes": before,
            "peak_rss_bytes": peak, "loading_growth_bytes": peak - before, "model_bytes": report.model_bytes,
            "peak_growth_over_model": (peak - before) / report.model_bytes, "seconds": seconds}


def child_runtime() -> dict:
    """The runtime constant: a training child's peak RSS with a model too small to matter."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps({**config.to_dict(), "architectures": ["LlamaForCausalLM"]}))
        MODELS["runtime-probe"] = (str(path), "random")
        child_train("runtime-probe", "lora", 1, 256, 1, 2)
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# --------------------------------------------------------------------------- the parent


def run_child(arguments: list[str], log: Path) -> tuple[dict | None, float, int]:
    from peftkit.bench.compare import run_measured

    output = log.with_suffix(".json")
    output.unlink(missing_ok=True)
    wall, peak_mib, code = run_measured([sys.executable, __file__, *arguments, "--child-output", str(output)], log)
    result = json.loads(output.read_text()) if code == 0 and output.is_file() else None
    return result, peak_mib, code


def estimate_row(model_name: str, setting: str, batch_size: int, length: int):
    from peftkit.estimate import estimate_training_memory

    method, quantize, checkpointing = SETTINGS[setting]
    return estimate_training_memory(MODELS[model_name][0], method, quantize=quantize, batch_size=batch_size,
                                    max_length=length, gradient_checkpointing=checkpointing,
                                    method_options=options_of(method))


def reestimate(row: dict) -> dict:
    """A measured row with the current `peftkit.estimate` (the measurement does not depend on it)."""
    estimate = estimate_row(row["model"], row["setting"], row["batch_size"], row["length"])
    row.update(estimate=estimate.to_dict(), estimate_bytes=estimate.peak_bytes)
    if row["status"] == "ok":
        row["ratio"] = estimate.peak_bytes / row["peak_rss_bytes"]
    return row


def measure_row(model_name: str, setting: str, args, workdir: Path) -> dict:
    from peftkit.estimate import available_memory_bytes

    source, weights = MODELS[model_name]
    estimate = estimate_row(model_name, setting, args.batch_size, args.length)
    row = {"model": model_name, "weights": weights, "setting": setting, "batch_size": args.batch_size, "length": args.length,
           "estimate": estimate.to_dict(), "estimate_bytes": estimate.peak_bytes, "parameters": estimate.total_parameters,
           "trainable_parameters": estimate.trainable_parameters}
    available = available_memory_bytes()
    if estimate.peak_bytes > available - RESERVE_BYTES:
        row.update(status="not run", reason=f"estimate {estimate.peak_bytes / 2**30:.1f} GiB > {available / 2**30:.1f} GiB "
                   f"available less a {RESERVE_BYTES / 2**30:.0f} GiB reserve")
        return row
    big = estimate.total_parameters > 1e9
    warmup, steps = (min(1, args.warmup), min(3, args.steps)) if big else (args.warmup, args.steps)
    log = workdir / f"{model_name}-{setting}.log"
    row["load_average_before"] = load_average()
    result, peak_mib, code = run_child(["--child", model_name, setting, "--batch-size", str(args.batch_size), "--length",
                                        str(args.length), "--warmup", str(warmup), "--steps", str(steps)], log)
    if result is None:
        row.update(status="failed", reason=f"exit code {code}; see {log}")
        return row
    median = statistics.median(result["step_times_s"])
    metered = result["steps_metered"]
    row.update(status="ok", peak_rss_bytes=int(peak_mib * 2**20), step_time_s=median,
               tokens_per_s=args.batch_size * args.length / median, ratio=estimate.peak_bytes / (peak_mib * 2**20),
               cpu_seconds_per_step=result["cpu_seconds"] / metered,
               energy_j_per_step=None if result["energy_kwh"] is None else result["energy_kwh"] * 3.6e6 / metered,
               energy_note=result["energy_note"], warmup_steps=warmup, timed_steps=steps, load_s=result["load_s"],
               step_times_s=result["step_times_s"], dequantize_s_per_step=result.get("dequantize_s_per_step"),
               trainable_parameters=result["trainable_parameters"])
    return row


def projection(args) -> list[dict]:
    """The estimate for 7B, 13B and 70B Llama-2 shapes (float32 and bf16 weights), and LoRA configurations of 7B."""
    import torch

    from peftkit.estimate import estimate_training_memory

    rows = []
    for name, source in PROJECTED.items():
        for setting, (method, quantize, checkpointing) in SETTINGS.items():
            for dtype in (torch.float32, torch.bfloat16):
                estimate = estimate_training_memory(source, method, quantize=quantize, batch_size=args.batch_size,
                                                    max_length=args.length, gradient_checkpointing=checkpointing,
                                                    method_options=options_of(method), dtype=dtype, available_bytes=0)
                rows.append({"model": name, "setting": setting, "dtype": str(dtype).removeprefix("torch."),
                             "parameters": estimate.total_parameters, "trainable_parameters": estimate.trainable_parameters,
                             "peak_bytes": estimate.peak_bytes,
                             "without_runtime_bytes": estimate.peak_bytes - estimate.runtime_bytes,
                             "parts": estimate.to_dict()})
    return rows


LORA_7B_CHOICES = (
    ("r=8 on q_proj,v_proj (the LoRA paper's, peft's default for Llama)", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("r=16 on q_proj,v_proj", {"r": 16, "target_modules": ["q_proj", "v_proj"]}),
    ("r=8 on q,k,v,o_proj", {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    ("r=4 on all linear layers", {"r": 4, "target_modules": "all-linear"}),
    ("r=16 on all linear layers", {"r": 16, "target_modules": "all-linear"}),
)


def lora_7b_choices() -> list[dict]:
    from peftkit.estimate import estimate_training_memory

    rows = []
    for label, options in LORA_7B_CHOICES:
        estimate = estimate_training_memory(PROJECTED["llama-2-7b"], "lora", method_options=options, available_bytes=0)
        rows.append({"lora": label, "options": options, "trainable_parameters": estimate.trainable_parameters})
    return rows


def gib(count) -> str:
    return "" if count is None else f"{count / 2**30:,.2f} GiB"


def print_tables(rows, projected, choices) -> str:
    lines = ["| model | weights | setting | parameters | trainable | peak RSS | step time | tokens/s | estimate | "
             "estimate / measured | CPU s / step | energy / step (estimate) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['weights']} | {row['setting']} | {row['parameters']:,d} | "
                         f"{row['trainable_parameters']:,d} | {row['status']}: {row.get('reason', '')} | | | "
                         f"{gib(row['estimate_bytes'])} | | | |")
            continue
        energy = "" if row["energy_j_per_step"] is None else f"{row['energy_j_per_step']:,.0f} J"
        lines.append(f"| {row['model']} | {row['weights']} | {row['setting']} | {row['parameters']:,d} | "
                     f"{row['trainable_parameters']:,d} | {gib(row['peak_rss_bytes'])} | {row['step_time_s']:.2f} s | "
                     f"{row['tokens_per_s']:.0f} | {gib(row['estimate_bytes'])} | {row['ratio']:.2f} | "
                     f"{row['cpu_seconds_per_step']:.1f} | {energy} |")
    lines += ["", "| model | setting | weights dtype | parameters | trainable | predicted peak | without the CPU runtime |",
              "|---|---|---|---:|---:|---:|---:|"]
    for row in projected:
        lines.append(f"| {row['model']} | {row['setting']} | {row['dtype']} | {row['parameters']:,d} | "
                     f"{row['trainable_parameters']:,d} | {gib(row['peak_bytes'])} | {gib(row['without_runtime_bytes'])} |")
    lines += ["", "| LoRA on llama-2-7b | trainable parameters |", "|---|---:|"]
    lines += [f"| {c['lora']} | {c['trainable_parameters']:,d} |" for c in choices]
    text = "\n".join(lines)
    print(text)
    return text


def plot(rows, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for setting in SETTINGS:
        done = sorted((r for r in rows if r["setting"] == setting and r["status"] == "ok"), key=lambda r: r["parameters"])
        if not done:
            continue
        line, = axes.plot([r["parameters"] for r in done], [r["peak_rss_bytes"] / 2**30 for r in done], "o-", label=setting)
        predicted = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["parameters"])
        axes.plot([r["parameters"] for r in predicted], [r["estimate_bytes"] / 2**30 for r in predicted], "x--",
                  color=line.get_color(), alpha=0.6)
    axes.set_xscale("log")
    axes.set_yscale("log")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    axes.axhline(memory, color="grey", linestyle=":", label=f"this machine's memory ({memory:.0f} GiB)")
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1e9:g}B" if x >= 1e9 else f"{x / 1e6:g}M"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xticks([135e6, 360e6, 1.7e9, 3.2e9, 6.7e9])
    axes.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    axes.set_xlabel("parameters")
    axes.set_ylabel("peak RSS (GiB)")
    axes.set_title("Training peak memory against model size (CPU, batch 1 x 256 tokens)\n"
                   "solid: measured; dashed, x: peftkit estimate (x alone: not run, would not fit)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--runtime", action="store_true", help="measure the runtime constant")
    parser.add_argument("--from-rows", default=None, metavar="ROWS.jsonl",
                        help="measure nothing: the rows.jsonl of an earlier run, estimated again, to the table, --json and --plot")
    parser.add_argument("--loading", default=None, help="measure low-memory loading of this model (NF4 and int8)")
    parser.add_argument("--loading-formats", default="nf4,int8")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-loading", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-runtime", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    if args.child or args.child_loading or args.child_runtime:
        if args.child:
            result = child_train(*args.child, args.batch_size, args.length, args.warmup, args.steps)
        elif args.child_loading:
            result = child_loading(args.child_loading[0], None if args.child_loading[1] == "none" else args.child_loading[1])
        else:
            result = child_runtime()
        Path(args.child_output).write_text(json.dumps(result))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="peftkit-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.runtime:
        result, peak_mib, code = run_child(["--child-runtime"], workdir / "runtime.log")
        print(f"runtime: peak RSS of a training child with a negligible model: {peak_mib:,.0f} MiB (exit {code})")
        return code
    if args.loading:
        for quantize in args.loading_formats.split(","):
            result, peak_mib, code = run_child(["--child-loading", args.loading, quantize], workdir / f"loading-{quantize}.log")
            if result is None:
                print(f"{args.loading} {quantize}: failed (exit {code})")
                continue
            print(f"{args.loading} ({result['weights']} weights) {quantize}: RSS before {gib(result['rss_before_bytes'])}, "
                  f"peak while loading {gib(result['peak_rss_bytes'])} (+{gib(result['loading_growth_bytes'])}), loaded model "
                  f"{gib(result['model_bytes'])}: growth / model = {result['peak_growth_over_model']:.3f} "
                  f"(whole-process peak / model = {result['peak_rss_bytes'] / result['model_bytes']:.3f}), {result['seconds']:.0f} s")
            if args.json:
                existing = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
                existing.setdefault("loading", {})[f"{args.loading}-{quantize}"] = result
                write_results_json(args.json, existing)
        return 0

    rows = []
    if args.from_rows:
        rows = [reestimate(json.loads(line)) for line in Path(args.from_rows).read_text().splitlines() if line.strip()]
    for model_name in [] if args.from_rows else args.models.split(","):
        for setting in args.settings.split(","):
            row = measure_row(model_name, setting, args, workdir)
            rows.append(row)
            with open(workdir / "rows.jsonl", "a") as partial:  # what finished survives an interrupted run
                partial.write(json.dumps(row) + "\n")
            shown = {k: row.get(k) for k in ("model", "setting", "status", "reason", "peak_rss_bytes", "estimate_bytes",
                                             "ratio", "step_time_s", "energy_j_per_step", "dequantize_s_per_step")}
            print(json.dumps(shown), flush=True)
    # The 7B-70B projection (a minute or two of meta-device estimates) goes with the results file.
    projected, choices = (projection(args), lora_7b_choices()) if args.json else ([], [])
    markdown = print_tables(rows, projected, choices)
    if args.plot:
        plot(rows, Path(args.plot))
    if args.json:
        existing = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        command = "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if args.from_rows:  # the rows were measured by the earlier command; this one estimated them again
            existing["measured_by"] = existing.get("measured_by") or existing.get("command")
        existing.update({
            "command": command,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "rows": rows, "projection": projected, "lora_7b": choices, "markdown": markdown,
        })
        write_results_json(args.json, existing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
