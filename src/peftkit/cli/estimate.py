"""`peftkit estimate`: trainable parameters and predicted peak training memory, from a config alone."""

from __future__ import annotations

import json

from peftkit.cli.options import DefaultsHelpFormatter, print_rows


def add_parsers(commands) -> None:
    from peftkit.registry import list_methods

    parser = commands.add_parser(
        "estimate", help="predict a training run's peak memory and whether it fits here",
        description="Trainable parameters and the predicted peak memory of training a method on a model, split into "
                    "weights, gradients, optimizer state and activations, with a verdict against the memory available "
                    "now. Reads the model's config only (no weights): a built-in name, a model folder or a config.json.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2", help="built-in model, a Hugging Face model folder, or a config.json file")
    parser.add_argument("--method", default="lora", choices=list_methods(), help="how to adapt the model")
    parser.add_argument("--quantize", default=None, choices=["nf4", "int8"], help="the frozen base's linear weights quantized")
    parser.add_argument("--r", type=int, default=None, help="LoRA-family rank (default: the method's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.set_defaults(handler=run, command_parser=parser)


def run(args) -> int:
    from peftkit.estimate import cheaper_setting, describe, estimate_training_memory, gib

    estimate = estimate_training_memory(
        args.model, args.method, quantize=args.quantize, batch_size=args.batch_size, max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing, method_options=None if args.r is None else {"r": args.r},
    )
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return 0
    print_rows(describe(estimate))
    if estimate.fits is False:
        cheaper = cheaper_setting(estimate)
        if cheaper is not None:
            print(f"{'cheaper setting':<23}  {cheaper.setting()} (predicted peak {gib(cheaper.peak_bytes)})")
    return 0
