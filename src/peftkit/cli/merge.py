"""`peftkit merge`: an adapter merged into its base, written as a plain transformers model folder."""

from __future__ import annotations

import time


def add_parsers(commands) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into its base and write a plain model folder")
    parser.add_argument("adapter", help="adapter folder written by peftkit train")
    parser.add_argument("--output", required=True, help="folder for the merged model (plain transformers loads it)")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.set_defaults(handler=_merge, command_parser=parser)


def _merge(args) -> int:
    from peftkit.export import merge_to_folder

    started = time.perf_counter()
    note, causal = merge_to_folder(args.adapter, args.output, model=args.model)
    if note:
        print(note)
    from peftkit.train.image_job import is_image_run

    if is_image_run(args.adapter):
        print(f"merged model written to {args.output} in {time.perf_counter() - started:.1f} s; load it with "
              f"peftkit.vision.load_image_classifier({str(args.output)!r}), or train on it: peftkit train --model {args.output}")
        return 0
    auto_class = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    print(f"merged model written to {args.output} in {time.perf_counter() - started:.1f} s; "
          f"load it with transformers.{auto_class}.from_pretrained({str(args.output)!r})")
    return 0
