"""Splitting a task's training examples among clients with Flower Datasets (`flwr-datasets`).

`iid` deals the examples out evenly at random (`IidPartitioner`); `dirichlet:ALPHA` gives each client
a label mix drawn from a Dirichlet distribution over the classes (`DirichletPartitioner` on the label
column; a small ALPHA gives each client few classes). Each client's part is then cut into its own
training examples and its own held-out examples, on which it evaluates: no example is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peftkit.errors import PeftkitError
from peftkit.extras import require
from peftkit.train.data import Example


@dataclass(frozen=True)
class ClientData:
    """One client's own examples: what it trains on and what it evaluates on."""

    train: list[Example]
    held_out: list[Example]


def parse_partition(text: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5). Anything else is a PeftkitError."""
    if text == "iid":
        return "iid", None
    kind, _, value = text.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return "dirichlet", alpha
    raise PeftkitError(f"--partition must be 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 (e.g. dirichlet:0.5), got {text!r}")


def partition_examples(examples: Sequence[Example], clients: int, partition: str, seed: int = 0,
                       held_out_fraction: float = 0.2, max_examples: int | None = None) -> list[ClientData]:
    """Split `examples` among `clients` as `partition` says ('iid' or 'dirichlet:ALPHA'), with flwr-datasets.

    Each client's part is shuffled (seeded) and its last `held_out_fraction` (at least one example) kept
    for its own evaluation; `max_examples` caps each client's examples before that cut (to keep runs short).
    """
    kind, alpha = parse_partition(partition)
    if clients < 1:
        raise PeftkitError(f"--clients must be >= 1, got {clients}")
    if len(examples) < 2 * clients:
        raise PeftkitError(f"{len(examples)} training examples are too few for {clients} clients (2 each at least)")
    if not 0 < held_out_fraction < 1:
        raise PeftkitError(f"the held-out fraction must be in (0, 1), got {held_out_fraction}")
    datasets = require("datasets", "federated partitioning")
    partitioners = require("flwr_datasets.partitioner", "federated partitioning")
    table = datasets.Dataset.from_dict({"text": [e.text for e in examples], "label": [e.label for e in examples]})
    if kind == "iid":
        partitioner = partitioners.IidPartitioner(num_partitions=clients)
    else:
        # Self-balancing stops a client from taking more than its share of examples; a part must have
        # at least 2 examples (one to train on, one to hold out).
        partitioner = partitioners.DirichletPartitioner(num_partitions=clients, partition_by="label", alpha=alpha,
                                                        min_partition_size=2, self_balancing=True, seed=seed)
    partitioner.dataset = table
    parts = []
    for client in range(clients):
        try:
            part = partitioner.load_partition(client).shuffle(seed=seed + client)
        except ValueError as error:  # the Dirichlet draws could not give every client min_partition_size
            raise PeftkitError(f"cannot split {len(examples)} examples among {clients} clients as {partition!r} ({error}); "
                               "use fewer clients or a larger alpha") from None
        rows = [Example(text=text, label=int(label)) for text, label in zip(part["text"], part["label"])]
        rows = rows[:max_examples] if max_examples else rows
        held = max(1, round(len(rows) * held_out_fraction))
        train = rows[:-held]
        if not train:
            raise PeftkitError(f"client {client} got {len(rows)} example(s): too few to train and evaluate; "
                               "use fewer clients or a larger Dirichlet alpha")
        parts.append(ClientData(train=train, held_out=rows[-held:]))
    return parts


def label_counts(examples: Sequence[Example], num_labels: int) -> list[int]:
    counts = [0] * num_labels
    for example in examples:
        counts[example.label] += 1
    return counts
