"""Federated aggregation as pure functions over adapter states: exactness in float64, no Flower needed."""

import pytest
import torch
from conftest import randomise, tiny_bert

from peftkit import BitFitConfig, LoraConfig, get_peft_model
from peftkit.errors import PeftkitError
from peftkit.federated.aggregation import (
    aggregate,
    factor_to_rank,
    lora_modules,
    lora_update,
    shared_keys,
    stack_lora_updates,
    weighted_mean,
)
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.ln_tuning import LNTuningConfig

PREFIX = "base_model.model.layer."


def lora_state(seed, out=6, inp=5, r=2, a=None):
    generator = torch.Generator().manual_seed(seed)
    return {
        PREFIX + "lora_A.weight": a.clone() if a is not None else torch.randn(r, inp, generator=generator, dtype=torch.float64),
        PREFIX + "lora_B.weight": torch.randn(out, r, generator=generator, dtype=torch.float64),
        "base_model.model.classifier.weight": torch.randn(3, inp, generator=generator, dtype=torch.float64),
    }


def mean_update(states, weights):
    total = sum(weights)
    return sum(w / total * (s[PREFIX + "lora_B.weight"] @ s[PREFIX + "lora_A.weight"]) for s, w in zip(states, weights))


def test_fedavg_factors_is_the_mean_of_each_tensor_and_not_the_mean_of_the_updates():
    states, weights = [lora_state(seed) for seed in range(3)], [10, 30, 60]
    averaged, report = aggregate("fedavg-factors", states, weights)
    for key in states[0]:
        expected = sum(w / 100 * s[key] for s, w in zip(states, weights))
        torch.testing.assert_close(averaged[key], expected, rtol=0, atol=1e-12)
    product = averaged[PREFIX + "lora_B.weight"] @ averaged[PREFIX + "lora_A.weight"]
    assert not torch.allclose(product, mean_update(states, weights), atol=1e-3)  # the baseline's known error
    assert report.rule == "fedavg-factors" and report.clients == 3


def test_delta_gives_the_mean_update_exactly_when_it_fits_in_rank_r():
    # Two clients sharing A: their mean update has rank r, so the SVD loses nothing.
    shared_a = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    states, weights = [lora_state(seed, a=shared_a) for seed in (1, 2)], [1, 3]
    averaged, report = aggregate("delta", states, weights)
    product = averaged[PREFIX + "lora_B.weight"] @ averaged[PREFIX + "lora_A.weight"]
    torch.testing.assert_close(product, mean_update(states, weights), rtol=0, atol=1e-12)
    assert report.max_factorization_error < 1e-12
    assert averaged[PREFIX + "lora_A.weight"].shape == (2, 5) and averaged[PREFIX + "lora_B.weight"].shape == (6, 2)


def test_delta_is_the_best_rank_r_approximation_and_reports_its_error():
    states, weights = [lora_state(seed) for seed in range(4)], [1, 1, 2, 4]
    averaged, report = aggregate("delta", states, weights)
    target = mean_update(states, weights)
    product = averaged[PREFIX + "lora_B.weight"] @ averaged[PREFIX + "lora_A.weight"]
    singular = torch.linalg.svdvals(target)
    best_error = singular[2:].square().sum().sqrt() / singular.square().sum().sqrt()  # Eckart-Young
    error = torch.linalg.norm(target - product) / torch.linalg.norm(target)
    assert float(error) == pytest.approx(float(best_error), rel=1e-9)
    assert report.factorization_errors[PREFIX] == pytest.approx(float(best_error), rel=1e-9)
    assert 0 < report.max_factorization_error < 1
    # and it is closer to the mean update than averaging the factors
    factors, _ = aggregate("fedavg-factors", states, weights)
    naive = factors[PREFIX + "lora_B.weight"] @ factors[PREFIX + "lora_A.weight"]
    assert torch.linalg.norm(target - product) < torch.linalg.norm(target - naive)
    # the head is averaged element-wise
    torch.testing.assert_close(averaged["base_model.model.classifier.weight"], factors["base_model.model.classifier.weight"])


def test_stacking_gives_the_exact_mean_update_at_rank_r_times_k():
    states, weights = [lora_state(seed) for seed in range(3)], [2, 3, 5]
    stacked = stack_lora_updates(states, weights)
    assert stacked[PREFIX + "lora_A.weight"].shape == (6, 5) and stacked[PREFIX + "lora_B.weight"].shape == (6, 6)
    product = stacked[PREFIX + "lora_B.weight"] @ stacked[PREFIX + "lora_A.weight"]
    torch.testing.assert_close(product, mean_update(states, weights), rtol=0, atol=1e-12)


def test_frozen_a_is_exact_and_refuses_a_sent_a():
    shared_a = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full = [lora_state(seed, a=shared_a) for seed in range(3)]
    sent = [{k: v for k, v in s.items() if k in shared_keys("frozen-a", list(s))} for s in full]
    assert all(PREFIX + "lora_A.weight" not in s for s in sent)
    averaged, _ = aggregate("frozen-a", sent, [1, 2, 3])
    torch.testing.assert_close(averaged[PREFIX + "lora_B.weight"] @ shared_a, mean_update(full, [1, 2, 3]), rtol=0, atol=1e-12)
    with pytest.raises(PeftkitError, match="must not send LoRA's A"):
        aggregate("frozen-a", full, [1, 2, 3])


def test_conv_lora_factors_reshape_for_the_update():
    a = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, 2, 1, 1, dtype=torch.float64)
    assert lora_update(a, b).shape == (4, 27)
    b_new, a_new, error = factor_to_rank(lora_update(a, b), 2)
    torch.testing.assert_close(b_new @ a_new, lora_update(a, b), rtol=0, atol=1e-12)
    assert error < 1e-12


def test_factor_to_rank_of_zero_has_no_error():
    b, a, error = factor_to_rank(torch.zeros(4, 3, dtype=torch.float64), 2)
    assert error == 0.0 and torch.count_nonzero(b @ a) == 0


@pytest.mark.parametrize("config", [BitFitConfig(), IA3Config(), LNTuningConfig()], ids=["bitfit", "ia3", "ln_tuning"])
def test_element_wise_methods_average_exactly(config):
    """For tensors that enter the model linearly, the mean of the tensors is the mean of the updates."""
    states = []
    for seed in range(3):
        model = get_peft_model(tiny_bert(seed=0).double(), config)
        randomise(model, seed=seed + 1)
        states.append({k: v.detach().clone() for k, v in model.adapter_state("default").items()})
    assert not lora_modules(list(states[0]))
    averaged, report = aggregate("fedavg-factors", states, [1, 2, 3])
    assert report.factorization_errors == {}
    for key in states[0]:
        torch.testing.assert_close(averaged[key], (states[0][key] + 2 * states[1][key] + 3 * states[2][key]) / 6,
                                   rtol=0, atol=1e-12)
    delta, _ = aggregate("delta", states, [1, 2, 3])  # no LoRA: delta is the same mean
    for key in states[0]:
        torch.testing.assert_close(delta[key], averaged[key], rtol=0, atol=0)


def test_lora_adapter_states_of_a_real_model_pair_up():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    keys = list(model.adapter_state("default"))
    pairs = lora_modules(keys)
    assert len(pairs) == 6  # 3 layers x (query, value)
    assert any(k.startswith("base_model.model.classifier") for k in keys)
    assert all(not k.endswith("lora_A.weight") for k in shared_keys("frozen-a", keys))


def test_bad_inputs_are_named():
    with pytest.raises(PeftkitError, match="unknown aggregation 'median'"):
        aggregate("median", [lora_state(0)], [1])
    with pytest.raises(PeftkitError, match="weights must be >= 0"):
        weighted_mean([lora_state(0)], [0])
    other = lora_state(1)
    other.pop("base_model.model.classifier.weight")
    with pytest.raises(PeftkitError, match="client 1 sent other adapter tensors"):
        weighted_mean([lora_state(0), other], [1, 1])
    with pytest.raises(PeftkitError, match="of shape"):
        weighted_mean([lora_state(0), lora_state(1, r=3)], [1, 1])
