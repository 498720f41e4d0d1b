"""`peftkit federate`: federated adaptation in Flower's simulation engine, or the Flower app for a deployment."""

from __future__ import annotations

import json
import sys

from peftkit.cli.options import DefaultsHelpFormatter, print_rows
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    from peftkit import zoo
    from peftkit.federated.aggregation import AGGREGATIONS
    from peftkit.federated.settings import FederationSettings

    defaults = FederationSettings()
    parser = commands.add_parser(
        "federate", help="federated adaptation on Flower: clients train adapters on their own data, only adapters travel",
        description="Federated adaptation with Flower. Each client keeps its own part of the task's training data "
                    "(split with Flower Datasets) and its own held-out part; each round a sampled share of the clients "
                    "trains the global adapter locally and sends it back; the server aggregates. Runs in Flower's "
                    "simulation engine on this machine, or, with --write-app, writes the Flower app folder for `flwr run` "
                    "against flower-superlink / flower-supernode processes. Needs pip install \"peftkit[federated]\".",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=defaults.model, help=f"built-in model ({', '.join(zoo.list_models())}) or a model folder")
    parser.add_argument("--task", default=defaults.task, help="built-in task or a data folder")
    parser.add_argument("--method", default=defaults.method, help="any peftkit method with adapter tensors (lora, bitfit, ia3, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a method config field (JSON value), repeatable")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="data owners (virtual SuperNodes)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--fraction", type=float, default=defaults.fraction, help="share of the clients that train each round")
    parser.add_argument("--partition", default=defaults.partition, help="iid, or dirichlet:ALPHA (non-IID label mix)")
    parser.add_argument("--aggregate", default=defaults.aggregate, choices=AGGREGATIONS,
                        help="fedavg-factors: mean of A and of B; delta: mean of the updates B A, SVD back to rank r; "
                             "frozen-a: A shared and frozen, mean of B (exact)")
    parser.add_argument("--local-epochs", type=float, default=defaults.local_epochs)
    parser.add_argument("--local-steps", type=int, default=0, help="optimizer steps per round instead of epochs")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=None, help="(default: the method's)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--max-examples-per-client", type=int, default=0, help="cap each client's examples, its held-out part included (0: all)")
    parser.add_argument("--server-eval", type=int, default=0, metavar="N",
                        help="the server also scores the global adapter on N validation examples each round")
    parser.add_argument("--dp-noise", type=float, default=0.0,
                        help="differential privacy: Flower's client-side fixed clipping with this noise multiplier (0: off); "
                        "the report gives the privacy budget spent (epsilon at delta 1e-5, client-level)")
    parser.add_argument("--dp-clip", type=float, default=defaults.dp_clipping_norm, help="clipping norm of a client's update")
    parser.add_argument("--round-timeout", type=float, default=defaults.round_timeout_s, help="seconds a round waits for replies")
    parser.add_argument("--min-clients", type=int, default=defaults.min_clients, help="fewest updates a round aggregates")
    parser.add_argument("--inject-fault", default="", metavar="raise|hang:CLIENT:ROUND",
                        help="drill: make one client crash, or hang past the timeout, in one round")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--cpus", type=int, default=2, help="clients training at once in the simulation")
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--resume", action="store_true", help="continue the federation in --output-dir after its last round")
    parser.add_argument("--write-app", metavar="FOLDER",
                        help="write the Flower app folder for `flwr run FOLDER` (process mode) instead of simulating")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_federate, command_parser=parser)


def settings_from(args):
    from peftkit.federated.settings import FederationSettings

    options = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise PeftkitError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            options[field] = json.loads(value)
        except json.JSONDecodeError:
            options[field] = value
    return FederationSettings(
        model=args.model, task=args.task, method=args.method, method_options=options, clients=args.clients,
        rounds=args.rounds, fraction=args.fraction, partition=args.partition, aggregate=args.aggregate,
        local_epochs=args.local_epochs, local_steps=args.local_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate or 0.0, max_length=args.max_length,
        max_examples_per_client=args.max_examples_per_client, server_eval_examples=args.server_eval,
        seed=args.seed, output_dir=args.output_dir, dp_noise_multiplier=args.dp_noise, dp_clipping_norm=args.dp_clip,
        round_timeout_s=args.round_timeout, min_clients=args.min_clients, inject_fault=args.inject_fault,
        resume=args.resume,
    ).validate()


def _federate(args) -> int:
    from peftkit.federated import simulation
    from peftkit.federated.privacy import describe as describe_budget
    from peftkit.registry import method_config

    settings = settings_from(args)
    method_config(settings.method, **settings.method_options)  # a bad method or option fails before Flower starts
    if args.write_app:
        folder = simulation.write_flower_app(args.write_app, settings)
        print(f"wrote the Flower app to {folder}; with a SuperLink and SuperNodes running: flwr run {folder} <federation>")
        return 0
    report = simulation.simulate(settings, cpus=args.cpus)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    for entry in report["rounds"]:
        accuracy = entry["client_accuracy"]
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        print(f"round {entry['round']}: {entry['trained']}/{entry['sampled']} clients trained, {entry['failures']} failed, "
              f"client held-out accuracy {shown}" + (f", server accuracy {entry['server_accuracy']:.4f}" if entry["server_accuracy"] is not None else ""))
    print_rows([
        ("adapter per message", f"{report['adapter_bytes_per_message']:,} bytes"),
        ("whole model", f"{report['whole_model_bytes']:,} bytes"),
        ("share", f"{100 * report['share_of_whole_model']:.3f}%"),
        ("adapter", f"{settings.output_dir}/adapter"),
        *([("privacy", describe_budget(report["privacy"]))] if report.get("privacy") else []),
    ])
    return 0
