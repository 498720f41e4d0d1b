"""The Flower apps: a ClientApp that trains and evaluates the adapter on its owner's data, and a ServerApp
whose strategy (Flower's FedAvg, with peftkit's aggregation rules) aggregates what comes back.

Only adapter tensors travel: the server sends the global adapter's shared tensors, a client answers with
the same keys, and the server refuses a reply holding anything else. The same two apps run in Flower's
simulation engine (`peftkit federate`) and as separate processes (`flower-superlink`, `flower-supernode`,
`flwr run`, with `client_app` and `server_app` below as the components): with no settings given, each app
reads them from Flower's run config.

Importing this module imports Flower (the `federated` extra); peftkit's core never imports it.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from peftkit.extras import require

require("flwr", "federated adaptation")

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from peftkit.errors import PeftkitError
from peftkit.federated import local, rounds
from peftkit.federated.aggregation import aggregate
from peftkit.federated.settings import FederationSettings, parse_fault
from peftkit.io import write_json
from peftkit.train.job import save_run

logger = logging.getLogger("peftkit.federated")
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def record_bytes(record: ArrayRecord) -> int:
    """The tensor bytes a message carries in `record`."""
    return sum(len(array.data) for array in record.values())


# --------------------------------------------------------------------------- client


def privacy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side fixed clipping (`fixedclipping_mod`) on training messages whose config carries a
    clipping norm (sent by the DP strategy wrapper); other messages pass unchanged."""
    config = msg.content.config_records.get(CONFIG)
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(settings: FederationSettings | None = None) -> ClientApp:
    """The ClientApp; `settings` None: read from the run config (process mode)."""
    app = ClientApp(mods=[privacy_mod])

    def settings_of(context: Context) -> FederationSettings:
        return settings if settings is not None else FederationSettings.from_run_config(context.run_config)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        current = settings_of(context)
        client = int(context.node_config["partition-id"])
        server_round = int(msg.content[CONFIG]["server-round"])
        inject_fault(current, client, server_round)
        received = msg.content[ARRAYS].to_torch_state_dict()
        sent, metrics = local.client_train_round(current, client, server_round, received)
        ordered = {key: sent[key] for key in received}  # the keys in the order they came (Flower's clipping mod checks it)
        content = RecordDict({ARRAYS: ArrayRecord(ordered), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        current = settings_of(context)
        client = int(context.node_config["partition-id"])
        metrics = local.client_evaluate(current, client, msg.content[ARRAYS].to_torch_state_dict())
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def inject_fault(settings: FederationSettings, client: int, server_round: int) -> None:
    """--inject-fault drills: make a client raise, or hang past the round's timeout, in a given round."""
    for kind, faulty_client, faulty_round in parse_fault(settings.inject_fault):
        if (faulty_client, faulty_round) != (client, server_round):
            continue
        if kind == "raise":
            raise RuntimeError(f"injected fault: client {client} crashes in round {server_round}")
        time.sleep(settings.round_timeout_s + 5)


# --------------------------------------------------------------------------- server


def short_reason(reason) -> str:
    """The end of a client's error (where the exception's own message is), without terminal colours."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason)).strip()
    return text[-300:]


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg (sampling, messaging, failure handling) with peftkit's aggregation of adapters.

    Round numbers continue a resumed federation (`round_offset`); every round is recorded in `history`.
    """

    def __init__(self, settings: FederationSettings, allowed_keys: list[str], history: list[rounds.RoundRecord],
                 round_offset: int = 0):
        super().__init__(fraction_train=settings.fraction, fraction_evaluate=1.0,
                         min_train_nodes=settings.clients_per_round, min_evaluate_nodes=settings.clients,
                         min_available_nodes=settings.clients)
        self.settings, self.allowed_keys, self.history, self.round_offset = settings, allowed_keys, history, round_offset

    def record(self, server_round: int) -> rounds.RoundRecord:
        number = server_round + self.round_offset
        if not self.history or self.history[-1].round != number:
            self.history.append(rounds.RoundRecord(round=number))
        return self.history[-1]

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        entry = self.record(server_round)
        entry.sampled = len(messages)
        # Every sampled client counts as failed until its update is aggregated: a wrapper (Flower's privacy
        # strategies) may drop a round whose replies all failed without calling aggregate_train at all.
        entry.trained, entry.failures = 0, entry.sampled
        entry.bytes_down = sum(record_bytes(m.content[ARRAYS]) for m in messages)
        return messages

    def aggregate_train(self, server_round, replies):
        entry = self.record(server_round)
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        entry.failure_reasons = [short_reason(m.error.reason) for m in replies if m.has_error()]
        states, weights, losses = [], [], []
        for message in valid:
            state = message.content[ARRAYS].to_torch_state_dict()
            if list(state) != self.allowed_keys:  # only the adapter's shared tensors may travel
                entry.failure_reasons.append(f"reply with other tensors than the adapter's: {sorted(set(state) ^ set(self.allowed_keys))[:3]}")
                continue
            entry.bytes_up += record_bytes(message.content[ARRAYS])
            metrics = message.content[METRICS]
            states.append(state)
            weights.append(float(metrics["num-examples"]))
            losses.append(float(metrics["train-loss"]))
        entry.trained = len(states)
        entry.failures = entry.sampled - entry.trained
        for reason in entry.failure_reasons:
            logger.warning("round %d: a client failed: %s", entry.round, reason)
        if len(states) < self.settings.min_clients:
            logger.warning("round %d: %d update(s), fewer than %d: the global adapter stays as it was",
                           entry.round, len(states), self.settings.min_clients)
            return None, None
        aggregated, report = aggregate(self.settings.aggregate, states, weights)
        entry.aggregated = True
        entry.train_loss = sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)
        entry.factorization_error = report.max_factorization_error if report.rule == "delta" else None
        return ArrayRecord(aggregated), MetricRecord({"train-loss": entry.train_loss, "clients": float(len(states))})

    def configure_evaluate(self, server_round, arrays, config, grid):
        messages = list(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        self.record(server_round).bytes_eval = sum(record_bytes(m.content[ARRAYS]) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round, replies):
        entry = self.record(server_round)
        valid = [m for m in replies if not m.has_error()]
        total, weighted = 0.0, 0.0
        for message in valid:
            metrics = message.content[METRICS]
            entry.client_accuracies[str(int(metrics["client"]))] = float(metrics["accuracy"])
            total += float(metrics["num-examples"])
            weighted += float(metrics["accuracy"]) * float(metrics["num-examples"])
        entry.client_accuracy = weighted / total if total else None
        return MetricRecord({"accuracy": entry.client_accuracy}) if total else None


def run_server(grid: Grid, settings: FederationSettings) -> list[rounds.RoundRecord]:
    """The ServerApp's work: start (or resume) the federation, run its rounds with Flower, checkpoint each."""
    settings.validate()
    adapted = local.build_adapted_model(settings)
    history, offset = [], 0
    initial = adapted.shared_state()
    if settings.resume:
        saved = rounds.read_checkpoint(settings.output_dir)
        if saved is not None:
            offset, adapter, history, saved_settings = saved
            rounds.check_resumable(saved_settings, settings.__dict__, rounds.checkpoint_dir(settings.output_dir))
            adapted.model.load_adapter_state(local.ADAPTER, adapter, where="the checkpoint")
            initial = adapted.shared_state()
            logger.info("resuming after round %d from %s", offset, rounds.checkpoint_dir(settings.output_dir))
    allowed = list(initial)
    strategy = AdapterFedAvg(settings, allowed, history, round_offset=offset)
    server_strategy = strategy
    if settings.dp_noise_multiplier > 0:
        server_strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=settings.dp_noise_multiplier, clipping_norm=settings.dp_clipping_norm,
            num_sampled_clients=settings.clients_per_round)
    server_eval = server_evaluation(settings, adapted)
    random.seed(settings.seed + offset)  # Flower samples the clients with Python's random

    def after_round(server_round: int, arrays: ArrayRecord):
        state = arrays.to_torch_state_dict()
        adapted.load_shared_state(state)
        accuracy = server_eval() if server_eval else None
        if server_round == 0:
            return MetricRecord({"accuracy": accuracy}) if accuracy is not None else None
        entry = strategy.record(server_round)
        entry.server_accuracy = accuracy
        entry.dp_noise_multiplier = settings.dp_noise_multiplier or None
        rounds.write_checkpoint(settings.output_dir, entry.round, adapted.adapter_state(), history, settings.__dict__)
        return MetricRecord({"accuracy": accuracy}) if accuracy is not None else None

    remaining = settings.rounds - offset
    if remaining > 0:
        server_strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=remaining,
                              timeout=settings.round_timeout_s, evaluate_fn=after_round)
    save_final(settings, adapted, history)
    return history


def server_evaluation(settings: FederationSettings, adapted: local.AdaptedModel):
    """A function scoring the current global adapter on the task's validation examples, or None."""
    if not settings.server_eval_examples:
        return None
    from peftkit import zoo

    data = zoo.load_task(settings.task)
    examples = (data.validation or data.test or [])[: settings.server_eval_examples]
    if not examples:
        raise PeftkitError(f"task {settings.task!r} has no validation or test split for --server-eval")
    return lambda: local.evaluate_locally(adapted, examples)["accuracy"]


def save_final(settings: FederationSettings, adapted: local.AdaptedModel, history: list[rounds.RoundRecord]) -> None:
    """The global adapter as a peftkit run (`peftkit eval OUTPUT/adapter` works) and the federation's report."""
    folder = Path(settings.output_dir)
    save_run(adapted.model, adapted.tokenizer, folder / "adapter", model=settings.model, task=settings.task,
             method=settings.method, label_names=adapted.label_names, max_length=settings.max_length,
             text_column="text", label_column="label", quantize=None, validation_holdout=None)
    shared = adapted.shared_state()
    message = record_bytes(ArrayRecord(shared))  # as Flower serializes it (each array with its small header)
    whole = adapted.whole_model_bytes()
    report = {
        "settings": settings.__dict__, "rounds": [r.to_dict() for r in history],
        "adapter_tensor_bytes": local.state_bytes(shared), "adapter_bytes_per_message": message,
        "whole_model_bytes": whole, "share_of_whole_model": message / whole,
    }
    if settings.dp_noise_multiplier > 0:  # every round released one noised aggregate
        from peftkit.federated.privacy import privacy_budget

        report["privacy"] = privacy_budget(settings.dp_noise_multiplier, settings.clients_per_round, settings.clients, len(history))
    write_json(folder / rounds.REPORT_NAME, report)


def make_server_app(settings: FederationSettings | None = None) -> ServerApp:
    """The ServerApp; `settings` None: read from the run config (process mode)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings if settings is not None else FederationSettings.from_run_config(context.run_config))

    return app


client_app = make_client_app()
server_app = make_server_app()

__all__ = ["AdapterFedAvg", "client_app", "make_client_app", "make_server_app", "run_server", "server_app"]
