"""`peftkit export`: an adapter for serving engines, in the peft LoRA layout (--to-lora converts other methods)."""

from __future__ import annotations

import sys

from peftkit.cli.options import DefaultsHelpFormatter


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
    from peftkit.export import export_to_folder

    result = export_to_folder(args.adapter, args.output, model=args.model, to_lora=args.to_lora, rank=args.rank)
    if result.conversion is not None:
        conversion = result.conversion
        print(f"LoRA r={conversion.config.r} on {len(conversion.relative_errors)} layers written to {args.output}; "
              f"largest relative error of a layer's update: {conversion.max_relative_error:.2e}")
        return 0
    print(f"adapter written to {args.output} in the Hugging Face peft layout (peft.PeftModel.from_pretrained loads it)")
    if result.problems:
        print("serving engines (vLLM and the like) cannot load all of it:", file=sys.stderr)
        for problem in result.problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"  convert it: peftkit export {args.adapter} --to-lora --output DIR", file=sys.stderr)
    return 0
