"""BitFit and layer-wise freezing train exactly the parameters they say, and nothing else moves."""

import pytest
import torch
from conftest import tiny_bert, tiny_llama

from peftkit import BitFitConfig, FreezeConfig, PeftkitError, get_peft_model


def _bias_count(model, selector=lambda name: True):
    return sum(m.bias.numel() for n, m in model.named_modules()
               if isinstance(getattr(m, "bias", None), torch.nn.Parameter) and selector(n))


def test_bitfit_trains_every_bias_by_default():
    base = tiny_bert()
    expected = _bias_count(base)
    model = get_peft_model(base, BitFitConfig())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == sum(p.numel() for p in tiny_bert().parameters())  # bias deltas are not extra parameters


def test_bitfit_on_chosen_modules_and_training_moves_only_biases(input_ids):
    model = get_peft_model(tiny_bert(), BitFitConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    head = model.base_model.classifier.adapters["default"].module
    expected = _bias_count(tiny_bert(), lambda n: n.endswith(("query", "value"))) + sum(p.numel() for p in head.parameters())
    assert model.get_nb_trainable_parameters()[0] == expected
    base_before = {k: v.clone() for k, v in tiny_bert().state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    loss = model(input_ids=input_ids, labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()
    with model.disable_adapter():  # the base is untouched
        for name, value in base_before.items():
            owner = model.base_model
            assert torch.equal(_lookup(owner, name), value), name


def _lookup(model, dotted):
    *path, leaf = dotted.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
        module = getattr(module, "base_layer", module)
    return getattr(module, leaf)


def test_bitfit_on_model_without_biases_says_so():
    with pytest.raises(PeftkitError, match="no module with a bias"):
        get_peft_model(tiny_llama(), BitFitConfig(target_modules=["q_proj"]))


def test_freeze_last_k_trains_copies_of_the_last_blocks(input_ids):
    base = tiny_bert()
    block = sum(p.numel() for p in base.bert.encoder.layer[2].parameters())
    model = get_peft_model(base, FreezeConfig(last_k=1))
    assert model.get_nb_trainable_parameters()[0] == block
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("base_model.bert.encoder.layer.2.adapters.default.module.") for n in names)


def test_freeze_layer_indices_and_layernorm_tuning():
    base = tiny_llama()
    norms = sum(p.numel() for n, p in base.named_parameters() if "norm" in n and ".layers.0." not in n)
    block0 = sum(p.numel() for p in base.model.layers[0].parameters())
    model = get_peft_model(base, FreezeConfig(layers_to_train=[0], train_layernorm=True))
    assert model.get_nb_trainable_parameters()[0] == block0 + norms


@pytest.mark.parametrize("config, message", [
    (dict(layers_to_train=[5]), "layer 5 does not exist: LlamaForCausalLM has 2 blocks"),
    (dict(), "trains nothing"),
    (dict(last_k=0), "last_k must be positive"),
])
def test_freeze_errors(config, message):
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(tiny_llama(), FreezeConfig(**config))
