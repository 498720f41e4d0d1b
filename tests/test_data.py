"""Reading user task data (jsonl, csv, saved datasets), its error messages, and batching."""

import json
import random
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftkit.errors import PeftkitError
from peftkit.train.data import (
    Example,
    PaddingCollator,
    TaskData,
    hold_out_validation,
    length_grouped_order,
    load_task_path,
    tokenize_examples,
    with_validation,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tiny_tokenizer(with_token_type_ids=False, padding_side="right"):
    """A word-level tokenizer whose pad id is 1 (not 0), so padding with the wrong id shows."""
    words = ["[UNK]", "[PAD]", "a", "good", "bad", "movie", "very", "plot"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_type_ids else [])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_input_names=input_names,
        padding_side=padding_side,
    )


# --- reading ----------------------------------------------------------------------------------


def test_folder_of_jsonl_files_with_string_labels(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        {"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "fine", "label": "pos"},
    ])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "great", "label": "pos"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "awful", "label": "neg"}])
    task = load_task_path(tmp_path)
    assert task.name == tmp_path.name
    assert task.label_names == ["neg", "pos"]  # sorted names
    assert task.train == [Example("good", 1), Example("bad", 0), Example("fine", 1)]
    assert task.validation == [Example("great", 1)]
    assert task.test == [Example("awful", 0)]


def test_single_csv_file_is_the_train_split(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('y,sentence\n1,"good, very good"\n0,bad\n\n2,"a\nmulti-line text"\n', encoding="utf-8")
    task = load_task_path(path, text_column="sentence", label_column="y")
    assert task.name == "reviews"
    assert task.label_names == ["0", "1", "2"]  # CSV numbers are class ids, not names
    assert task.train == [Example("good, very good", 1), Example("bad", 0), Example("a\nmulti-line text", 2)]
    assert task.validation is None and task.test is None


def test_meta_json_fixes_label_order_and_blank_lines_are_skipped(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"labels": ["positive", "negative"]}))
    (tmp_path / "train.jsonl").write_text(
        '{"text": "a", "label": "negative"}\n\n{"text": "b", "label": 0}\n', encoding="utf-8"
    )
    task = load_task_path(tmp_path)
    assert task.label_names == ["positive", "negative"]
    assert task.train == [Example("a", 1), Example("b", 0)]


def test_gzipped_jsonl_and_tsv(tmp_path):
    import gzip

    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as file:
        file.write('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (tmp_path / "test.tsv").write_text("text\tlabel\nc, d\t1\n", encoding="utf-8")
    task = load_task_path(tmp_path)
    assert len(task.train) == 2 and task.test == [Example("c, d", 1)]


def test_unlabeled_test_split_is_left_out_with_a_warning(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": -1}, {"text": "d", "label": -1}])
    with pytest.warns(UserWarning, match="unlabeled"):
        task = load_task_path(tmp_path)
    assert task.test is None


# --- errors name the file and the line --------------------------------------------------------


def error_of(path, **columns):
    with pytest.raises(PeftkitError) as caught:
        load_task_path(path, **columns)
    return str(caught.value)


def test_missing_column_names_line_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}, {"sentence": "c", "y": 1},
    ])
    message = error_of(path, text_column="sentence")
    assert f"{path} line 3: no column 'label'; columns are: ['sentence', 'y']; pass --label-column" in message
    message = error_of(path)
    assert f"{path} line 1: no column 'text'; columns are: ['sentence', 'label']; pass --text-column" in message


def test_missing_csv_column_names_the_header(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,y\na,0\n", encoding="utf-8")
    assert f"{path} line 1 (the header): no column 'text'" in error_of(path)


def test_csv_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\ngood,1\nfine,1\n" + "caf\xe9 au lait,0\n".encode("latin-1"))
    assert f"{path} line 4: not UTF-8 text" in error_of(path)


def test_held_out_validation_is_stratified_seeded_and_disjoint():
    examples = [Example(f"text {i}", 0 if i < 80 else 1 if i < 95 else 2) for i in range(97)]
    data = TaskData("t", ["a", "b", "c"], train=examples)
    split = hold_out_validation(data, 0.1)
    counts = {label: sum(e.label == label for e in split.validation) for label in range(3)}
    assert counts == {0: 8, 1: 2, 2: 1}  # round(10% of 80), round(10% of 15), at least one of 2
    assert sorted(e.text for e in split.train + split.validation) == sorted(e.text for e in examples)
    assert not {e.text for e in split.train} & {e.text for e in split.validation}
    assert [e.text for e in hold_out_validation(data, 0.1).validation] == [e.text for e in split.validation]
    assert [e.text for e in hold_out_validation(data, 0.1, seed=1).validation] != [e.text for e in split.validation]
    order = [examples.index(e) for e in split.train]
    assert order == sorted(order), "the file's order is kept"


def test_held_out_validation_refuses_what_cannot_work():
    data = TaskData("t", ["a", "b"], train=[Example("x", 0), Example("y", 1)])
    with pytest.raises(PeftkitError, match="too few to hold out"):
        hold_out_validation(data, 0.1)
    with pytest.raises(PeftkitError, match="between 0 and 1"):
        hold_out_validation(data, 1.5)
    own = TaskData("t", ["a", "b"], train=[Example("x", 0)] * 10, validation=[Example("v", 1)])
    assert with_validation(own, 0.1) == (own, None)  # a task's own validation split is kept
    assert with_validation(TaskData("t", ["a"], train=[Example("x", 0)] * 10), 0)[1] is None


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\na,0\nb,c,1\n", encoding="utf-8")
    assert f"{path} line 3: 3 fields, but the header has 2" in error_of(path)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n', encoding="utf-8")
    assert f"{path} line 2: not valid JSON" in error_of(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 0}\n["b", 1]\n', encoding="utf-8")
    assert f"{path} line 2: expected a JSON object" in error_of(path)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": 5, "label": 0}, "column 'text' holds 5, which is not a string"),
        ({"text": "b", "label": True}, "label true is neither a class id"),
        ({"text": "b", "label": None}, "label null is neither a class id"),
        ({"text": "b", "label": 0.5}, "label 0.5 is not a whole number"),
        ({"text": "b", "label": " "}, "the label is empty"),
        ({"text": "b", "label": -2}, "label -2 is negative"),
    ],
)
def test_bad_values_name_their_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 0}, {"text": "c", "label": 1}, row])
    assert f"{path} line 3: {expected}" in error_of(path)


def test_label_outside_the_meta_json_labels(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"labels": ["negative", "positive"]}))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    rows = [{"text": "x", "label": 1}] * 6 + [{"text": "y", "label": 5}]
    validation = write_jsonl(tmp_path / "validation.jsonl", rows)
    message = error_of(tmp_path)
    assert f"{validation} line 7: label 5 is outside 0..1 (labels: negative, positive)" in message


def test_eval_label_name_not_seen_in_training(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "neutral"}])
    message = error_of(tmp_path)
    assert f"{test} line 2: label 'neutral' does not occur in the train split (labels: neg, pos)" in message


def test_eval_class_id_where_training_used_names(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": 1}])
    assert f"{test} line 1: label 1 is a class id, but the train split uses label names" in error_of(tmp_path)


def test_mixed_label_kinds_in_training(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    assert f"{path} line 2: label 'pos' is a name, but {path} line 1 has the class id 0" in error_of(path)


def test_class_ids_with_a_gap(tmp_path):
    # 1-based labels are the usual way this happens.
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    assert "class ids must be 0..K-1 with every class present, but [0] never occur" in error_of(path)


def test_a_single_class_is_not_a_task(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    assert "only one label (pos)" in error_of(path)


@pytest.mark.parametrize(("name", "content"), [("data.jsonl", ""), ("data.jsonl", "\n \n"), ("data.csv", "text,label\n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert f"{path} is empty" in error_of(path)


def test_folder_without_a_train_file(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": 0}])
    assert "no train file; expected train.jsonl or train.csv" in error_of(tmp_path)


def test_folder_with_two_train_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    (tmp_path / "train.csv").write_text("text,label\na,0\n")
    assert "more than one train file" in error_of(tmp_path)


def test_corrupt_gzip_file(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"not gzip")
    assert f"{path}: cannot be read (Not a gzipped file" in error_of(path)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    assert "unsupported file type; use .jsonl" in error_of(path)


def test_saved_dataset_without_the_datasets_package(tmp_path, monkeypatch):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert "pip install datasets" in error_of(tmp_path)


def test_saved_dataset_with_class_label(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional datasets package is not installed")
    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
    })
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0]}, features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["fine"], "label": [1]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["?"], "label": [-1]}, features=features),
    })
    splits.save_to_disk(str(tmp_path / "saved"))
    with pytest.warns(UserWarning, match="unlabeled"):
        task = load_task_path(tmp_path / "saved", text_column="sentence")
    assert task.label_names == ["negative", "positive"]
    assert task.train == [Example("good", 1), Example("bad", 0)]
    assert task.validation == [Example("fine", 1)]
    assert task.test is None
    message = error_of(tmp_path / "saved")
    assert "split 'train': no column 'text'; columns are: ['sentence', 'label']" in message


# --- tokenizing and batching ------------------------------------------------------------------


def test_tokenize_examples_truncates_without_padding():
    examples = [Example("a good movie", 1), Example("bad", 0), Example("a very very bad plot", 0)]
    features = tokenize_examples(examples, tiny_tokenizer(), max_length=4)
    assert features == [
        {"input_ids": [2, 3, 5], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [4], "attention_mask": [1], "labels": 0},
        {"input_ids": [2, 6, 6, 4], "attention_mask": [1, 1, 1, 1], "labels": 0},
    ]
    assert tokenize_examples([], tiny_tokenizer()) == []


def test_collator_pads_to_the_longest_with_the_pad_id():
    tokenizer = tiny_tokenizer()
    features = tokenize_examples([Example("a good movie", 1), Example("bad", 0)], tokenizer)
    batch = PaddingCollator(tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[2, 3, 5], [4, 1, 1]]  # pad id is 1
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collator_keeps_token_type_ids_and_pads_on_the_left_when_asked():
    tokenizer = tiny_tokenizer(with_token_type_ids=True, padding_side="left")
    features = tokenize_examples([Example("a good movie", 1), Example("bad", 0)], tokenizer)
    batch = PaddingCollator(tokenizer)(features)
    assert batch["input_ids"].tolist() == [[2, 3, 5], [1, 1, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]


def test_collator_needs_a_pad_token():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(PeftkitError, match="no padding token"):
        PaddingCollator(tokenizer)


def test_length_grouped_order_is_a_deterministic_permutation():
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    order = length_grouped_order(lengths, batch_size=8, seed=3, epoch=0)
    assert sorted(order) == list(range(len(lengths)))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3, epoch=0)
    assert order != length_grouped_order(lengths, batch_size=8, seed=3, epoch=1)
    assert order != length_grouped_order(lengths, batch_size=8, seed=4, epoch=0)
    # No global random state is used.
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)


def test_length_grouped_order_groups_lengths_and_puts_the_short_batch_last():
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    batch_size = 8
    order = length_grouped_order(lengths, batch_size=batch_size, seed=0, epoch=0)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def padded_tokens(batches):
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    assert padded_tokens(batches) < 0.6 * padded_tokens(random_batches)
    assert padded_tokens(batches) < 1.05 * sum(lengths)  # under 5% padding
    # 1003 = 125 * 8 + 3: the 3 left over come last, so every run of 8 is one batch cut from a
    # chunk sorted longest first, and so is itself sorted.
    assert len(batches[-1]) == 3
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        assert batch_lengths == sorted(batch_lengths, reverse=True)


def test_length_grouped_order_edge_cases():
    assert length_grouped_order([], batch_size=4, seed=0, epoch=0) == []
    assert sorted(length_grouped_order([5, 1, 3], batch_size=4, seed=0, epoch=0)) == [0, 1, 2]
    with pytest.raises(ValueError):
        length_grouped_order([1], batch_size=0, seed=0, epoch=0)
