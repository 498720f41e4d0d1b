"""`peftkit export`: an adapter for serving engines, in the peft LoRA layout (--to-lora converts other methods)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from peftkit.cli.options import DefaultsHelpFormatter, is_causal_run
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    parser = commands.add_parser(
        "export", help="write an adapter for serving engines (peft LoRA layout; --to-lora converts other methods)",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("adapter", help="adapter folder written by peftkit train (or a peft adapter)")
    parser.add_argument("--output", required=True, help="new folder for the exported adapter")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.add_argument("--to-lora", action="store_true",
                        help="rewrite the adapter as plain LoRA (exact where the update's rank fits, else an SVD approximation; the error is printed)")
    parser.add_argument("--rank", type=int, default=None, help="--to-lora: the LoRA rank (default: the smallest that is exact to 1e-3)")
    parser.set_defaults(handler=_export, command_parser=parser)


def _export(args) -> int:
    from peftkit.export import lora_from_adapter, save_lora_conversion, serving_problems

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise PeftkitError(f"{output} exists and is not empty; choose a new --output folder")
    if is_causal_run(args.adapter):
        from peftkit.train.instruct import load_causal_run

        model, tokenizer, info = load_causal_run(args.adapter, model=args.model)
    else:
        from peftkit.train.job import load_run

        model, tokenizer, info = load_run(args.adapter, model=args.model)
    if not hasattr(model, "peft_config") or model.is_full_finetune:
        raise PeftkitError(f"{args.adapter} holds a fully fine-tuned model, not an adapter; serve the model folder itself")
    base_id = info.get("model") or model.peft_config["default"].to_dict().get("base_model_name_or_path")
    if args.to_lora:
        conversion = lora_from_adapter(model, "default", rank=args.rank)
        partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
        save_lora_conversion(conversion, partial, base_id)
        if output.exists():
            output.rmdir()
        os.replace(partial, output)
        print(f"LoRA r={conversion.config.r} on {len(conversion.relative_errors)} layers written to {output}; "
              f"largest relative error of a layer's update: {conversion.max_relative_error:.2e}")
        return 0
    problems = serving_problems(model)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    if output.exists():
        output.rmdir()
    os.replace(partial, output)
    print(f"adapter written to {output} in the Hugging Face peft layout (peft.PeftModel.from_pretrained loads it)")
    if problems:
        print("serving engines (vLLM and the like) cannot load all of it:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"  convert it: peftkit export {args.adapter} --to-lora --output DIR", file=sys.stderr)
    return 0
