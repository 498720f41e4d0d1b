"""Chat-format fine-tuning data: reading, assistant-only labels, truncation, packing, batching, scoring."""

import gzip
import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CHATML, byte_level_tokenizer, tiny_llama

from peftkit.errors import PeftkitError
from peftkit.train.chat import (
    FALLBACK_CHAT_TEMPLATE,
    CausalLMCollator,
    ChatMessage,
    Conversation,
    encode_prompts,
    list_instruct_tasks,
    load_chat_data,
    load_chat_task,
    load_instruct_task,
    normalize_answer,
    pack_examples,
    read_chat_file,
    score_answers,
    tokenize_conversations,
)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    """Byte-level, no chat template, eos <|endoftext|>: the fallback template with exact decoding."""
    tokenizer = byte_level_tokenizer(chat_template=None)
    tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from peftkit.zoo import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def conversation(*turns, source="test"):
    return Conversation(tuple(ChatMessage(role, content) for role, content in turns), source=source)


TWO_TURNS = conversation(
    ("system", "Be brief."),
    ("user", "Capital of France?"),
    ("assistant", "Paris."),
    ("user", "And how are you?"),
    ("assistant", "I am fine, thank you."),
)


def labelled_runs(feature, tokenizer):
    """The decoded text of each run of consecutive labelled tokens."""
    pairs = zip(feature["input_ids"], feature["labels"])
    runs = itertools.groupby(pairs, key=lambda pair: pair[1] != -100)
    return [tokenizer.decode([token for token, _ in run]) for labelled, run in runs if labelled]


def write_jsonl(path: Path, records) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Labels: assistant tokens only


def test_chat_template_labels_exactly_each_assistant_turn_and_its_end_token(chatml_tokenizer):
    (feature,), stats = tokenize_conversations([TWO_TURNS], chatml_tokenizer)
    assert len(feature["input_ids"]) == len(feature["labels"])
    assert chatml_tokenizer.decode(feature["input_ids"]) == chatml_tokenizer.apply_chat_template(
        TWO_TURNS.to_dicts(), tokenize=False
    )
    assert labelled_runs(feature, chatml_tokenizer) == ["Paris.<|im_end|>", "I am fine, thank you.<|im_end|>"]
    # Labelled positions carry their own token id (the model shifts labels itself).
    assert all(label in (-100, token) for token, label in zip(feature["input_ids"], feature["labels"]))
    assert (stats.conversations, stats.kept, stats.truncated, stats.dropped) == (1, 1, 0, 0)


def test_the_token_after_the_end_of_turn_token_is_not_labelled(chatml_tokenizer):
    (feature,), _ = tokenize_conversations([TWO_TURNS], chatml_tokenizer)
    end_id = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, (token, label) in enumerate(zip(feature["input_ids"], feature["labels"])) if label == end_id]
    assert len(ends) == 2
    for i in ends:  # the "\n" the template writes after <|im_end|> is scaffolding
        assert feature["labels"][i + 1] == -100


def test_fallback_template_is_used_with_one_warning_and_labels_assistant_text(plain_tokenizer):
    conversations = [TWO_TURNS, conversation(("user", "Hello?"), ("assistant", "Hello there."))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features, _ = tokenize_conversations(conversations, plain_tokenizer)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no chat template" in messages[0] and "tokenizer.chat_template =" in messages[0]
    text = plain_tokenizer.decode(features[0]["input_ids"])
    assert text == (
        "### System:\nBe brief.\n\n### User:\nCapital of France?\n\n### Assistant:\nParis.<|endoftext|>\n\n"
        "### User:\nAnd how are you?\n\n### Assistant:\nI am fine, thank you.<|endoftext|>\n\n"
    )
    assert labelled_runs(features[0], plain_tokenizer) == [
        "Paris.<|endoftext|>", "I am fine, thank you.<|endoftext|>"
    ]
    assert labelled_runs(features[1], plain_tokenizer) == ["Hello there.<|endoftext|>"]
    assert plain_tokenizer.chat_template is None  # the user's tokenizer is left as it was


def test_fallback_on_minilm_ends_turns_with_sep_as_it_has_no_eos(minilm_tokenizer):
    assert minilm_tokenizer.chat_template is None and minilm_tokenizer.eos_token is None
    with pytest.warns(UserWarning, match=r"no chat template.*\[SEP\]"):
        (feature,), _ = tokenize_conversations([TWO_TURNS], minilm_tokenizer)
    # MiniLM lowercases, so compare with the tokenizer's own view of the expected text.
    expected = [minilm_tokenizer.decode(minilm_tokenizer(text, add_special_tokens=False)["input_ids"])
                for text in ("Paris.[SEP]", "I am fine, thank you.[SEP]")]
    assert labelled_runs(feature, minilm_tokenizer) == expected


def test_the_fallback_template_can_be_set_on_a_tokenizer(plain_tokenizer):
    rendered = plain_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}],
        chat_template=FALLBACK_CHAT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "### User:\nHi\n\n### Assistant:\n"


def test_encode_prompts_ends_with_the_generation_prompt(chatml_tokenizer):
    (prompt,) = encode_prompts([TWO_TURNS], chatml_tokenizer)
    text = chatml_tokenizer.decode(prompt)
    assert text.endswith("And how are you?<|im_end|>\n<|im_start|>assistant\n")
    assert "I am fine" not in text
    (feature,), _ = tokenize_conversations([TWO_TURNS], chatml_tokenizer)
    assert feature["input_ids"][: len(prompt)] == prompt  # generation sees what training saw


def test_template_that_does_not_render_turns_in_order_is_an_error(chatml_tokenizer):
    tokenizer = byte_level_tokenizer("{{ messages | length }}" + CHATML)
    with pytest.raises(PeftkitError, match=r"test: the chat template does not render .* turns one after another"):
        tokenize_conversations([TWO_TURNS], tokenizer)


def test_template_exception_names_the_conversation():
    tokenizer = byte_level_tokenizer("{{ raise_exception('roles must alternate') }}")
    lines = conversation(("user", "a"), ("assistant", "b"), source="lines.jsonl line 4")
    with pytest.raises(PeftkitError, match=r"lines\.jsonl line 4: the chat template cannot render.*must alternate"):
        tokenize_conversations([lines], tokenizer)


def test_slow_tokenizer_is_refused_with_the_way_out():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(PeftkitError, match="use_fast=True"):
        tokenize_conversations([TWO_TURNS], SlowTokenizer())


# ---------------------------------------------------------------------------------------------
# Truncation


def test_truncation_counts_cut_examples_and_drops_those_without_assistant_tokens(chatml_tokenizer):
    (full,), _ = tokenize_conversations([TWO_TURNS], chatml_tokenizer)
    length = len(full["input_ids"])
    first_label = next(i for i, label in enumerate(full["labels"]) if label != -100)
    short = conversation(("user", "Hi"), ("assistant", "Hello"))
    (short_feature,), _ = tokenize_conversations([short], chatml_tokenizer)
    limit = first_label + 3  # keeps the start of the first answer, cuts the second
    assert len(short_feature["input_ids"]) <= limit
    with pytest.warns(UserWarning, match="cut to"):
        features, stats = tokenize_conversations([TWO_TURNS, short], chatml_tokenizer, max_length=limit)
    assert (stats.conversations, stats.kept, stats.truncated, stats.dropped) == (2, 2, 1, 0)
    assert stats.tokens_cut == length - limit and stats.longest == length
    assert features[0]["input_ids"] == full["input_ids"][:limit] and features[0]["labels"] == full["labels"][:limit]
    assert features[1] == short_feature

    with pytest.warns(UserWarning, match=r"1 dropped because the cut removed all their assistant tokens \(test\)"):
        features, stats = tokenize_conversations([TWO_TURNS, short], chatml_tokenizer, max_length=first_label)
    assert (stats.kept, stats.truncated, stats.dropped, stats.tokens_cut) == (1, 1, 1, length - first_label)
    assert features == [short_feature]
    assert stats.dropped_sources == ["test"]
    assert "raise max_length" in stats.summary()


def test_longer_than_the_context_window_is_cut_with_its_own_message(chatml_tokenizer):
    with pytest.warns(UserWarning, match="longer than the model's context window of 40 tokens"):
        features, stats = tokenize_conversations([TWO_TURNS], chatml_tokenizer, max_length=512, context_window=40)
    assert stats.over_context == 1 and stats.truncated == 1 and stats.limit == 40
    assert len(features[0]["input_ids"]) == 40
    assert "more than the model can attend to" in stats.summary()


def test_nothing_cut_means_no_warning(chatml_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = tokenize_conversations([TWO_TURNS], chatml_tokenizer, max_length=512, context_window=1024)
    assert (stats.truncated, stats.tokens_cut, stats.over_context) == (0, 0, 0)


@pytest.mark.parametrize("bad", [0, 1, -5, 2.5])
def test_bad_max_length_is_an_error(chatml_tokenizer, bad):
    with pytest.raises(PeftkitError, match="max_length must be a whole number"):
        tokenize_conversations([TWO_TURNS], chatml_tokenizer, max_length=bad)


# ---------------------------------------------------------------------------------------------
# Packing and batching


def feature(length, start):
    """A fake tokenized conversation: ids start..start+length-1, the second half labelled."""
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]}


def test_packing_fills_blocks_in_order_with_eos_between_and_positions_reset():
    features = [feature(5, 10), feature(4, 20), feature(6, 30), feature(3, 40)]
    blocks = pack_examples(features, max_length=11, eos_token_id=1)
    assert [block["input_ids"] for block in blocks] == [
        list(range(10, 15)) + [1] + list(range(20, 24)),
        list(range(30, 36)) + [1] + list(range(40, 43)),
    ]
    assert blocks[0]["labels"] == features[0]["labels"] + [-100] + features[1]["labels"]
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert all(len(block["input_ids"]) <= 11 for block in blocks)
    # Every labelled token survives packing exactly once.
    labelled = [label for block in blocks for label in block["labels"] if label != -100]
    assert labelled == [label for f in features for label in f["labels"] if label != -100]


def test_packing_adds_no_eos_after_a_conversation_ending_in_eos_and_can_keep_positions():
    features = [{"input_ids": [5, 6, 1], "labels": [-100, 6, 1]}, {"input_ids": [7, 8], "labels": [-100, 8]}]
    (block,) = pack_examples(features, max_length=8, eos_token_id=1, reset_position_ids=False)
    assert block == {"input_ids": [5, 6, 1, 7, 8], "labels": [-100, 6, 1, -100, 8]}


def test_packing_refuses_a_conversation_longer_than_a_block():
    with pytest.raises(PeftkitError, match=r"conversation 2 has 9 tokens.*max_length=8"):
        pack_examples([feature(3, 10), feature(9, 20)], max_length=8, eos_token_id=1)


def test_collator_pads_right_with_pad_token_and_minus_100(chatml_tokenizer):
    collate = CausalLMCollator(chatml_tokenizer)
    batch = collate([feature(3, 10), feature(5, 20)])
    pad = chatml_tokenizer.pad_token_id
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, pad, pad], [20, 21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [-100, -100, 22, 23, 24]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_pads_with_eos_when_the_tokenizer_has_no_pad_token():
    tokenizer = byte_level_tokenizer()
    tokenizer.pad_token = None
    collate = CausalLMCollator(tokenizer)
    assert collate.pad_token_id == tokenizer.eos_token_id
    with pytest.raises(PeftkitError, match="padding token"):
        CausalLMCollator(pad_token_id=None)


def test_collated_chat_batch_trains_a_causal_lm_on_assistant_tokens_only(chatml_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chatml_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    features, _ = tokenize_conversations(
        [TWO_TURNS, conversation(("user", "Hi"), ("assistant", "Hello there."))], chatml_tokenizer
    )
    batch = CausalLMCollator(chatml_tokenizer)(features)
    output = model(**batch)
    # The loss is the mean cross-entropy of next-token predictions at labelled positions only.
    logits, labels = output.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(output.loss, expected)


def test_packed_conversations_do_not_attend_to_each_other():
    model = tiny_llama()
    features = [feature(5, 10), feature(4, 20), feature(6, 30)]
    blocks = pack_examples(features, max_length=17, eos_token_id=1)
    assert len(blocks) == 1
    short_block = {"input_ids": [40, 41], "labels": [-100, 41], "position_ids": [0, 1]}
    batch = CausalLMCollator(pad_token_id=0)(blocks + [short_block])
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["position_ids"][1].tolist() == [0, 1] + list(range(15))  # padding is a sequence of its own
    with torch.no_grad():
        packed_logits = model(**batch).logits[0]
        start = 0
        for f in features:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            length = len(f["input_ids"])
            torch.testing.assert_close(packed_logits[start : start + length], alone, atol=1e-5, rtol=1e-4)
            start += length + 1  # + the eos between conversations


def test_collator_refuses_a_mix_of_packed_and_unpacked_features():
    with pytest.raises(PeftkitError, match="mixes packed"):
        CausalLMCollator(pad_token_id=0)([{**feature(2, 5), "position_ids": [0, 1]}, feature(2, 7)])


# ---------------------------------------------------------------------------------------------
# Reading chat and instruction files


def test_reads_chat_and_instruction_files_and_a_folder_of_splits(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    folder = tmp_path / "mytask"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [chat, "", chat])
    write_jsonl(folder / "validation.jsonl", [{"instruction": "Add.", "input": "2 + 2", "output": "4"},
                                             {"instruction": "Say hi.", "output": "hi"},
                                             {"instruction": "Say yo.", "input": "", "output": "yo"}])
    with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as file:
        file.write(json.dumps(chat) + "\n")
    data = load_chat_data(folder)
    assert data.name == "mytask" and len(data.train) == 2 and len(data.test) == 1 and data.answers is None
    assert data.train[0].messages == (ChatMessage("system", "Be kind."), ChatMessage("user", "Hi"),
                                      ChatMessage("assistant", "Hello!"))
    assert data.train[1].source == f"{folder / 'train.jsonl'} line 3"
    assert [c.to_dicts() for c in data.validation] == [
        [{"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say yo."}, {"role": "assistant", "content": "yo"}],
    ]
    assert data.validation[0].reference == "4"
    assert data.validation[0].prompt_messages == (ChatMessage("user", "Add.\n\n2 + 2"),)
    single = load_chat_task(folder / "train.jsonl")
    assert single.name == "train" and single.validation is None and len(single.train) == 2


CHAT_ERRORS = [
    ('{"messages": [', r"line 2: not valid JSON .*each line must be one object"),
    ({"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "a"}]},
     r'line 2: message 1 has the role "human"; accepted roles are: system, user, assistant'),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}]},
     r"line 2: the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
     r"line 2: message 1 \(user\) has empty content"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ["a"]}]},
     r'line 2: message 2 \(assistant\) has content \["a"\], which is not a string'),
    ({"messages": [{"role": "user"}]}, r'line 2: message 1 is .*must be an object with "role" and "content"'),
    ({"messages": []}, r'line 2: "messages" must be a non-empty list'),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     r"line 2: the conversation starts with an assistant turn"),
    ({"instruction": "Do it", "output": "done"},
     r"line 2: this is a instruction record, but line 1 is a chat record .* one format"),
    ({"text": "hello", "label": 1}, r"line 2: expected a chat record .* found the keys \['text', 'label'\]"),
    ("[1, 2]", r"line 2: expected a chat record .* found a list"),
]


@pytest.mark.parametrize("second_line, message", CHAT_ERRORS)
def test_chat_file_errors_name_the_file_and_line(tmp_path, second_line, message):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, second_line])
    with pytest.raises(PeftkitError, match=message) as caught:
        read_chat_file(path)
    assert str(path) in str(caught.value)


INSTRUCTION_ERRORS = [
    ({"instruction": "Do it"}, r"line 2: no 'output' field; an instruction record looks like"),
    ({"instruction": "", "output": "x"}, r"line 2: 'instruction' is empty"),
    ({"instruction": "Do it", "input": 5, "output": "x"}, r"line 2: 'input' is 5, which is not a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"line 2: this is a chat record, but line 1 is a instruction record"),
]


@pytest.mark.parametrize("second_line, message", INSTRUCTION_ERRORS)
def test_instruction_file_errors(tmp_path, second_line, message):
    path = write_jsonl(tmp_path / "instructions.jsonl", [{"instruction": "Say hi.", "output": "hi"}, second_line])
    with pytest.raises(PeftkitError, match=message):
        read_chat_file(path)


def test_empty_file_missing_train_and_unknown_paths_are_errors(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(PeftkitError, match="empty: it holds no examples"):
        load_chat_data(empty)
    folder = tmp_path / "no_train"
    folder.mkdir()
    (folder / "test.jsonl").write_text("")
    with pytest.raises(PeftkitError, match=r"no train.jsonl.*holds: \['test.jsonl'\]"):
        load_chat_data(folder)
    with pytest.raises(PeftkitError, match=r"neither a built-in instruction task \(cr-instruct, .*\) nor an existing"):
        load_chat_task(str(tmp_path / "nowhere"))
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("text,label\n")
    with pytest.raises(PeftkitError, match="must be a .jsonl file"):
        load_chat_data(csv_file)


# ---------------------------------------------------------------------------------------------
# Built-in instruction tasks and scoring


SPLIT_SIZES = {
    "trec-instruct": (4907, 545, 500),
    "sst2-instruct": (6920, 872, 1821),
    "cr-instruct": (3021, 377, 377),
    "mr-instruct": (8530, 1066, 1066),
}


def test_instruct_tasks_are_listed():
    assert list_instruct_tasks() == sorted(SPLIT_SIZES)


@pytest.mark.parametrize("name", sorted(SPLIT_SIZES))
def test_instruct_task_sizes_and_answers(name):
    from peftkit.zoo import load_task

    data = load_instruct_task(name)
    assert (len(data.train), len(data.validation), len(data.test)) == SPLIT_SIZES[name]
    source = load_task(name.removesuffix("-instruct"))
    first = data.train[0]
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert first.messages[0].content.endswith("\n\n" + source.train[0].text)
    assert {c.reference for c in data.train} == set(data.answers)
    for answer in data.answers:  # the instruction lists every allowed answer
        assert answer in first.messages[0].content
    if name == "trec-instruct":
        assert data.answers == ("description", "entity", "abbreviation", "human", "location", "number")
        label_names = source.label_names
        mapping = {"DESC": "description", "ENTY": "entity", "ABBR": "abbreviation", "HUM": "human",
                   "LOC": "location", "NUM": "number"}
        assert [c.reference for c in data.test] == [mapping[label_names[e.label]] for e in source.test]
    else:
        assert data.answers == ("negative", "positive")
        assert [c.reference for c in data.test] == [source.label_names[e.label] for e in source.test]


def test_unknown_instruct_task_lists_the_known_ones():
    with pytest.raises(PeftkitError, match=r"unknown instruction task 'trec-instrct'\. Did you mean 'trec-instruct'\?.*"
                                           r"cr-instruct.*mr-instruct.*sst2-instruct"):
        load_instruct_task("trec-instrct")
    assert load_chat_task("cr-instruct").answers == ("negative", "positive")


def test_normalize_answer():
    assert normalize_answer("  Positive.\nBecause the review says so.") == "positive"
    assert normalize_answer("\n\nLocation!!  ") == "location"
    assert normalize_answer("") == ""
    assert normalize_answer("number 5.") == "number 5"


def test_score_answers_exact_match_with_allowed_answers():
    score = score_answers(["Positive.", "negative\nextra", "neutral", "POSITIVE"],
                          ["positive", "positive", "negative", "positive"], answers=("negative", "positive"))
    assert (score.correct, score.total, score.invalid) == (2, 4, 1)
    assert score.accuracy == 0.5
    assert score.to_dict() == {"accuracy": 0.5, "correct": 2, "total": 4, "invalid": 1}
    assert score_answers([], []).accuracy == 0.0
    with pytest.raises(PeftkitError, match="2 predictions but 1 references"):
        score_answers(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer, where one is on this machine


def _smollm2_folder():
    candidates = sorted(Path("/root/.cache/peftkit/models").glob("smollm2*"))
    try:
        from peftkit.zoo import resolve_model

        candidates.insert(0, resolve_model("smollm2"))
    except Exception:  # no such built-in model (yet), or its package is not installed
        pass
    return next((folder for folder in candidates if (Path(folder) / "tokenizer.json").is_file()), None)


def test_smollm2_tokenizer_labels_assistant_turns():
    folder = _smollm2_folder()
    if folder is None:
        pytest.skip("no SmolLM2 tokenizer on this machine")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    (feature,), _ = tokenize_conversations([TWO_TURNS], tokenizer)
    end = tokenizer.eos_token
    assert labelled_runs(feature, tokenizer) == [f"Paris.{end}", f"I am fine, thank you.{end}"]
