"""`peftkit combine`: several adapters merged into one LoRA adapter (task arithmetic, TIES, DARE, pruning)."""

from __future__ import annotations

from pathlib import Path

from peftkit.cli.options import DefaultsHelpFormatter
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    from peftkit.merging import COMBINE_METHODS

    parser = commands.add_parser(
        "combine", help="merge several adapters into one LoRA adapter (linear / task arithmetic, TIES, DARE, pruning)",
        description="Combine adapters of one base model in delta space (each layer's full update), then factor the "
                    "result into a plain LoRA by truncated SVD and print that step's reconstruction error. "
                    "Classification heads are task-specific: none is kept unless --head names the input whose head to attach.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="RUN_OR_ADAPTER", help="run folders (runs/NAME) or adapter folders")
    parser.add_argument("--method", default="linear", help=f"one of: {', '.join(COMBINE_METHODS)} (linear = task arithmetic)")
    parser.add_argument("--weights", default=None, help="comma-separated weight per adapter (default: 1 each)")
    parser.add_argument("--density", type=float, default=None, help="ties / dare / magnitude_prune: fraction of values kept, in (0, 1]")
    parser.add_argument("--majority-sign", default="total", help="ties / dare_ties: total (sign of the sum) or frequency (count of signs)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank of the result (default: sum of the inputs' ranks, capped at full rank)")
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the random drops")
    parser.add_argument("--head", default=None, help="attach this input's classification head: its position (1 = first) or its folder")
    parser.add_argument("--model", default=None, help="base model, if the runs do not name it (or name it differently)")
    parser.add_argument("--output-dir", required=True, help="new folder for the combined adapter")
    parser.set_defaults(handler=_combine, command_parser=parser)


def _combine(args) -> int:
    from peftkit.merging import check_combine_options, combine_adapters, save_combined

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",") if w.strip()]
        except ValueError:
            raise PeftkitError(f"--weights {args.weights!r}: give comma-separated numbers, e.g. 1,0.5") from None
    check_combine_options(args.method, len(args.adapters), weights, args.density, args.majority_sign)
    output = Path(args.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PeftkitError(f"{output} exists and is not empty; choose a new --output-dir")
    head = args.head
    if head is not None and head.isdigit():
        head = int(head) - 1
        if not 0 <= head < len(args.adapters):
            raise PeftkitError(f"--head {args.head}: give a position from 1 to {len(args.adapters)}, or one of the folders")
    combined = combine_adapters(args.adapters, weights, method=args.method, density=args.density, rank=args.rank,
                                majority_sign=args.majority_sign, seed=args.seed, base_model=args.model, head=head)
    save_combined(combined, output)
    worst = max(combined.relative_errors, key=combined.relative_errors.get)
    head_note = (f"; head from {combined.sources[combined.head_from]}" if combined.head_from is not None
                 else "; no classification head (use --head to attach one)")
    print(f"combined {len(combined.sources)} adapters ({combined.method}, weights {','.join(f'{w:g}' for w in combined.weights)}"
          + (f", density {combined.density:g}" if combined.density is not None else "")
          + f") into LoRA r={combined.config.r} on {len(combined.relative_errors)} layers -> {output}{head_note}")
    print(f"reconstruction error of the SVD step (relative, Frobenius): overall {combined.overall_relative_error:.2e}, "
          f"largest layer {combined.relative_errors[worst]:.2e} ({worst}); per layer in {output}/peftkit_run.json")
    return 0
