"""`peftkit merge`: an adapter merged into its base, written as a plain transformers model folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

from peftkit.cli.options import is_causal_run
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into its base and write a plain model folder")
    parser.add_argument("adapter", help="adapter folder written by peftkit train")
    parser.add_argument("--output", required=True, help="folder for the merged model (plain transformers loads it)")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.set_defaults(handler=_merge, command_parser=parser)


def _merge(args) -> int:
    from peftkit.train.job import load_run

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise PeftkitError(f"{output} exists and is not empty; choose a new --output folder")
    started = time.perf_counter()
    causal = is_causal_run(args.adapter)
    if causal:
        from peftkit.train.instruct import load_causal_run

        model, tokenizer, _ = load_causal_run(args.adapter, model=args.model)
    else:
        model, tokenizer, _ = load_run(args.adapter, model=args.model)
    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    from peftkit.quantize import dequantize_merged

    note = dequantize_merged(plain)  # a quantized base: the merge error, and float layers transformers can load
    if note:
        print(note)
    # Written beside the target, then renamed: an interrupted merge leaves no half model folder.
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if output.exists():
        output.rmdir()  # empty (checked above)
    os.replace(partial, output)
    auto_class = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    print(f"merged model written to {output} in {time.perf_counter() - started:.1f} s; "
          f"load it with transformers.{auto_class}.from_pretrained({str(output)!r})")
    return 0
