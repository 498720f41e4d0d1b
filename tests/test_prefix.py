"""Prefix tuning: trained keys and values in every attention layer, checked against the real peft package."""

import inspect
import json

import peft
import pytest
import torch
import transformers
from conftest import TINY_MODELS, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from packaging.version import Version
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, DynamicCache, LlamaForCausalLM

from peftkit import PeftkitError, PeftModel, PrefixTuningConfig, get_peft_model
from peftkit.methods.prefix import CACHE_ARGUMENTS, KeyValuePrefix, cache_argument

TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
PROJECTION = {"table": dict(num_virtual_tokens=4), "projection": dict(num_virtual_tokens=3, prefix_projection=True)}

# transformers 5.24 renamed the models' key/value cache argument from past_key_values to cache (the old name
# is still taken, through a deprecation shim that drops it when cache is given too). peft 0.21.2, the newest
# release, still checks forward signatures for past_key_values and reads generate's step inputs under that
# name; peftkit passes whichever name the model takes. Until a peft release handles the new name, peft's own
# prefix tuning fails on such a transformers in the two ways marked below.
_PEFT_MISSES_CACHE_RENAME = (
    Version(peft.__version__) <= Version("0.21.2") and Version(transformers.__version__) >= Version("5.24")
)
_PEFT_VERSIONS = f"peft {peft.__version__} with transformers {transformers.__version__}"
peft_refuses_bert = pytest.mark.xfail(
    condition=_PEFT_MISSES_CACHE_RENAME, raises=ValueError, strict=True,
    reason=f"{_PEFT_VERSIONS}: peft's sequence-classification forward looks for past_key_values in "
           "BertModel.forward's signature, finds cache, and raises 'Model does not support past key values'",
)
peft_generate_drops_its_prefix = pytest.mark.xfail(
    condition=_PEFT_MISSES_CACHE_RENAME, raises=AssertionError, strict=True,
    reason=f"{_PEFT_VERSIONS}: peft's prepare_inputs_for_generation adds its prefix as past_key_values next to "
           "generate's own (empty) cache, and transformers keeps cache and drops past_key_values, so peft "
           "generates without its prefix",
)
# The families run through peft's prefix model too; BERT's is marked for the first limitation above.
FAMILIES_PEFT_RUNS = [pytest.param(family, marks=peft_refuses_bert) if family == "bert" else family for family in TASKS]


def config_kwargs(family, variant, **changes):
    return {"task_type": TASKS[family], **PROJECTION[variant], **changes}


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _greedy_without_cache(model, input_ids, attention_mask, steps):
    """Reference decoding: the full forward pass with the prefix on the whole sequence at every step.

    Position ids come from the padding mask, as generate makes them. Returns the sequence and the
    last-position logits of every step.
    """
    sequence, mask, step_logits = input_ids, attention_mask, []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = model(input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
            step_logits.append(logits)
            next_token = logits.argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return sequence, torch.stack(step_logits, dim=1)


# -- compatibility with peft -----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(TASKS))
@pytest.mark.parametrize("variant", list(PROJECTION))
def test_parameter_counts_equal_peft(family, variant):
    ours = get_peft_model(TINY_MODELS[family](), PrefixTuningConfig(**config_kwargs(family, variant)))
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft.PrefixTuningConfig(**config_kwargs(family, variant)))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("family", FAMILIES_PEFT_RUNS)
@pytest.mark.parametrize("variant", list(PROJECTION))
def test_peftkit_adapter_loads_in_peft(family, variant, tmp_path, input_ids):
    ours = get_peft_model(TINY_MODELS[family](), PrefixTuningConfig(**config_kwargs(family, variant)))
    randomise(ours, scale=0.3)
    expected = _logits(ours, input_ids=input_ids)
    with ours.disable_adapter():
        assert not torch.allclose(_logits(ours, input_ids=input_ids), expected, atol=1e-3)  # the prefix matters
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)
    # peft's config, filled from the model at wrap time, says the same
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    prefix = theirs.peft_config["default"]
    for field in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules", "encoder_hidden_size"):
        assert saved[field] == getattr(prefix, field), field


@pytest.mark.parametrize("family", FAMILIES_PEFT_RUNS)
@pytest.mark.parametrize("variant", list(PROJECTION))
def test_peft_adapter_loads_in_peftkit(family, variant, tmp_path, input_ids):
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft.PrefixTuningConfig(**config_kwargs(family, variant)))
    randomise(theirs, scale=0.3)
    theirs.eval()
    expected = _logits(theirs, input_ids=input_ids)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    torch.testing.assert_close(_logits(ours, input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in peft


def test_saved_layout_is_peft_layout(tmp_path):
    model = get_peft_model(tiny_bert(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, prefix_projection=True))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    # the final key/value table for all layers (3 layers * key and value * hidden 32), and the head as peft keys it
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": (5, 3 * 2 * 32), "base_model.classifier.weight": (3, 32), "base_model.classifier.bias": (3,)}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is True
    assert (config["token_dim"], config["num_layers"], config["num_attention_heads"], config["encoder_hidden_size"]) == (32, 3, 2, 32)


def test_llama_prefix_has_key_value_head_shape(input_ids):
    # Llama here: 4 query heads, 2 key/value heads of dimension 8; the prefix has the key/value shape.
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=6))
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    cache = model.model_adapters["default"].key_value_cache(batch_size=2)
    assert len(cache.layers) == 2
    assert tuple(cache.layers[0].keys.shape) == (2, 2, 6, 8) and tuple(cache.layers[1].values.shape) == (2, 2, 6, 8)
    # peft's config for grouped-query attention (hidden size and query heads given) is taken the same way
    again = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=6, token_dim=32, num_attention_heads=4))
    assert again.peft_config["default"].token_dim == 16


def test_given_position_ids_move_past_the_prefix_as_in_peft(tmp_path):
    # Position ids passed in are shifted by num_virtual_tokens (peft does so); a model counting on from the
    # cache gives the same positions, so both calls agree with peft's.
    theirs = peft.get_peft_model(tiny_gpt2(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    randomise(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    tokens = torch.randint(2, 120, (2, 7), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    expected = _logits(theirs, input_ids=tokens, position_ids=positions)
    torch.testing.assert_close(_logits(ours, input_ids=tokens, position_ids=positions), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(ours, input_ids=tokens)[0], expected[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_logits(ours, input_ids=tokens)[1], expected[1], atol=1e-4)


# -- training, saving, switching --------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(PROJECTION))
def test_training_changes_only_the_prefix_and_head(variant, input_ids):
    model = get_peft_model(tiny_bert(), PrefixTuningConfig(**config_kwargs("bert", variant)))
    base = {k: v.clone() for k, v in tiny_bert().state_dict().items()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model_adapters.default.") or ".classifier.adapters.default." in n for n in trainable)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(input_ids=input_ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any(n.startswith("model_adapters.") for n in changed) and any("classifier" in n for n in changed)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, input_ids=input_ids), _logits(tiny_bert(), input_ids=input_ids), rtol=0, atol=0)
    for key, value in model.base_model.state_dict().items():
        if key in base:
            assert torch.equal(value, base[key]), key


@pytest.mark.parametrize("family", list(TASKS))
def test_save_and_load_round_trip(family, tmp_path, input_ids):
    model = get_peft_model(TINY_MODELS[family](), PrefixTuningConfig(**config_kwargs(family, "projection")))
    randomise(model, scale=0.3)
    expected = _logits(model, input_ids=input_ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    torch.testing.assert_close(_logits(loaded, input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)
    # a loaded projection adapter is the table it produced; trained further, it trains that table
    trainable = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad and n.startswith("model_adapters.")]
    assert names == ["model_adapters.default.prefix_table"]
    torch.testing.assert_close(_logits(trainable, input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)
    # a config asking for the projection while training still loads: the adapter becomes the saved table
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "inference_mode": False}))
    converted = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path, is_trainable=True)
    assert [n for n, _ in converted.model_adapters.named_parameters()] == ["default.prefix_table"]
    torch.testing.assert_close(_logits(converted, input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)


def test_zero_init_and_inputs_embeds(input_ids):
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, init_weights="zero", prefix_projection=True))
    assert not model.model_adapters["default"].table().any()
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                       init_weights="zero", prefix_projection=True))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomise(model, scale=0.3)
    embeds = model.base_model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(_logits(model, inputs_embeds=embeds), _logits(model, input_ids=input_ids))


def test_two_named_adapters_switch_and_disable(tmp_path, input_ids):
    model = get_peft_model(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=3))
    model.add_adapter("long", PrefixTuningConfig(num_virtual_tokens=7, prefix_projection=True))
    randomise(model, scale=0.3)
    first = _logits(model, input_ids=input_ids)
    model.set_adapter("long")
    randomise(model, seed=5, scale=0.3)
    second = _logits(model, input_ids=input_ids)
    assert not torch.allclose(first, second, atol=1e-3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model_adapters.long.") for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, input_ids=input_ids), first)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, input_ids=input_ids), _logits(tiny_gpt2(), input_ids=input_ids))
    with pytest.raises(PeftkitError, match="only one of them"):
        model.set_adapter(["default", "long"])
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    theirs.load_adapter(tmp_path / "long", adapter_name="long")
    for name, expected in [("default", first), ("long", second)]:
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(theirs.eval(), input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)


# -- padding and generation -------------------------------------------------------------------------

def test_bert_padded_batch_gives_each_example_its_own_result():
    model = get_peft_model(tiny_bert(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    randomise(model, scale=0.3)
    tokens = torch.randint(2, 120, (3, 8), generator=torch.Generator().manual_seed(6))
    lengths = [8, 5, 3]
    mask = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch = _logits(model, input_ids=tokens * mask, attention_mask=mask)
    for row, length in enumerate(lengths):
        alone = _logits(model, input_ids=tokens[row:row + 1, :length], attention_mask=torch.ones(1, length, dtype=torch.long))
        torch.testing.assert_close(batch[row:row + 1], alone, rtol=1e-5, atol=1e-6)
        no_mask = _logits(model, input_ids=tokens[row:row + 1, :length])
        torch.testing.assert_close(no_mask, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_right_padded_batch_gives_each_example_its_own_logits(family):
    model = get_peft_model(TINY_MODELS[family](), PrefixTuningConfig(num_virtual_tokens=5))
    tokens = torch.randint(2, 120, (2, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    batch = _logits(model, input_ids=tokens, attention_mask=mask)
    alone = _logits(model, input_ids=tokens[1:, :5], attention_mask=mask[1:, :5])
    torch.testing.assert_close(batch[1, :5], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_greedy_decoding_without_cache(family, input_ids):
    model = get_peft_model(TINY_MODELS[family](), PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True))
    randomise(model, scale=0.3)
    # a left-padded batch: example 1 has three pad tokens in front
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    padded = input_ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        generated = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    reference, reference_logits = _greedy_without_cache(model, padded, mask, steps=5)
    assert generated.sequences.tolist() == reference.tolist()
    torch.testing.assert_close(torch.stack(generated.logits, dim=1), reference_logits, rtol=1e-4, atol=1e-4)
    # each example alone generates what it generates in the batch
    with torch.no_grad():
        alone = model.generate(input_ids[1:, 3:], max_new_tokens=5, do_sample=False, pad_token_id=0)
        plain = model.generate(input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert alone[0, -5:].tolist() == generated.sequences[1, -5:].tolist()
    assert plain.tolist() == _greedy_without_cache(model, input_ids, torch.ones_like(input_ids), steps=5)[0].tolist()
    # generate leaves the model's own step preparation as it was
    assert "prepare_inputs_for_generation" not in vars(model.base_model)
    with model.disable_adapter(), torch.no_grad():
        base_logits = model.generate(input_ids, max_new_tokens=1, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True, output_logits=True).logits[0]
    assert not torch.allclose(base_logits, _logits(model, input_ids=input_ids)[:, -1], atol=1e-3)  # the prefix matters


@peft_generate_drops_its_prefix
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_peft_generate(family, tmp_path, input_ids):
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    randomise(theirs, scale=0.3)
    theirs.eval().save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    with torch.no_grad():
        expected = theirs.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = ours.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("name", CACHE_ARGUMENTS)
def test_manual_decoding_with_the_returned_cache(name, input_ids):
    # A cache returned by an earlier call holds the prefix already and is used as it is, under either name.
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():
        first = model(input_ids=input_ids[:, :6], use_cache=True)
        returned = first["cache"] if "cache" in first else first["past_key_values"]  # its name from 5.24 on
        step = model(input_ids=input_ids[:, 6:7], **{name: returned}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, _logits(model, input_ids=input_ids[:, :7])[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(PeftkitError, match="both past_key_values and cache"):
        model(input_ids=input_ids[:, 6:7], past_key_values=returned, cache=returned)


# -- either name of the cache argument -------------------------------------------------------------
# Models of transformers >= 5.24 take the cache as `cache`, earlier ones as `past_key_values`. These two
# tiny Llamas declare one name each and hand the cache on under the name this transformers uses, so
# whichever transformers runs the tests, prefix tuning is tried with both.

def _forward_under_native_name(forward, cache, **inputs):
    assert not set(CACHE_ARGUMENTS) & inputs.keys(), "the cache came under the name this model does not take"
    native = next(name for name in CACHE_ARGUMENTS if name in inspect.signature(forward).parameters)
    return forward(**inputs, **{native: cache})


class LlamaTakingCache(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        return _forward_under_native_name(super().forward, cache, input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)


class LlamaTakingPastKeyValues(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        return _forward_under_native_name(super().forward, past_key_values, input_ids=input_ids,
                                          attention_mask=attention_mask, position_ids=position_ids, **kwargs)


@pytest.mark.parametrize("model_class, name", [(LlamaTakingCache, "cache"), (LlamaTakingPastKeyValues, "past_key_values")])
def test_prefix_reaches_a_model_under_the_name_its_forward_takes(model_class, name, input_ids):
    reference = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=4))
    randomise(reference, scale=0.3)
    plain = reference.base_model
    renamed = model_class(plain.config).eval()
    renamed.load_state_dict(plain.state_dict())
    assert cache_argument(renamed) == name
    model = get_peft_model(renamed, PrefixTuningConfig(num_virtual_tokens=4))
    model.model_adapters["default"].load_state_dict(reference.model_adapters["default"].state_dict())
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    torch.testing.assert_close(_logits(model, input_ids=input_ids, attention_mask=mask),
                               _logits(reference, input_ids=input_ids, attention_mask=mask), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        settings = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert model.generate(**settings).tolist() == reference.generate(**settings).tolist()
    for argument in CACHE_ARGUMENTS:
        with pytest.raises(PeftkitError, match=f"do not pass {argument}"):
            model.generate(input_ids=input_ids, max_new_tokens=2, **{argument: DynamicCache()})


# -- what prefix tuning cannot do -------------------------------------------------------------------

def test_merge_is_refused_with_the_reason(input_ids):
    model = get_peft_model(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=3))
    before = _logits(model, input_ids=input_ids)
    for action in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(PeftkitError, match="keys and values .* no weight to merge"):
            action()
    torch.testing.assert_close(_logits(model, input_ids=input_ids), before)
    assert not KeyValuePrefix.mergeable


def test_vit_has_no_key_value_cache_and_is_refused():
    with pytest.raises(PeftkitError, match="ViTForImageClassification.*past_key_values.*ViTModel"):
        get_peft_model(tiny_vit(), PrefixTuningConfig(num_virtual_tokens=4))


def test_plain_pytorch_model_is_refused():
    from conftest import ConvNet

    with pytest.raises(PeftkitError, match="needs a transformers model"):
        get_peft_model(ConvNet(), PrefixTuningConfig(num_virtual_tokens=4))


def test_gradient_checkpointing_is_refused():
    base = tiny_gpt2()
    base.gradient_checkpointing_enable()
    with pytest.raises(PeftkitError, match="gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=4))


def test_model_that_drops_the_cache_is_caught_at_the_first_forward(input_ids):
    class DropsExtraArguments(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask)

    model = get_peft_model(DropsExtraArguments(tiny_bert().config).eval(), PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(PeftkitError, match="without using the key/value prefix"):
        model(input_ids=input_ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "num_virtual_tokens must be set"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (dict(num_virtual_tokens=4, num_transformer_submodules=2), "encoder-decoder"),
    (dict(num_virtual_tokens=4, token_dim=30, num_attention_heads=4), "not divisible"),
    (dict(num_virtual_tokens=4, init_weights="ones"), "init_weights"),
])
def test_bad_config_values_are_refused(kwargs, message):
    with pytest.raises(PeftkitError, match=message):
        PrefixTuningConfig(**kwargs)


@pytest.mark.parametrize("field, value", [("num_layers", 5), ("token_dim", 64), ("num_attention_heads", 8)])
def test_sizes_that_do_not_fit_the_model_are_refused(field, value):
    with pytest.raises(PeftkitError, match=f"{field}={value} does not fit GPT2LMHeadModel"):
        get_peft_model(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=4, **{field: value}))
