"""`peftkit compare`: several methods trained under one budget, with tables, plots and an HTML report."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from peftkit.cli.options import DefaultsHelpFormatter
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    from peftkit import zoo
    from peftkit.bench.compare import DEFAULT_METHODS
    from peftkit.registry import list_methods

    parser = commands.add_parser(
        "compare", help="train several methods under one budget and report accuracy, size, memory and speed",
        description="Train each method on one model and task under the same budget (one `peftkit train` per "
                    "method), then write results.md / .csv / .json, plots (PNG) and a self-contained report.html. "
                    "Runs already finished are kept when the command is run again; a method that does not apply to "
                    "the model is listed as skipped with the reason; a run that fails does not stop the others.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="minilm", help=f"built-in model ({', '.join(zoo.list_models())}) or a local Hugging Face model folder")
    parser.add_argument("--task", default="sst2", help=f"built-in task ({', '.join(zoo.list_tasks())}), a folder, or a .jsonl/.csv file")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods, or all ({', '.join(list_methods())})")
    parser.add_argument("--max-steps", type=int, default=None, help="budget: optimizer steps per method")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="budget: minutes of training per method (evaluation excluded); with --max-steps, whichever comes first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where the reports go (default: runs/compare-<model>-<task>)")
    parser.add_argument("--runs-dir", default=None, help="where the training runs go (default: OUTPUT_DIR/runs)")
    parser.add_argument("--train-args", default="", metavar="'OPTIONS'",
                        help="more `peftkit train` options for every run, in quotes, e.g. '--max-train-examples 2000 --batch-size 16'")
    parser.add_argument("--no-progress", action="store_true",
                        help="no training progress bars, on the terminal or in the runs' logs (only a line per method)")
    parser.set_defaults(handler=_compare, command_parser=parser)


_OWN_TRAIN_OPTIONS = ("--method", "--model", "--task", "--output-dir", "--seed", "--max-steps", "--max-minutes",
                      "--epochs", "--resume", "--no-progress")


def _compare(args) -> int:
    from peftkit.bench.compare import STATUSES, Budget, compare, parse_methods

    train_args = shlex.split(args.train_args)
    clashing = [option for option in train_args if option.split("=")[0] in _OWN_TRAIN_OPTIONS]
    if clashing:
        raise PeftkitError(f"--train-args may not set {', '.join(clashing)}: compare sets it for every run "
                           "(use --model, --task, --seed, --max-steps, --max-minutes of peftkit compare)")
    budget = Budget(args.max_steps, args.max_minutes)
    model_label = Path(args.model).name if os.sep in args.model else args.model
    task_label = Path(args.task).stem if os.sep in args.task or "." in args.task else args.task
    output_dir = Path(args.output_dir or os.path.join("runs", f"compare-{model_label}-{task_label}"))
    command = ["peftkit", "compare", "--model", args.model, "--task", args.task, "--methods", args.methods,
               *budget.train_arguments(), *(["--seed", str(args.seed)] if args.seed else []), "--output-dir", str(output_dir),
               *(["--runs-dir", args.runs_dir] if args.runs_dir else []),
               *(["--train-args", args.train_args] if train_args else [])]
    progress = not args.no_progress  # a bar in each run's log; on the terminal too when there is one
    print(f"peftkit compare: {args.methods} on {args.model} / {args.task}, budget {budget.describe()} -> {output_dir}",
          flush=True)
    try:
        rows = compare(args.model, args.task, parse_methods(args.methods), output_dir, budget=budget, seed=args.seed,
                       runs_dir=args.runs_dir, train_args=train_args, progress=progress, echo=progress and sys.stderr.isatty(),
                       command=shlex.join(command),
                       log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print(f"peftkit compare: interrupted; the reports in {output_dir} hold the runs that finished. Run the same "
              "command again to keep those and train the rest.", file=sys.stderr)
        return 130
    counts = {status: sum(row["status"] == status for row in rows) for status in STATUSES}
    print(f"{counts['ok']} finished, {counts['skipped']} skipped, {counts['failed']} failed; reports in {output_dir}: "
          "results.md, results.csv, results.json, report.html and the plots (PNG)")
    return 1 if counts["failed"] else 0
