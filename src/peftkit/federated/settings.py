"""What a federation runs: one flat record that travels to every Flower app as its run config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.federated.aggregation import check_rule
from peftkit.federated.partition import parse_partition


@dataclass
class FederationSettings:
    """A federated run: base model, task and method, clients and rounds, data split, aggregation, privacy.

    Flower run configs hold only scalars, so `method_options` travels as JSON and "none" is 0 or "".
    """

    model: str = "minilm"
    task: str = "sst2"
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)  # config fields (r, lora_alpha, target_modules, ...)
    clients: int = 10
    rounds: int = 3
    fraction: float = 0.4  # share of the clients sampled to train each round
    partition: str = "iid"  # iid | dirichlet:ALPHA
    aggregate: str = "fedavg-factors"  # fedavg-factors | delta | frozen-a
    local_epochs: float = 1.0
    local_steps: int = 0  # > 0: optimizer steps per round instead of epochs
    batch_size: int = 16
    learning_rate: float = 0.0  # 0: the method's default
    max_length: int = 64
    max_examples_per_client: int = 0  # caps a client's part (held-out included); 0: all of it
    held_out_fraction: float = 0.2  # of each client's part, kept for its own evaluation
    server_eval_examples: int = 0  # > 0: the server also scores the global adapter on this many validation examples
    seed: int = 0
    output_dir: str = "runs/federated"
    dp_noise_multiplier: float = 0.0  # > 0: Flower's client-side fixed clipping + server noise
    dp_clipping_norm: float = 1.0
    round_timeout_s: float = 600.0  # replies later than this are dropped (counted as failures)
    min_clients: int = 1  # a round aggregates when at least this many clients answered
    inject_fault: str = ""  # drills: "raise:CLIENT:ROUND" or "hang:CLIENT:ROUND" (comma-separated) make clients fail
    resume: bool = False

    def validate(self) -> FederationSettings:
        check_rule(self.aggregate)
        parse_partition(self.partition)
        if self.clients < 1 or self.rounds < 1:
            raise PeftkitError(f"--clients and --rounds must be >= 1, got {self.clients} and {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise PeftkitError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0:
            raise PeftkitError("--dp-noise must be >= 0 and --dp-clip > 0")
        if self.aggregate == "frozen-a" and self.method not in ("lora", "dora"):
            raise PeftkitError(f"--aggregate frozen-a freezes LoRA's A; method {self.method!r} has none (use fedavg-factors)")
        parse_fault(self.inject_fault)
        return self

    @property
    def clients_per_round(self) -> int:
        return max(1, int(self.clients * self.fraction))

    def to_run_config(self) -> dict[str, Any]:
        """Flower's run config: kebab-case keys, scalar values."""
        values = dataclasses.asdict(self)
        values["method_options"] = json.dumps(values["method_options"], sort_keys=True)
        return {key.replace("_", "-"): value for key, value in values.items()}

    @classmethod
    def from_run_config(cls, config) -> FederationSettings:
        names = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in dict(config).items():
            name = key.replace("-", "_")
            if name not in names:
                continue
            if name == "method_options":
                value = json.loads(value) if value else {}
            elif isinstance(names[name].default, bool):
                value = value if isinstance(value, bool) else str(value).lower() == "true"
            elif isinstance(names[name].default, float):
                value = float(value)
            elif isinstance(names[name].default, int):
                value = int(value)
            values[name] = value
        return cls(**values).validate()


def parse_fault(text: str) -> list[tuple[str, int, int]]:
    """'raise:1:2,hang:0:3' -> [('raise', client 1, round 2), ('hang', client 0, round 3)]; '' -> []."""
    faults = []
    for item in filter(None, text.split(",")):
        parts = item.strip().split(":")
        if not (len(parts) == 3 and parts[0] in ("raise", "hang") and parts[1].isdigit() and parts[2].isdigit()):
            raise PeftkitError(f"--inject-fault takes raise:CLIENT:ROUND or hang:CLIENT:ROUND (comma-separated), got {item!r}")
        faults.append((parts[0], int(parts[1]), int(parts[2])))
    return faults
