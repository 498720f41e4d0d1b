"""`peftkit routing`: compute an existing adapter's routing data, so that `peftkit serve` can route to it."""

from __future__ import annotations

from peftkit.cli.options import DefaultsHelpFormatter


def add_parsers(commands) -> None:
    from peftkit.serve.routing import DEFAULT_EXAMPLES, ROUTING_NAME

    parser = commands.add_parser(
        "routing", help="write an adapter's routing data (embeddings of its task's inputs) for \"auto\" in peftkit serve",
        description=f"Embed inputs of the adapter's task with its base model (no adapter: its middle and last layers' hidden states, mean-pooled) "
                    f"and write {ROUTING_NAME} into the adapter folder: the centroid and a sample of the embeddings. "
                    "peftkit serve routes requests that name the adapter \"auto\" with them. peftkit train writes this "
                    "file already; this command is for adapters trained elsewhere or before. Nothing else is changed.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("adapter", metavar="RUN_OR_ADAPTER", help="the adapter folder (or the run folder holding adapter/)")
    parser.add_argument("--task", default=None, help="built-in task (sst2, trec, ..., or an -instruct chat task) or a data "
                        "path whose inputs the adapter was trained on (default: the task its peftkit_run.json names)")
    parser.add_argument("--model", default=None, help="base model (default: the one its peftkit_run.json names)")
    parser.add_argument("--split", default="train", help="the task split to embed")
    parser.add_argument("--max-texts", type=int, default=1024, help="texts embedded (a seeded sample when there are more)")
    parser.add_argument("--max-examples", type=int, default=DEFAULT_EXAMPLES, help="embeddings kept for the knn router")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_routing, command_parser=parser)


def _routing(args) -> int:
    from pathlib import Path

    from peftkit.errors import PeftkitError
    from peftkit.serve.routing import compute_routing_data
    from peftkit.train.job import read_run_info

    folder = Path(args.adapter)
    if not folder.is_dir():
        raise PeftkitError(f"{folder} is not a folder; give an adapter folder (runs/NAME/adapter, or one in the served directory)")
    info = read_run_info(folder / "adapter" if (folder / "adapter").is_dir() else folder)
    task, model = args.task or info.get("task"), args.model or info.get("model")
    if not task or not model:
        missing = " and ".join(flag for flag, value in (("--task", task), ("--model", model)) if not value)
        raise PeftkitError(f"{folder} does not say which task and base model it was trained on; pass {missing}")
    if args.max_texts < 1 or args.max_examples < 1:
        raise PeftkitError("--max-texts and --max-examples must be at least 1")
    path = compute_routing_data(folder, task, model, split=args.split, max_texts=args.max_texts,
                                max_examples=args.max_examples, seed=args.seed,
                                holdout=info.get("validation_holdout") if task == info.get("task") else None)
    print(f"wrote {path} ({task}, {args.split} split, base model {model})")
    return 0
