"""The `peftkit` command: one module per command, each a thin front of the library.

    peftkit train                       LoRA on minilm / sst2 (the default job)
    peftkit train --method bitfit --task trec
    peftkit eval runs/default/adapter --split test
    peftkit predict runs/default/adapter "a gripping , funny film"
    peftkit inspect runs/default/adapter
    peftkit merge runs/default/adapter --output merged-model

Each command module imports only the standard library and peftkit's core at its top; what a command
needs from an optional package (the server's FastAPI, a tracker) is imported when the command runs, so
`peftkit --help` and every `peftkit COMMAND --help` work on a core install. The library never imports
this package.
"""

from __future__ import annotations

import argparse
import sys

from peftkit.cli import combine, compare, estimate, evaluate, export, federate, generate, inspect, merge, routing, serve, train
from peftkit.errors import PeftkitError

# In the order `peftkit --help` lists them.
COMMANDS = (train, evaluate, inspect, merge, generate, export, serve, routing, combine, compare, estimate, federate)


def build_parser() -> argparse.ArgumentParser:
    from peftkit import __version__

    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: train, evaluate, inspect, merge, export, combine and serve "
                    "adapters, and generate with them.",
        epilog="Start with `peftkit train` (LoRA on minilm / sst2). `peftkit COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    if unknown:  # the subcommand's own usage, not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except PeftkitError as error:
        print(f"peftkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftkit: interrupted; a training run resumes with --resume from its last checkpoint", file=sys.stderr)
        return 130
