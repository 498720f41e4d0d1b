"""Prompt tuning and P-tuning: virtual tokens in front of the input, checked against the real peft package."""

import json
import shutil

import peft
import pytest
import torch
from conftest import TINY_MODELS, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file

from peftkit import PeftkitError, PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model

TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
METHODS = {
    "prompt": (PromptTuningConfig, peft.PromptTuningConfig, dict(num_virtual_tokens=5)),
    "ptuning-mlp": (PromptEncoderConfig, peft.PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "ptuning-lstm": (PromptEncoderConfig, peft.PromptEncoderConfig,
                     dict(num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM",
                          encoder_num_layers=2, encoder_dropout=0.1)),
}


# Every family with each kind of virtual tokens somewhere, kept short for the test time.
CASES = [("bert", "prompt"), ("bert", "ptuning-mlp"), ("gpt2", "prompt"), ("gpt2", "ptuning-lstm"),
         ("llama", "prompt"), ("llama", "ptuning-mlp"), ("llama", "ptuning-lstm")]


def ours_config(method, family, **changes):
    cls, _, kwargs = METHODS[method]
    return cls(task_type=TASKS[family], **{**kwargs, **changes})


def peft_config(method, family):
    _, cls, kwargs = METHODS[method]
    return cls(task_type=TASKS[family], **kwargs)


def _greedy_without_cache(model, input_ids, steps):
    """Reference decoding: the full forward pass on the whole sequence at every step, no cache."""
    sequence = input_ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=sequence, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


# -- compatibility with peft -----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(TASKS))
@pytest.mark.parametrize("method", list(METHODS))
def test_parameter_counts_equal_peft(family, method):
    ours = get_peft_model(TINY_MODELS[family](), ours_config(method, family))
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft_config(method, family))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("family, method", CASES)
def test_peftkit_file_loads_in_peft(family, method, tmp_path, input_ids):
    ours = get_peft_model(TINY_MODELS[family](), ours_config(method, family))
    randomise(ours, scale=0.3)
    ours.eval()
    labels = torch.tensor([0, 2]) if family == "bert" else input_ids
    with torch.no_grad():
        expected = ours(input_ids=input_ids, labels=labels)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path).eval()
    with torch.no_grad():
        got = theirs(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    again = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids).logits, expected.logits, rtol=1e-5, atol=1e-6)
    # peft leaves a loaded prompt trainable even for inference; the totals agree
    assert again.get_nb_trainable_parameters()[1] == theirs.get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("family, method", CASES)
def test_peft_file_loads_in_peftkit(family, method, tmp_path, input_ids):
    theirs = peft.get_peft_model(TINY_MODELS[family](), peft_config(method, family))
    randomise(theirs, scale=0.3)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == 0  # loaded for inference, as in peft
    trainable = PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path, adapter_name="t", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0
    with torch.no_grad():
        torch.testing.assert_close(trainable(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_saved_file_has_peft_layout(tmp_path):
    given = PromptTuningConfig(num_virtual_tokens=6, task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), given)
    assert given.token_dim is None  # the completed copy is kept, the caller's config is left alone
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    assert tensors["prompt_embeddings"].shape == (6, 32)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    # filled from the model at wrap time, as peft does
    assert (config["token_dim"], config["num_layers"], config["num_attention_heads"], config["num_transformer_submodules"]) == (32, 3, 2, 1)


def test_ptuning_file_holds_the_encoder_output(tmp_path, input_ids):
    model = get_peft_model(tiny_gpt2(), ours_config("ptuning-lstm", "gpt2"))
    randomise(model, scale=0.3)
    model.train()  # dropout in the LSTM must not reach the file
    model.save_pretrained(tmp_path)
    owner = model.model_adapters["default"]
    owner.eval()
    with torch.no_grad():
        expected = owner.virtual_tokens()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {"prompt_embeddings"}
    torch.testing.assert_close(saved["prompt_embeddings"], expected)
    assert not torch.allclose(expected, owner.embedding)  # the encoder did change its input
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["encoder_hidden_size"] == 8 and config["encoder_reparameterization_type"] == "LSTM"


# -- training, switching, disabling ---------------------------------------------------------------

@pytest.mark.parametrize("family, method", [("bert", "prompt"), ("gpt2", "ptuning-mlp"), ("llama", "ptuning-lstm")])
def test_training_changes_only_adapter_tensors(family, method, input_ids):
    base = TINY_MODELS[family]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, ours_config(method, family))
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model_adapters.default.") or ".adapters.default." in n for n in trainable)
    labels = torch.tensor([0, 2]) if family == "bert" else input_ids
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter, trainable[name]), f"{name} did not train"
    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=input_ids).logits
    with torch.no_grad():
        fresh = TINY_MODELS[family]()(input_ids=input_ids).logits
    assert torch.equal(disabled, fresh)
    for key, value in base.state_dict().items():
        original = before.get(key, before.get(key.replace("base_layer.", "")))
        if original is not None:
            assert torch.equal(value, original), key


def test_sequence_classification_labels_stay_per_example(input_ids):
    model = get_peft_model(tiny_bert(), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    assert output.logits.shape == (2, 3)
    torch.testing.assert_close(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))


def test_causal_lm_loss_ignores_virtual_tokens(input_ids):
    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    randomise(model, scale=0.3)
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=input_ids)
    # Positions predict the next token: the last virtual token predicts the first real one (as in
    # peft), the virtual tokens themselves are never predicted.
    predicting = output.logits[:, 4 - 1 : -1]
    expected = torch.nn.functional.cross_entropy(predicting.reshape(-1, 120), input_ids.reshape(-1))
    torch.testing.assert_close(output.loss, expected)


def test_two_adapters_switch_and_only_one_can_be_active(input_ids):
    model = get_peft_model(tiny_gpt2(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    model.add_adapter("second", PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=8, task_type="CAUSAL_LM"))
    with torch.no_grad():
        first = model(input_ids=input_ids).logits
        model.set_adapter("second")
        second = model(input_ids=input_ids).logits
    assert first.shape[1] == 3 + 9 and second.shape[1] == 5 + 9
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model_adapters.second.") for n in trainable)
    with pytest.raises(PeftkitError, match="only one of them can be active"):
        model.set_adapter(["default", "second"])
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, first)


@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp"])
def test_merging_is_refused_with_the_reason(method, input_ids):
    model = get_peft_model(tiny_llama(), ours_config(method, "llama"))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    with pytest.raises(PeftkitError, match="virtual tokens are extra inputs"):
        model.merge_adapter()
    with pytest.raises(PeftkitError, match="cannot be merged"):
        model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, before)


# -- inputs: padding, embeddings, token types --------------------------------------------------------

@pytest.mark.parametrize("family", list(TASKS))
def test_right_padded_batch_matches_each_example_alone(family):
    model = get_peft_model(TINY_MODELS[family](), ours_config("prompt", family))
    randomise(model, scale=0.3)
    long, short = torch.arange(10, 19)[None], torch.arange(40, 45)[None]
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 4, dtype=torch.long)], dim=1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = [model(input_ids=long).logits[0], model(input_ids=short).logits[0]]
    if family == "bert":
        torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)
    else:  # positions of the virtual tokens and real tokens; the padding after them is irrelevant
        torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[1, : 5 + 5], alone[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_with_position_ids_matches_each_example_alone(family):
    model = get_peft_model(TINY_MODELS[family](), ours_config("ptuning-mlp", family))
    randomise(model, scale=0.3)
    long, short = torch.arange(10, 19)[None], torch.arange(40, 45)[None]
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        alone_short = model(input_ids=short).logits[0]
        alone_long = model(input_ids=long).logits[0]
    torch.testing.assert_close(together[0], alone_long, rtol=1e-5, atol=1e-5)
    virtual = 4
    torch.testing.assert_close(together[1, :virtual], alone_short[:virtual], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1, virtual + 4:], alone_short[virtual:], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_and_token_type_ids_are_handled(input_ids):
    model = get_peft_model(tiny_bert(), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    randomise(model, scale=0.3)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        embeds = model.get_input_embeddings()(input_ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected)
        zeros = torch.zeros_like(input_ids)
        torch.testing.assert_close(model(input_ids=input_ids, token_type_ids=zeros).logits, expected)
        assert not torch.allclose(model(input_ids=input_ids, token_type_ids=zeros + 1).logits, expected)


# -- generation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, method", [("gpt2", "prompt"), ("llama", "prompt"), ("llama", "ptuning-lstm")])
def test_generate_equals_greedy_decoding_without_cache(family, method, input_ids):
    model = get_peft_model(TINY_MODELS[family](), ours_config(method, family))
    randomise(model, scale=0.3)
    model.eval()
    generated = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 9 + 5)
    assert torch.equal(generated[:, :9], input_ids)
    assert torch.equal(generated, _greedy_without_cache(model, input_ids, 5))
    with torch.no_grad():  # the virtual tokens do change the prediction
        with model.disable_adapter():
            plain = model(input_ids=input_ids).logits[:, -1]
        assert not torch.allclose(model(input_ids=input_ids).logits[:, -1], plain)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_matches_peft(family, tmp_path, input_ids):
    ours = get_peft_model(TINY_MODELS[family](), ours_config("prompt", family))
    randomise(ours, scale=0.3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[family](), tmp_path).eval()
    expected = theirs.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_generate_matches_each_prompt_alone(family):
    model = get_peft_model(TINY_MODELS[family](), ours_config("prompt", family))
    randomise(model, scale=0.3)
    long, short = torch.arange(10, 17)[None], torch.arange(40, 44)[None]
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0], model.generate(input_ids=long, max_new_tokens=4, do_sample=False)[0])
    assert torch.equal(together[1, 3:], model.generate(input_ids=short, max_new_tokens=4, do_sample=False)[0])


# -- initialisation ---------------------------------------------------------------------------------

def _tokenizer_folder(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "classify", "the", "sentiment", "of", "this", "review"]
    tokenizer = Tokenizer(models.WordLevel({w: 7 * i + 3 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("virtual", [3, 11])
def test_text_init_uses_the_text_embeddings_like_peft(virtual, tmp_path):
    folder = _tokenizer_folder(tmp_path / "tokenizer")
    text = "classify the sentiment of this review"  # ids 10, 17, 24, 31, 38, 45
    kwargs = dict(num_virtual_tokens=virtual, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                  tokenizer_name_or_path=folder, task_type="CAUSAL_LM")
    base = tiny_llama()
    table = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(base, PromptTuningConfig(**kwargs))
    token_ids = torch.tensor(([10, 17, 24, 31, 38, 45] * 2)[:virtual])
    got = model.model_adapters["default"].prompt_embeddings
    torch.testing.assert_close(got, table[token_ids], rtol=0, atol=0)
    theirs = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**kwargs))
    torch.testing.assert_close(got, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    # a saved adapter loads without the tokenizer: its tokens come from the file
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(folder)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(loaded.model_adapters["default"].prompt_embeddings, got)


def test_sample_vocab_init_takes_rows_of_the_embedding_table():
    base = tiny_gpt2()
    table = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = model.model_adapters["default"].prompt_embeddings
    assert all(any(torch.equal(row, entry) for entry in table) for row in rows)


# -- errors -----------------------------------------------------------------------------------------

def test_vision_model_is_refused_at_wrap_time():
    with pytest.raises(PeftkitError, match="needs a model with input token embeddings.*ViTPatchEmbeddings"):
        get_peft_model(tiny_vit(), PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(PeftkitError, match="needs a model with input token embeddings"):
        get_peft_model(tiny_vit(), PromptEncoderConfig(num_virtual_tokens=4))


def test_encoder_decoder_model_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(PeftkitError, match="encoder-decoder"):
        get_peft_model(t5, PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"))


@pytest.mark.parametrize("make, message", [
    (lambda: PromptTuningConfig(), "num_virtual_tokens must be set"),
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
     "needs tokenizer_name_or_path"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"),
     "needs prompt_tuning_init_text"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="WORDS"), "prompt_tuning_init must be one of"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True}), "only with prompt_tuning_init='TEXT'"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, num_transformer_submodules=2), "encoder-decoder models are not supported"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_num_layers=3), "does not apply to the MLP encoder"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU"), "must be one of"),
    (lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_dropout=1.0), "encoder_dropout"),
])
def test_bad_configs_name_the_field(make, message):
    with pytest.raises(PeftkitError, match=message):
        make()


def test_bad_values_that_need_the_model_are_refused_at_wrap_time(tmp_path):
    with pytest.raises(PeftkitError, match="token_dim=48 but the input embeddings .* have size 32"):
        get_peft_model(tiny_bert(), PromptTuningConfig(num_virtual_tokens=4, token_dim=48))
    with pytest.raises(PeftkitError, match="cannot load a tokenizer"):
        get_peft_model(tiny_gpt2(), PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                                       tokenizer_name_or_path=str(tmp_path / "missing")))
    base = tiny_gpt2()
    before = set(base.state_dict())
    with pytest.raises(PeftkitError, match="cannot generate text"):
        get_peft_model(tiny_bert(), PromptTuningConfig(num_virtual_tokens=4)).generate(input_ids=torch.ones(1, 3, dtype=torch.long))
    assert set(base.state_dict()) == before
