"""What runs on one data owner's machine: the base model with the adapter, the owner's examples, local
training and evaluation. No Flower here: the Flower apps (peftkit.federated.apps) call these.

A process keeps one model per federation settings (`adapted_model`): a client's whole state arrives
with each round's message (the global adapter), so a process can serve any client in turn (as Flower's
simulation actors do) without keeping one model per client.
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass

import torch

from peftkit import zoo
from peftkit.errors import PeftkitError
from peftkit.federated.aggregation import shared_keys
from peftkit.federated.partition import ClientData, partition_examples
from peftkit.federated.settings import FederationSettings
from peftkit.model import PeftModel
from peftkit.registry import default_learning_rate, method_config
from peftkit.train.data import PaddingCollator, TaskData, tokenize_examples
from peftkit.train.evaluation import evaluate
from peftkit.train.job import wrap_with_adapter
from peftkit.train.loop import TrainingArguments, train

ADAPTER = "default"


@dataclass
class AdaptedModel:
    """The base model with the federation's adapter, its tokenizer, and the task's label names."""

    model: PeftModel
    tokenizer: object
    label_names: list[str]
    settings: FederationSettings

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter (peft-layout keys), as a file would hold it."""
        return {key: tensor.detach().clone() for key, tensor in self.model.adapter_state(ADAPTER).items()}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors that travel: the adapter's, less LoRA's frozen A under frozen-a."""
        state = self.adapter_state()
        return {key: state[key] for key in shared_keys(self.settings.aggregate, list(state))}

    def load_shared_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put the received tensors into the adapter (the others, LoRA's frozen A, stay as they are)."""
        expected = shared_keys(self.settings.aggregate, list(self.model.adapter_state(ADAPTER)))
        if sorted(tensors) != sorted(expected):
            odd = sorted(set(tensors) ^ set(expected))[:3]
            raise PeftkitError(f"the received adapter tensors do not fit this client's adapter (e.g. {odd})")
        state = self.adapter_state()
        state.update(tensors)
        self.model.load_adapter_state(ADAPTER, state, where="the global adapter")

    def whole_model_bytes(self) -> int:
        """What sending the whole model (base and adapter) would cost, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.model.get_base_model().state_dict().values())


def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_adapted_model(settings: FederationSettings) -> AdaptedModel:
    """The base model with a fresh adapter; the same settings give the same tensors on every machine."""
    data = zoo.load_task(settings.task)
    base, tokenizer = zoo.load_classifier(settings.model, num_labels=len(data.label_names), id2label=data.label_names,
                                          seed=settings.seed)
    config = method_config(settings.method, **settings.method_options)
    model = wrap_with_adapter(base, config, settings.seed)
    if settings.aggregate == "frozen-a":
        frozen = [p for name, p in model.named_parameters() if name.endswith("lora_A")]
        if not frozen:
            raise PeftkitError(f"--aggregate frozen-a: method {settings.method!r} made no LoRA A to freeze")
        for parameter in frozen:
            parameter.requires_grad_(False)
    return AdaptedModel(model, tokenizer, data.label_names, settings)


@functools.lru_cache(maxsize=1)
def _cached_model(settings_json: str) -> AdaptedModel:
    return build_adapted_model(FederationSettings(**json.loads(settings_json)))


def adapted_model(settings: FederationSettings) -> AdaptedModel:
    """This process's model for `settings`, built once."""
    return _cached_model(json.dumps(settings.__dict__, sort_keys=True))


@functools.lru_cache(maxsize=1)
def _cached_partitions(settings_json: str) -> tuple[list[ClientData], TaskData]:
    settings = FederationSettings(**json.loads(settings_json))
    data = zoo.load_task(settings.task)
    parts = partition_examples(data.train, settings.clients, settings.partition, seed=settings.seed,
                               held_out_fraction=settings.held_out_fraction,
                               max_examples=settings.max_examples_per_client or None)
    return parts, data


def client_data(settings: FederationSettings, client: int) -> ClientData:
    """Client `client`'s own examples (every machine computes the same split from the settings)."""
    parts, _ = _cached_partitions(json.dumps(settings.__dict__, sort_keys=True))
    if not 0 <= client < len(parts):
        raise PeftkitError(f"client {client} does not exist: the federation has {len(parts)} clients (0..{len(parts) - 1})")
    return parts[client]


def train_locally(adapted: AdaptedModel, examples, seed: int, steps: int = 0, epochs: float | None = None,
                  learning_rate: float = 0.0) -> dict[str, float]:
    """Train the adapter's trainable tensors on `examples` with peftkit's trainer; returns its numbers."""
    settings = adapted.settings
    features = tokenize_examples(examples, adapted.tokenizer, max_length=settings.max_length)
    with tempfile.TemporaryDirectory(prefix="peftkit-client-") as folder:
        arguments = TrainingArguments(
            output_dir=folder, epochs=epochs if epochs is not None else settings.local_epochs,
            max_steps=steps or None, batch_size=settings.batch_size,
            learning_rate=learning_rate or settings.learning_rate or default_learning_rate(settings.method),
            seed=seed, progress=False, eval_every_epoch=False, keep_checkpoints=1, warmup_ratio=0.0,
            lr_scheduler="constant",
        )
        result = train(adapted.model, features, None, arguments, PaddingCollator(adapted.tokenizer))
    return {"train-loss": float(result.train_loss or 0.0), "steps": float(result.steps), "num-examples": float(len(features))}


def evaluate_locally(adapted: AdaptedModel, examples) -> dict[str, float]:
    """Loss and accuracy of the current adapter on `examples`."""
    features = tokenize_examples(examples, adapted.tokenizer, max_length=adapted.settings.max_length)
    with torch.no_grad():
        metrics = evaluate(adapted.model, features, 64, PaddingCollator(adapted.tokenizer), torch.device("cpu"))
    return {"accuracy": float(metrics["accuracy"]), "loss": float(metrics["loss"]), "num-examples": float(len(features))}


def client_train_round(settings: FederationSettings, client: int, server_round: int,
                       received: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One client's round: load the global adapter, train on its own examples, return what travels back."""
    adapted = adapted_model(settings)
    adapted.load_shared_state(received)
    examples = client_data(settings, client).train
    metrics = train_locally(adapted, examples, seed=settings.seed + 1000 * server_round + client,
                            steps=settings.local_steps)
    sent = adapted.shared_state()
    metrics.update({"client": float(client), "bytes-received": float(state_bytes(received)),
                    "bytes-sent": float(state_bytes(sent))})
    return sent, metrics


def client_evaluate(settings: FederationSettings, client: int, received: dict[str, torch.Tensor]) -> dict[str, float]:
    """One client's evaluation of the global adapter on its own held-out examples."""
    adapted = adapted_model(settings)
    adapted.load_shared_state(received)
    metrics = evaluate_locally(adapted, client_data(settings, client).held_out)
    metrics["client"] = float(client)
    return metrics
