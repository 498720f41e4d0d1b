"""Mixed-adapter batches (issue 5): every example with its own LoRA adapter, against one adapter for all.

    python benchmarks/mixed_batch.py --json benchmarks/results/mixed_batch.json   # both parts, defaults below
    python benchmarks/mixed_batch.py --parts classify --rounds 5                  # minilm only
    python benchmarks/mixed_batch.py --parts generate --new-tokens 16             # smollm2 only

Part "classify" (minilm, float32, CPU, `torch.inference_mode()`): a batch of --batch examples of
--seq-len tokens (random ids, no padding); --adapters distinct LoRA adapters (r=--rank, alpha 2r, every
linear layer but the classifier), lora_A as LoRA initialises it and lora_B random (normal, std 0.02,
seeded) so that they differ; one adapter per example. Examples/s of one forward pass:

    mixed-distinct      MixedLoraModel, a different adapter per example (adapter_ids in shuffled order)
    mixed-single        MixedLoraModel, the same adapter for every example
    peftkit-single      PeftModel with that one adapter active (unmerged)
    peftkit-distinct    PeftModel holding all adapters, called with peft's adapter_names=[...]
    peft-single         Hugging Face peft with one adapter (unmerged)
    peft-distinct       Hugging Face peft holding all adapters, adapter_names=[...]

Part "generate" (smollm2, float32, CPU): --gen-batch prompts of --prompt-len tokens (windows of a fixed
English text, no padding) generate --new-tokens tokens together, greedy, min_new_tokens = max_new_tokens
(every row decodes the same count), KV cache on; --gen-adapters LoRA adapters (r=--gen-rank, alpha 2r on
q, k, v, o, gate, up, down projections), one per row. Generated tokens/s (batch x new tokens / wall time
of one generate call, prefill included) of the same six variants (adapter_names passed to generate).

Before timing, each mixed variant's output is checked against the per-example reference (the
classify logits of each example alone with its adapter in PeftModel, largest difference reported; the
generated tokens of peftkit-distinct and peft-distinct must match mixed-distinct's).

One process builds every variant; the check call of each is its warm-up; then interleaved rounds (each round runs every
variant once, back to back), so machine load hits them alike. Figures are medians over rounds; each
ratio is the median of the per-round ratios. Targets (issue 5): mixed-distinct >= 0.9x single (classify)
and >= 0.7x single (generate), both against peftkit-single; mixed-distinct >= 1.3x peft-distinct
(classify) and >= 2x peft-distinct (generate).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import load_average, write_results_json  # noqa: E402
from generation import make_prompts  # noqa: E402

VARIANTS = ("mixed-distinct", "mixed-single", "peftkit-single", "peftkit-distinct", "peft-single", "peft-distinct")
TARGETS = {  # (part, numerator, denominator): minimum ratio
    ("classify", "mixed-distinct", "peftkit-single"): 0.9,
    ("classify", "mixed-distinct", "peft-distinct"): 1.3,
    ("generate", "mixed-distinct", "peftkit-single"): 0.7,
    ("generate", "mixed-distinct", "peft-distinct"): 2.0,
}
GEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model, config, count: int, root: Path, seed: int) -> dict[str, str]:
    """Save `count` LoRA adapters for `model` (peft layout) under `root`: A as LoRA initialises it, B random."""
    import peftkit

    torch.manual_seed(seed)
    creator = peftkit.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    folders = {}
    for index in range(count):
        with torch.no_grad():
            for name, parameter in creator.named_parameters():
                if "lora_A" in name:
                    torch.nn.init.kaiming_uniform_(parameter, a=5 ** 0.5, generator=generator)
                elif "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        name = f"adapter{index:03d}"
        folders[name] = str(root / name)
        creator.save_pretrained(folders[name])
    creator.unload()
    return folders


def shared_copies(base):
    """A function returning copies of `base` whose modules are new but whose (frozen) weights are `base`'s own,
    so six variants of smollm2 fit in memory beside the adapters."""
    tensors = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return lambda: copy.deepcopy(base, memo=dict(tensors))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_variants(load_base, folders: dict[str, str], variants: list[str]) -> dict:
    """{variant: model}; every variant has its own modules around the same frozen base weights."""
    import peft

    import peftkit
    from peftkit.mixed import MixedLoraModel

    names = list(folders)
    first = names[0]
    built = {}
    for variant in variants:
        if variant.startswith("mixed"):
            model = MixedLoraModel.from_adapter_folders(load_base(), folders if variant == "mixed-distinct" else {first: folders[first]})
        elif variant == "peftkit-single":
            model = peftkit.PeftModel.from_pretrained(load_base(), folders[first])
        elif variant == "peftkit-distinct":
            model = peftkit.PeftModel.from_pretrained(load_base(), folders[first], adapter_name=first)
            for name in names[1:]:
                model.load_adapter(folders[name], adapter_name=name)
        elif variant == "peft-single":
            model = peft.PeftModel.from_pretrained(load_base(), folders[first])
        elif variant == "peft-distinct":
            model = peft.PeftModel.from_pretrained(load_base(), folders[first], adapter_name=first)
            for name in names[1:]:
                model.load_adapter(folders[name], adapter_name=name)
        else:
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        built[variant] = model.eval()
        log(f"built {variant}")
    return built


def selection(variant: str, model, row_names: list[str]) -> dict:
    """The keyword that picks each row's adapter for this variant."""
    if variant == "mixed-distinct":
        return {"adapter_ids": model.adapter_ids(row_names)}
    if variant == "mixed-single":
        return {"adapter_ids": model.adapter_ids([model.adapter_names[0]] * len(row_names))}
    if variant.endswith("distinct"):
        return {"adapter_names": row_names}
    return {}


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one per round, every variant back to back in each round
    (the callers' check runs have warmed every variant up)."""
    times = {variant: [] for variant in calls}
    for _ in range(rounds):
        for variant, call in calls.items():
            started = time.perf_counter()
            call()
            times[variant].append(time.perf_counter() - started)
        log("round done: " + ", ".join(f"{v} {t[-1]:.1f}s" for v, t in times.items()))
    return times


def summarise(part: str, times: dict[str, list[float]], items: int, unit: str) -> dict:
    rates = {v: [items / t for t in ts] for v, ts in times.items()}
    result = {"unit": unit, "items_per_call": items, "median": {v: statistics.median(r) for v, r in rates.items()},
              "per_round": rates, "ratios": {}}
    for (target_part, numerator, denominator), minimum in TARGETS.items():
        if target_part == part and numerator in rates and denominator in rates:
            ratio = statistics.median(a / b for a, b in zip(rates[numerator], rates[denominator]))
            result["ratios"][f"{numerator} / {denominator}"] = {"ratio": ratio, "target": minimum, "met": ratio >= minimum}
    for numerator, denominator in (("peftkit-distinct", "peft-distinct"), ("peft-distinct", "peft-single"),
                                   ("mixed-single", "peftkit-single"), ("peftkit-distinct", "peftkit-single")):
        key = f"{numerator} / {denominator}"
        if numerator in rates and denominator in rates and key not in result["ratios"]:
            ratio = statistics.median(a / b for a, b in zip(rates[numerator], rates[denominator]))
            result["ratios"][key] = {"ratio": ratio, "target": None, "met": None}
    return result


def run_classify(args, root: Path, variants: list[str]) -> dict:
    import peftkit
    from peftkit import zoo

    def load_base():
        model, _ = zoo.load_classifier("minilm", num_labels=2, seed=0)
        return model.eval()

    config = peftkit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    folders = make_adapters(load_base(), config, args.adapters, root / "classify", seed=1)
    log(f"saved {len(folders)} adapters")
    models = build_variants(shared_copies(load_base()), folders, variants)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1000, 20000, (args.batch, args.seq_len), generator=generator)
    order = torch.randperm(args.batch, generator=generator).tolist()
    names = list(folders)
    row_names = [names[order[i] % len(names)] for i in range(args.batch)]
    attention_mask = torch.ones_like(input_ids)

    checks = {}
    with torch.inference_mode():
        reference = {}
        single = models.get("peftkit-single")
        for variant, model in models.items():
            rows = row_names if variant.endswith("distinct") else [names[0]] * args.batch
            logits = model(input_ids=input_ids, attention_mask=attention_mask, **selection(variant, model, row_names)).logits
            if not reference:  # each example alone with its adapter, for the first few rows
                for row in range(min(4, args.batch)):
                    alone = peftkit.PeftModel.from_pretrained(load_base(), folders[row_names[row]]).eval()
                    reference[row] = alone(input_ids=input_ids[row:row + 1]).logits
                    del alone
                if single is not None:
                    reference["single"] = single(input_ids=input_ids, attention_mask=attention_mask).logits
            if rows is row_names:
                difference = max(float((logits[row] - reference[row][0]).abs().max()) for row in range(min(4, args.batch)))
            else:
                difference = float((logits - reference["single"]).abs().max()) if "single" in reference else float("nan")
            checks[variant] = difference
        calls = {v: (lambda v=v, m=m: m(input_ids=input_ids, attention_mask=attention_mask, **selection(v, m, row_names)))
                 for v, m in models.items()}
        times = interleaved(calls, args.rounds)
    result = summarise("classify", times, args.batch, "examples/s")
    result["max_abs_logit_difference_vs_alone"] = checks
    return result


def run_generate(args, root: Path, variants: list[str]) -> dict:
    import peftkit
    from peftkit import zoo

    tokenizer = None

    def load_base():
        nonlocal tokenizer
        model, tokenizer = zoo.load_causal_lm("smollm2", seed=0)
        return model.eval()

    config = peftkit.LoraConfig(r=args.gen_rank, lora_alpha=2 * args.gen_rank, target_modules=GEN_TARGETS, task_type="CAUSAL_LM")
    folders = make_adapters(load_base(), config, args.gen_adapters, root / "generate", seed=3)
    log(f"saved {len(folders)} adapters")
    models = build_variants(shared_copies(load_base()), folders, variants)
    prompts = make_prompts(tokenizer, args.gen_batch, args.prompt_len)
    names = list(folders)
    order = torch.randperm(args.gen_batch, generator=torch.Generator().manual_seed(4)).tolist()
    row_names = [names[order[i] % len(names)] for i in range(args.gen_batch)]
    settings = dict(attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)

    def generate(variant, model):
        output = model.generate(input_ids=prompts, **settings, **selection(variant, model, row_names))
        assert output.shape == (args.gen_batch, args.prompt_len + args.new_tokens), output.shape
        return output[:, args.prompt_len:]

    checks = {}
    with torch.inference_mode():
        tokens = {}
        for variant, model in models.items():
            tokens[variant] = generate(variant, model)
            log(f"checked {variant}")
        if "mixed-distinct" in tokens:
            for variant in ("peftkit-distinct", "peft-distinct"):
                if variant in tokens:
                    checks[f"{variant} tokens equal mixed-distinct's"] = bool(torch.equal(tokens[variant], tokens["mixed-distinct"]))
            alone = peftkit.PeftModel.from_pretrained(load_base(), folders[row_names[0]]).eval()
            first = alone.generate(input_ids=prompts[:1], **{**settings, "attention_mask": torch.ones_like(prompts[:1])})
            checks["row 0 alone equals mixed-distinct row 0"] = bool(torch.equal(first[0, args.prompt_len:], tokens["mixed-distinct"][0]))
            del alone
        times = interleaved({v: (lambda v=v, m=m: generate(v, m)) for v, m in models.items()}, args.gen_rounds)
    result = summarise("generate", times, args.gen_batch * args.new_tokens, "generated tokens/s")
    result["checks"] = checks
    return result


def markdown(part: str, result: dict) -> str:
    lines = [f"| {part} variant | {result['unit']} (median) |", "|---|---:|"]
    for variant, value in result["median"].items():
        lines.append(f"| {variant} | {value:,.1f} |")
    lines += ["", "| ratio (median of per-round ratios) | measured | target |", "|---|---:|---|"]
    for key, entry in result["ratios"].items():
        target = "" if entry["target"] is None else f">= {entry['target']}x ({'met' if entry['met'] else 'MISSED'})"
        lines.append(f"| {key} | {entry['ratio']:.2f}x | {target} |")
    return "\n".join(lines)


PART_TITLES = {
    "classify": "minilm, batch 64 x 64 tokens, 64 distinct LoRA adapters (r=8, all linear layers), one per example; inference",
    "generate": "smollm2, 64 sequences decoding together, each with its own LoRA adapter (r=16, attention and MLP projections); greedy",
}


def readme_fields(parts: dict) -> dict:
    """The "markdown" and "command" the README's results section shows, assembled from every part measured."""
    sections = []
    for part, result in parts.items():
        load = result.get("load_average_before", "?")
        sections.append(f"**{PART_TITLES.get(part, part)}** (`{result['command']}`; {result['threads']} thread(s), "
                        f"load average before {load})\n\n{markdown(part, result)}")
    commands = sorted({result["command"] for result in parts.values()})
    return {"markdown": "\n\n".join(sections), "command": " ; ".join(commands)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="classify,generate")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--gen-adapters", type=int, default=64)
    parser.add_argument("--gen-rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--gen-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    command = "python " + " ".join(sys.argv)
    # Parts are written as they finish; parts run by an earlier command stay in the file with their own command.
    with tempfile.TemporaryDirectory(prefix="mixed-batch-") as temporary:
        for part in [p for p in args.parts.split(",") if p]:
            run = {"classify": run_classify, "generate": run_generate}[part]
            before = load_average()
            started = time.perf_counter()
            result = run(args, Path(temporary), variants)
            result.update(seconds=time.perf_counter() - started, command=command, threads=torch.get_num_threads(),
                          torch=torch.__version__, load_average_before=before, load_average_after=load_average(),
                          settings=vars(args))
            print(f"\n### {part}\n\n{markdown(part, result)}\n", flush=True)
            print({k: v for k, v in result.items() if k in ("checks", "max_abs_logit_difference_vs_alone")}, flush=True)
            if args.json:  # read again just before writing: another part may have finished meanwhile
                payload = {"parts": {}}
                if os.path.exists(args.json):
                    with open(args.json) as handle:
                        payload = json.load(handle)
                payload["parts"][part] = result
                payload.update(readme_fields(payload["parts"]))
                write_results_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
