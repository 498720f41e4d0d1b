"""Federated adaptation on Flower: many data owners adapt one shared base model, and only adapters travel.

- `aggregation`: the rules (fedavg-factors, delta, frozen-a) as pure functions over adapter states.
- `partition`: each client's own examples, split with Flower Datasets (IID or Dirichlet over labels).
- `local`: what runs on an owner's machine (local training and evaluation), without Flower.
- `rounds`: the server's record of the rounds and its per-round checkpoint.
- `apps`: Flower's ClientApp and ServerApp (imports Flower: the `federated` extra).
- `simulation`: Flower's simulation engine on one machine, and the app folder for `flwr run`.

Importing this package imports no Flower; `peftkit.federated.apps` does.
"""

from peftkit.federated.aggregation import AGGREGATIONS, aggregate, stack_lora_updates
from peftkit.federated.settings import FederationSettings

__all__ = ["AGGREGATIONS", "FederationSettings", "aggregate", "stack_lora_updates"]
