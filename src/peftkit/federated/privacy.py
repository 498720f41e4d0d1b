"""The privacy budget (epsilon, delta) that a federation with Flower's DP mods spent.

`--dp-noise` runs Flower's central DP with client-side clipping: each sampled client clips its update to
norm C, and the server adds Gaussian noise of standard deviation noise_multiplier x C to their sum (x C /
clients-per-round to their mean). That is the subsampled Gaussian mechanism of DP-FedAvg (McMahan et al.,
2018), at the client level: two federations are neighbours when one client's whole data is added or
removed. `privacy_budget` composes it over the rounds with the Renyi-DP accountant of Google's
`dp-accounting` package (the federated extra) and converts to (epsilon, delta).

Flower samples a fixed number of clients per round; the accountant treats it as Poisson sampling at the
same rate q = clients_per_round / clients, the usual approximation in the DP-FedAvg literature. With few
clients the budget is large: the noise on the mean shrinks only as more clients are sampled per round.
"""

from __future__ import annotations

from typing import Any

from peftkit.errors import PeftkitError

DEFAULT_DELTA = 1e-5
ACCOUNTANT = "Renyi DP (dp-accounting), Poisson-sampled Gaussian at q = clients per round / clients, client-level"


def privacy_budget(noise_multiplier: float, clients_per_round: int, clients: int, rounds: int,
                   delta: float = DEFAULT_DELTA) -> dict[str, Any]:
    """{"epsilon", "delta", "noise_multiplier", "sampling_rate", "rounds", "accountant"}; epsilon is None, with a
    "note" saying how to get it, where `dp-accounting` is not installed. No noise: epsilon is infinite."""
    if clients <= 0 or not 0 < clients_per_round <= clients or rounds < 0 or not 0 < delta < 1:
        raise PeftkitError(f"privacy_budget needs 0 < clients_per_round <= clients, rounds >= 0 and 0 < delta < 1; got "
                           f"clients_per_round={clients_per_round}, clients={clients}, rounds={rounds}, delta={delta}")
    rate = clients_per_round / clients
    budget: dict[str, Any] = {"epsilon": None, "delta": delta, "noise_multiplier": noise_multiplier, "sampling_rate": rate,
                              "rounds": rounds, "accountant": ACCOUNTANT}
    if noise_multiplier <= 0:
        budget["epsilon"] = float("inf")
        return budget
    try:
        import dp_accounting
    except ImportError:
        budget["note"] = "epsilon not computed: pip install dp-accounting (or peftkit[federated])"
        return budget
    import logging

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds)
    accountant = dp_accounting.rdp.RdpAccountant()
    absl = logging.getLogger("absl")  # it warns for each RDP order whose series does not converge (left out, safely)
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(event)
        budget["epsilon"] = float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)
    return budget


def describe(budget: dict[str, Any]) -> str:
    """One line for the CLI: the budget, or why there is none."""
    if budget["epsilon"] is None:
        return budget.get("note", "epsilon not computed")
    return (f"epsilon {budget['epsilon']:.3g} at delta {budget['delta']:g} (noise multiplier {budget['noise_multiplier']:g}, "
            f"{budget['rounds']} round{'' if budget['rounds'] == 1 else 's'} at sampling rate {budget['sampling_rate']:.2g}; {budget['accountant']})")
