"""Instruction tuning end to end on a tiny causal LM folder: train, eval, generate, chat, export, merge."""

import json

import pytest
import torch
from conftest import tiny_chat_model_folder, tiny_llama

from peftkit import LoHaConfig, LoraConfig, PeftkitError, get_peft_model, zoo
from peftkit.cli import main
from peftkit.export import lora_from_adapter, save_lora_conversion, serving_problems
from peftkit.train.instruct import causal_method_config, load_causal_run


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_chat_model_folder(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def trained_run(chat_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "lora"
    code = main(["train", "--model", str(chat_model), "--task", "trec-instruct", "--method", "lora",
                 "--max-steps", "3", "--max-train-examples", "24", "--max-eval-examples", "8", "--batch-size", "4",
                 "--lr", "1e-2", "--no-progress", "--output-dir", str(output)])
    assert code == 0
    return output


def test_model_kind_tells_causal_models_from_encoders(chat_model, tmp_path):
    assert zoo.model_kind(str(chat_model)) == "causal"
    assert zoo.model_kind("minilm") == "encoder"
    assert zoo.model_kind("smollm2") == "causal"
    assert zoo.model_kind(str(tmp_path / "nothing")) == "encoder"


def test_train_writes_a_causal_run_with_a_peft_lora_adapter(trained_run):
    job = json.loads((trained_run / "job.json").read_text())
    assert job["steps"] == 3 and job["validation_loss"] > 0 and job["serving_problems"] == []
    info = json.loads((trained_run / "adapter" / "peftkit_run.json").read_text())
    assert info["kind"] == "causal" and info["task"] == "trec-instruct"
    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 16
    # "all-linear" on a Llama: every attention and MLP projection, never the LM head
    assert sorted(config["target_modules"]) == sorted(
        f"model.layers.{i}.{name}" for i in range(2)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )


def test_eval_scores_exact_match_beside_the_untuned_base(trained_run, capsys):
    assert main(["eval", str(trained_run / "adapter"), "--max-examples", "6", "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["examples"] == 6
    for label in ("tuned", "base"):
        assert result[label]["total"] == 6 and 0 <= result[label]["accuracy"] <= 1


def test_generate_and_chat_stream_a_reply(trained_run, capsys, monkeypatch):
    assert main(["generate", str(trained_run / "adapter"), "--prompt", "Hello there", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    lines = iter(["Hello there", "/reset", "how are you?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(trained_run / "adapter"), "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 2 and "conversation cleared" in captured.err


def test_generate_reads_the_same_greedy_reply_twice(trained_run, capsys):
    main(["generate", str(trained_run / "adapter"), "--prompt", "Paris?", "--max-new-tokens", "5"])
    first = capsys.readouterr().out
    main(["generate", str(trained_run / "adapter"), "--prompt", "Paris?", "--max-new-tokens", "5", "--merge"])
    assert capsys.readouterr().out == first  # merged weights give the same greedy tokens


def test_export_writes_an_adapter_peft_loads_with_identical_logits(trained_run, chat_model, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    output = tmp_path / "export"
    assert main(["export", str(trained_run / "adapter"), "--output", str(output)]) == 0
    ours, _, _ = load_causal_run(trained_run / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_model), output).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


def test_merge_writes_a_causal_model_transformers_loads(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "merged"
    assert main(["merge", str(trained_run / "adapter"), "--output", str(output)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    ours, _, _ = load_causal_run(trained_run / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_adapter_for_another_base_is_refused_with_both_shapes(trained_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    config = LlamaConfig(vocab_size=403, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(other)
    from conftest import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(other)
    with pytest.raises(PeftkitError, match="trained on another base model.*shape"):
        load_causal_run(trained_run / "adapter", model=str(other))


def _random_lora(model, config):
    wrapped = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _name, parameter in wrapped.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return wrapped


def test_lora_adapter_converts_to_lora_exactly_and_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    wrapped = _random_lora(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    conversion = lora_from_adapter(wrapped)
    assert conversion.config.r == 4 and conversion.max_relative_error < 1e-5
    save_lora_conversion(conversion, tmp_path / "lora", base_model_name_or_path=None)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    ids = torch.tensor([[3, 9, 27, 81, 2]])
    with torch.no_grad():
        assert torch.allclose(wrapped(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


def test_loha_converts_exactly_at_the_rank_its_update_has_and_approximately_below():
    wrapped = _random_lora(tiny_llama(), LoHaConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]))
    exact = lora_from_adapter(wrapped)  # a Hadamard product of two rank-2 factors has rank <= 4
    assert exact.config.r <= 4 and exact.max_relative_error <= 1e-3
    squeezed = lora_from_adapter(wrapped, rank=1)
    assert squeezed.config.r == 1 and squeezed.max_relative_error > 1e-3  # reported, not hidden
    assert serving_problems(wrapped) == ["adapter 'default' is LOHA, not LoRA: serving engines load LoRA adapters only"]


def test_serving_problems_name_dora_and_modules_to_save():
    wrapped = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                                      modules_to_save=["lm_head"]))
    problems = " ".join(serving_problems(wrapped))
    assert "DoRA" in problems and "modules_to_save" in problems


def test_prompt_tuning_has_no_lora_form():
    wrapped = get_peft_model(tiny_llama(), causal_method_config("prompt", num_virtual_tokens=4))
    with pytest.raises(PeftkitError, match="virtual tokens or prefixes"):
        lora_from_adapter(wrapped)


def test_dora_run_warns_at_save_time_and_offers_the_conversion(chat_model, tmp_path, capsys):
    output = tmp_path / "dora"
    assert main(["train", "--model", str(chat_model), "--task", "trec-instruct", "--method", "dora", "--max-steps", "1",
                 "--max-train-examples", "8", "--max-eval-examples", "4", "--batch-size", "4", "--no-progress",
                 "--output-dir", str(output)]) == 0
    err = capsys.readouterr().err
    assert "DoRA" in err and "--to-lora" in err
    converted = tmp_path / "dora-lora"
    assert main(["export", str(output / "adapter"), "--to-lora", "--output", str(converted)]) == 0
    assert json.loads((converted / "adapter_config.json").read_text())["use_dora"] is False


def test_chat_file_task_and_gradient_checkpointing_through_the_cli(chat_model, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(12)]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    output = tmp_path / "run"
    assert main(["train", "--model", str(chat_model), "--task", str(data), "--method", "ia3", "--max-steps", "2",
                 "--batch-size", "4", "--gradient-checkpointing", "--packing", "--max-length", "64", "--no-progress",
                 "--output-dir", str(output)]) == 0
    assert json.loads((output / "adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"


def test_packing_is_refused_for_classification(capsys):
    assert main(["train", "--model", "minilm", "--task", "sst2", "--packing", "--max-steps", "1"]) == 2
    assert "--packing applies to chat" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_methods_train_and_generate_answers(method, chat_model, tmp_path, capsys):
    output = tmp_path / method
    assert main(["train", "--model", str(chat_model), "--task", "trec-instruct", "--method", method, "--max-steps", "1",
                 "--max-train-examples", "8", "--max-eval-examples", "4", "--batch-size", "4", "--no-progress",
                 "--output-dir", str(output)]) == 0
    job = json.loads((output / "job.json").read_text())
    assert job["validation_token_accuracy"] is not None  # logits of the virtual tokens are not compared with labels
    capsys.readouterr()
    assert main(["eval", str(output / "adapter"), "--max-examples", "3", "--max-new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tuned"]["total"] == 3 and result["base"]["total"] == 3
