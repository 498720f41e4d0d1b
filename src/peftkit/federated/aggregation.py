"""Aggregating clients' adapters: pure functions over adapter states (the peft-layout key -> tensor dicts
that `PeftModel.adapter_state` gives), with no Flower in them.

Three rules, named as `peftkit federate --aggregate` takes them:

- ``fedavg-factors``: the weighted mean of every tensor, LoRA's A and B each on its own. What most
  federated LoRA code does, and not the mean of the updates: mean(B) mean(A) != mean(B A).
- ``delta``: for each LoRA module the weighted mean of the updates B_k A_k, computed exactly and factored
  back to the module's rank r by a truncated SVD (the best rank-r approximation); the relative error of
  that factorization is reported. `stack_lora_updates` gives the exact mean at rank r*k instead.
- ``frozen-a``: every client shares the same A, frozen, and trains only B; then mean(B_k) A = mean(B_k A)
  and the plain mean is exact. Clients send no A at all.

Tensors that enter a model linearly (biases for BitFit, IA3's scaling vectors, LayerNorm weights, a
classification head's weights) are averaged element-wise under every rule: for them the mean of the
tensors is the mean of the updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from peftkit.errors import PeftkitError

AGGREGATIONS = ("fedavg-factors", "delta", "frozen-a")
LORA_A_SUFFIX = "lora_A.weight"
LORA_B_SUFFIX = "lora_B.weight"

State = Mapping[str, torch.Tensor]


@dataclass
class AggregationReport:
    """What an aggregation did: its rule, the clients and, for ``delta``, the SVD's relative error per module."""

    rule: str
    clients: int
    factorization_errors: dict[str, float] = field(default_factory=dict)  # module key prefix -> ||M - B'A'|| / ||M||

    @property
    def max_factorization_error(self) -> float:
        return max(self.factorization_errors.values(), default=0.0)


def check_rule(rule: str) -> str:
    if rule not in AGGREGATIONS:
        raise PeftkitError(f"unknown aggregation {rule!r}: choose one of {', '.join(AGGREGATIONS)}")
    return rule


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights (a client's example count, typically) scaled to sum to 1."""
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise PeftkitError(f"aggregation weights must be >= 0 with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def check_same_keys(states: Sequence[State]) -> list[str]:
    """The keys every state has (in the first state's order); a client with other keys or shapes is refused."""
    if not states:
        raise PeftkitError("nothing to aggregate: no client states")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            odd = sorted(set(state) ^ set(keys))[:3]
            raise PeftkitError(f"client {index} sent other adapter tensors than client 0 (e.g. {odd}); "
                               "every client must run the same method and config")
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise PeftkitError(f"client {index} sent {key} of shape {tuple(state[key].shape)}, "
                                   f"client 0 of shape {tuple(states[0][key].shape)}")
    return keys


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Element-wise weighted mean of every tensor, in the tensors' own dtype (accumulated in float64)."""
    keys = check_same_keys(states)
    shares = normalized_weights(weights)
    return {key: _mean_of([state[key] for state in states], shares) for key in keys}


def _mean_of(tensors: Sequence[torch.Tensor], shares: Sequence[float]) -> torch.Tensor:
    if not tensors[0].is_floating_point():  # integer tensors (indices) must agree: they are not averaged
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise PeftkitError("clients sent different integer tensors (indices); they cannot be averaged")
        return tensors[0].clone()
    total = sum(t.to(torch.float64) * s for t, s in zip(tensors, shares))
    return total.to(tensors[0].dtype)


def lora_modules(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The LoRA modules among adapter keys: module key prefix -> (its A key, its B key)."""
    pairs = {}
    for key in keys:
        if key.endswith(LORA_A_SUFFIX):
            prefix = key[: -len(LORA_A_SUFFIX)]
            if prefix + LORA_B_SUFFIX in keys:
                pairs[prefix] = (key, prefix + LORA_B_SUFFIX)
    return pairs


def lora_update(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B A as a matrix (out, in*k*k) in float64, for linear (A (r, in), B (out, r)) and conv LoRA (A (r, in, k, k),
    B (out, r, 1, 1)) alike; LoRA's scaling is left out (the same on every client)."""
    rank = a.shape[0]
    return b.reshape(b.shape[0], rank).to(torch.float64) @ a.reshape(rank, -1).to(torch.float64)


def factor_to_rank(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of `update` (out, in): (B (out, rank), A (rank, in), relative Frobenius
    error ||update - B A|| / ||update||), with the singular values split evenly between B and A."""
    u, s, vh = torch.linalg.svd(update.to(torch.float64), full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    b = torch.zeros(update.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, update.shape[1], dtype=torch.float64)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    norm = torch.linalg.norm(update)
    error = float(torch.linalg.norm(update - b @ a) / norm) if norm > 0 else 0.0
    return b, a, error


def aggregate_delta(states: Sequence[State], weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weighted mean of each LoRA module's update B_k A_k, factored back to rank r (SVD); other tensors averaged.

    Returns (state, {module prefix: relative factorization error}).
    """
    keys = check_same_keys(states)
    shares = normalized_weights(weights)
    result = weighted_mean(states, shares)
    errors = {}
    for prefix, (a_key, b_key) in lora_modules(keys).items():
        a0, b0 = states[0][a_key], states[0][b_key]
        mean_update = sum(lora_update(s[a_key], s[b_key]) * share for s, share in zip(states, shares))
        b, a, errors[prefix] = factor_to_rank(mean_update, a0.shape[0])
        result[a_key] = a.reshape(a0.shape).to(a0.dtype)
        result[b_key] = b.reshape(b0.shape).to(b0.dtype)
    return result, errors


def stack_lora_updates(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The exact weighted mean of the LoRA updates as one LoRA of rank r*k: A = [A_1; ...; A_k],
    B = [w_1 B_1, ..., w_k B_k], so B A = sum_k w_k B_k A_k with no error. Other tensors averaged."""
    keys = check_same_keys(states)
    shares = normalized_weights(weights)
    result = weighted_mean(states, shares)
    for a_key, b_key in lora_modules(keys).values():
        result[a_key] = torch.cat([s[a_key] for s in states], dim=0)
        result[b_key] = torch.cat([s[b_key] * share for s, share in zip(states, shares)], dim=1).to(states[0][b_key].dtype)
    return result


def aggregate(rule: str, states: Sequence[State], weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], AggregationReport]:
    """Aggregate the clients' states under `rule` (one of AGGREGATIONS), weighted by `weights`."""
    check_rule(rule)
    report = AggregationReport(rule=rule, clients=len(states))
    if rule == "delta":
        state, report.factorization_errors = aggregate_delta(states, weights)
        return state, report
    if rule == "frozen-a":
        leaked = [key for key in states[0] if key.endswith(LORA_A_SUFFIX)] if states else []
        if leaked:
            raise PeftkitError(f"frozen-a: clients must not send LoRA's A (it is shared and frozen), got {leaked[:2]}")
    return weighted_mean(states, weights), report


def shared_keys(rule: str, adapter_keys: Sequence[str]) -> list[str]:
    """The adapter keys that travel each round under `rule`: all of them, but LoRA's A under ``frozen-a``."""
    check_rule(rule)
    if rule == "frozen-a":
        return [key for key in adapter_keys if not key.endswith(LORA_A_SUFFIX)]
    return list(adapter_keys)
