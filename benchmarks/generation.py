"""Decoding speed on smollm2: the base model against a LoRA adapter merged, unmerged, and unmerged in peft.

    python benchmarks/generation.py           # smollm2, greedy, 64 new tokens, batch 1 and 8, 32-token prompts, 7 rounds
    python benchmarks/generation.py --json benchmarks/results/generation.json
    python benchmarks/generation.py --batch-sizes 1 --new-tokens 128 --rounds 9

What is measured. Greedy decoding (do_sample=False, KV cache on) of exactly --new-tokens tokens
(min_new_tokens = max_new_tokens, so the end-of-sequence token is suppressed until the last step and
every call decodes the same count) from a fixed batch of prompts: windows of --prompt-len tokens of a
fixed English text, one window per row (no padding, every prompt the same length), at each of
--batch-sizes. One call of `generate` is timed; tokens/s = batch size x new tokens / its wall time
(prefill included, so it is the time a user waits for the batch). The variants, all smollm2 float32
on CPU, `torch.inference_mode()`:

    base              the model as loaded, no adapter
    peftkit-merged    peftkit LoRA folded into the weights (`merge_and_unload()`): a plain transformers model
    peftkit-unmerged  the same peftkit LoRA kept as a side path (`peftkit.PeftModel.from_pretrained`)
    peft-unmerged     the same adapter files loaded by Hugging Face peft (`peft.PeftModel.from_pretrained`)

The adapter is LoRA r=16, alpha 32 on every attention and MLP projection ("all-linear"), with
lora_B drawn at random (normal, std --lora-b-std, seeded) so that it does change the outputs (a
fresh LoRA has B = 0); it is saved once with peftkit's save_pretrained (peft's file layout) and every
adapter variant loads that folder, so all three hold the same weights. A check at start-up reports
each variant's largest logit difference from peftkit-unmerged on the prompts, whether its greedy
tokens equal peftkit-unmerged's, and how many tokens differ from the base model's.

One process builds every variant, runs one warm-up call of each per batch size, then times them in
interleaved rounds (each round: every batch size, every variant, back to back). The machine is
shared and noisy, so each figure is the median over rounds, and every ratio is the median of
per-round ratios (the variants compared ran back to back under the same load).

Targets (issue 4): merged decodes at the base model's speed within noise (ratio >= 1 - --merged-tolerance,
default 0.95x); unmerged overhead under 10% (peftkit-unmerged ratio >= 0.90x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_job import write_results_json  # noqa: E402
from sft_step_time import fault_in  # noqa: E402

VARIANTS = ("base", "peftkit-merged", "peftkit-unmerged", "peft-unmerged")
UNMERGED_TARGET = 0.90  # peftkit-unmerged tokens/s / base tokens/s

TEXT = (
    "The history of the lighthouse is a history of coastlines, trade and weather. Early lights were open fires "
    "on hills or towers, kept burning by watchmen through the night so that ships could find a harbour or avoid "
    "a reef. Later builders enclosed the flame in glass, then added mirrors and lenses to throw the light "
    "farther out to sea. The Fresnel lens, made of many rings of glass, bent the light into a narrow beam that "
    "could be seen for twenty miles or more. Each lighthouse was given its own pattern of flashes, so that a "
    "sailor who counted the seconds between them could tell one light from another and fix the position of "
    "the ship on a chart. Keepers lived at the station with their families, trimming wicks, polishing brass "
    "and winding the clockwork that turned the lens. Storms could cut them off from the mainland for weeks. "
    "Today most lights are automatic, powered by the sun and watched from far away, but many of the old towers "
    "still stand, some as museums, some as homes, and some still shining for the boats that pass at night. "
    "Visitors climb the narrow stairs to look out over the water and imagine the long nights of the keepers."
)


def make_prompts(tokenizer, batch_size: int, prompt_len: int) -> torch.Tensor:
    """batch_size rows of prompt_len consecutive tokens of TEXT (row i starts i * prompt_len tokens in, wrapping)."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    needed = batch_size * prompt_len
    stream = (ids * (needed // len(ids) + 1))[:needed]
    return torch.tensor(stream).view(batch_size, prompt_len)


def load(args):
    from peftkit import zoo

    model, tokenizer = zoo.load_causal_lm(args.model, seed=0)
    fault_in(model)
    model.eval()
    return model, tokenizer


def build(variants: list[str], args, folder: str):
    """{variant: model} and the tokenizer; the adapter is made once and saved to `folder`."""
    import peftkit

    creator, tokenizer = load(args)
    torch.manual_seed(0)  # lora_A's initialization draws from the global generator
    creator = peftkit.get_peft_model(creator, peftkit.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in creator.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * args.lora_b_std)
    creator.save_pretrained(folder)
    del creator

    models = {}
    for variant in variants:
        model, _ = load(args)
        if variant == "peftkit-merged":
            model = peftkit.PeftModel.from_pretrained(model, folder).merge_and_unload()
        elif variant == "peftkit-unmerged":
            model = peftkit.PeftModel.from_pretrained(model, folder)
        elif variant == "peft-unmerged":
            import peft

            model = peft.PeftModel.from_pretrained(model, folder)
        model.eval()
        models[variant] = model
    return models, tokenizer


def generate(model, input_ids: torch.Tensor, args, pad_token_id: int) -> torch.Tensor:
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, use_cache=True,
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=pad_token_id)
    if output.shape != (input_ids.shape[0], input_ids.shape[1] + args.new_tokens):
        raise RuntimeError(f"generate returned shape {tuple(output.shape)}, expected "
                           f"{(input_ids.shape[0], input_ids.shape[1] + args.new_tokens)}")
    return output[:, input_ids.shape[1]:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha is 2r)")
    parser.add_argument("--lora-b-std", type=float, default=0.02, help="std of the random lora_B weights")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--merged-tolerance", type=float, default=0.05,
                        help="merged passes when its tokens/s is at least (1 - this) x the base model's")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; pick from {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in variants]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    started_at = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftkit-generation-") as folder:
        models, tokenizer = build(variants, args, folder)
    pad = tokenizer.pad_token_id
    prompts = {b: make_prompts(tokenizer, b, args.prompt_len) for b in batch_sizes}
    reference = "peftkit-unmerged" if "peftkit-unmerged" in models else None

    # Same weights, same outputs? Logits on the largest prompt batch, then the warm-up calls' tokens.
    checks: dict[str, dict] = {v: {} for v in variants}
    with torch.inference_mode():
        largest = prompts[max(batch_sizes)]
        logits = {v: m(input_ids=largest, attention_mask=torch.ones_like(largest)).logits for v, m in models.items()}
        tokens = {b: {v: generate(m, prompts[b], args, pad) for v, m in models.items()} for b in batch_sizes}
    for variant in variants:
        if reference is not None:
            checks[variant]["max_logit_diff_vs_peftkit_unmerged"] = (logits[variant] - logits[reference]).abs().max().item()
            checks[variant]["tokens_equal_peftkit_unmerged"] = all(
                torch.equal(tokens[b][variant], tokens[b][reference]) for b in batch_sizes)
        if "base" in models:
            checks[variant]["tokens_differing_from_base"] = sum(
                int((tokens[b][variant] != tokens[b]["base"]).sum()) for b in batch_sizes)
    total_tokens = sum(b * args.new_tokens for b in batch_sizes)
    del logits, tokens

    times: dict[str, dict[str, list[float]]] = {str(b): {v: [] for v in variants} for b in batch_sizes}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for b in batch_sizes:
                for variant, model in models.items():
                    started = time.perf_counter()
                    generate(model, prompts[b], args, pad)
                    times[str(b)][variant].append(time.perf_counter() - started)
    elapsed_s = time.perf_counter() - started_at

    def speed_ratio(b: int, variant: str, against: str) -> list[float] | None:
        # tokens/s ratio in each round = the reference's time / the variant's time (same round, same load)
        if variant not in models or against not in models:
            return None
        return [t_ref / t for t, t_ref in zip(times[str(b)][variant], times[str(b)][against])]

    def x(values):
        return "n/a" if values is None else f"{statistics.median(values):.2f}x"

    def spread(values):
        return "" if values is None else f"{min(values):.2f}x to {max(values):.2f}x"

    import peft

    lines = [
        f"{args.model} (float32, CPU), greedy decoding of exactly {args.new_tokens} new tokens (KV cache on) from "
        f"{args.prompt_len}-token prompts; LoRA r={args.r} (alpha {2 * args.r}) on all-linear with random lora_B "
        f"(std {args.lora_b_std:g}), the same adapter files for every adapter variant. One `generate` call timed "
        f"(prefill included); median of {args.rounds} interleaved rounds after 1 warm-up call; torch {torch.__version__}, "
        f"peft {peft.__version__}, {torch.get_num_threads()} threads. Ratios are medians of per-round tokens/s ratios.",
        "",
        "| batch | variant | time per call | tokens/s | vs base | vs base, per round | vs peft unmerged |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for b in batch_sizes:
        for variant in variants:
            median_s = statistics.median(times[str(b)][variant])
            to_base = speed_ratio(b, variant, "base")
            to_peft = speed_ratio(b, variant, "peft-unmerged")
            rows.append({
                "batch_size": b, "variant": variant, "call_s_median": median_s,
                "tokens_per_s": b * args.new_tokens / median_s,
                "vs_base": None if to_base is None else statistics.median(to_base),
                "vs_base_per_round": to_base,
                "vs_peft_unmerged": None if to_peft is None else statistics.median(to_peft),
            })
            lines.append(f"| {b} | {variant} | {median_s:.2f} s | {b * args.new_tokens / median_s:.1f} | {x(to_base)} | "
                         f"{spread(to_base)} | {x(to_peft) if variant != 'peft-unmerged' else ''} |")

    if reference is not None or "base" in models:
        lines += ["", "Same weights, same outputs (on the prompts of every batch size):", "",
                  "| variant | max logit difference from peftkit-unmerged | greedy tokens equal peftkit-unmerged's | "
                  "tokens differing from base |", "|---|---:|---|---:|"]
        for variant in variants:
            c = checks[variant]
            diff = c.get("max_logit_diff_vs_peftkit_unmerged")
            equal = c.get("tokens_equal_peftkit_unmerged")
            differing = c.get("tokens_differing_from_base")
            lines.append(f"| {variant} | {'n/a' if diff is None else f'{diff:.1e}'} | "
                         f"{'n/a' if equal is None else ('yes' if equal else 'no')} | "
                         f"{'n/a' if differing is None else f'{differing} of {total_tokens}'} |")

    verdicts = []
    for b in batch_sizes:
        merged = speed_ratio(b, "peftkit-merged", "base")
        if merged is not None:
            ratio = statistics.median(merged)
            ok = ratio >= 1 - args.merged_tolerance
            verdicts.append(f"- {'PASS' if ok else 'FAIL'}: batch {b}: peftkit-merged decodes at {ratio:.2f}x the base "
                            f"model's tokens/s (target: within noise, >= {1 - args.merged_tolerance:.2f}x; "
                            f"per round {spread(merged)})")
        unmerged = speed_ratio(b, "peftkit-unmerged", "base")
        if unmerged is not None:
            ratio = statistics.median(unmerged)
            versus_peft = speed_ratio(b, "peftkit-unmerged", "peft-unmerged")
            peft_note = "" if versus_peft is None else f"; {x(versus_peft)} peft-unmerged's tokens/s"
            verdicts.append(f"- {'PASS' if ratio >= UNMERGED_TARGET else 'FAIL'}: batch {b}: peftkit-unmerged decodes at "
                            f"{ratio:.2f}x the base model's tokens/s ({100 * (ratio - 1):+.0f}%) "
                            f"(target: under 10% slower, >= {UNMERGED_TARGET:.2f}x{peft_note})")
    markdown = "\n".join(lines + ([""] + verdicts if verdicts else []))
    print("\n" + markdown)
    print(f"\n(total {elapsed_s:.0f} s)", file=sys.stderr)
    if args.json:
        write_results_json(args.json, {
            "command": "python benchmarks/generation.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
            "measured_at": time.strftime("%Y-%m-%d"), "markdown": markdown,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows, "checks": checks, "times": times,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
