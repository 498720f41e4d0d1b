"""Instruction tuning of causal language models: train, generate, score by exact match, export.

The classification job (`peftkit.train.job`) and this one share the training loop, the method
configs and the run folder layout (`adapter/` + `peftkit_run.json`); what differs is the data
(chat conversations, loss on assistant tokens only: `peftkit.train.chat`), the model (any causal LM,
the built-in `smollm2` first) and how a run is judged: by generating answers and counting exact
matches, beside the untuned base model on the same examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from peftkit import io, zoo
from peftkit import quantize as quantization
from peftkit.config import PeftConfig
from peftkit.errors import PeftkitError
from peftkit.model import PeftModel
from peftkit.registry import causal_learning_rate, causal_method_config
from peftkit.train import chat
from peftkit.train.job import (
    check_quantize,
    folder_bytes,
    length_grouped_batch_order,
    model_reference,
    quantize_like_run,
    read_run_info,
    save_run,
    training_arguments,
    wrap_with_adapter,
)
from peftkit.train.loop import train
from peftkit.train.processes import is_main_process

__all__ = [
    "InstructJobResult",
    "causal_method_config",
    "evaluate_generation",
    "generate_answers",
    "load_causal_run",
    "train_causal_lm",
]

@dataclasses.dataclass
class InstructJobResult:
    """What an instruction-tuning job measured; `peftkit train` prints it and writes job.json."""

    model: str
    task: str
    method: str
    validation_loss: float | None  # mean loss on the assistant tokens of the validation split (best evaluation)
    validation_token_accuracy: float | None  # share of assistant tokens predicted exactly (teacher forcing)
    trainable_parameters: int
    total_parameters: int
    trainable_share: float
    adapter_bytes: int
    wall_time_s: float
    train_time_s: float
    peak_rss_mb: float
    examples_per_second: float
    steps: int
    truncated_examples: int
    dropped_examples: int
    output_dir: str
    adapter_dir: str
    serving_problems: list[str]
    quantize: str | None = None  # the frozen base's linear weights: None (float), "nf4" or "int8"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_causal_lm(
    model: str = "smollm2",
    task: str = "trec-instruct",
    method: str = "lora",
    output_dir: str | os.PathLike = "runs/smollm2-trec-instruct-lora",
    *,
    config: PeftConfig | None = None,
    method_options: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    max_length: int = 256,
    packing: bool = False,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = 200,
    seed: int = 0,
    log=None,
    quantize: str | None = None,
) -> InstructJobResult:
    """Supervised fine-tuning of `method` on a chat / instruction `task`; the best adapter goes to output_dir/adapter.

    `training` holds TrainingArguments fields (epochs, batch_size, learning_rate, gradient_checkpointing,
    ...); the best checkpoint is the one with the lowest validation loss. `max_eval_examples` bounds the
    validation conversations scored during training (loss and token accuracy; exact match is
    `evaluate_generation`). `log(text)` receives progress messages (default: stderr). `quantize` ("nf4"
    or "int8") stores the frozen base's linear weights quantized (peftkit.quantize).
    """
    started = time.perf_counter()
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    output_dir = Path(output_dir)
    peft_config = config or causal_method_config(method, **(method_options or {}))  # bad options fail before loading
    defaults = {"learning_rate": causal_learning_rate(method), "seed": seed, "batch_size": 8,
                "metric_for_best": "loss", "greater_is_better": False}
    arguments = training_arguments(output_dir, defaults, training)  # so do bad training options
    check_quantize(method, quantize)
    data = chat.load_chat_task(task)
    if not data.train:
        raise PeftkitError(f"task {task!r} has no training conversations")
    base, tokenizer = zoo.load_causal_lm(model, seed=seed)
    quantized = quantization.quantize_model(base, quantize, task_type="CAUSAL_LM").settings() if quantize else None
    wrapped = wrap_with_adapter(base, peft_config, seed)
    features, eval_features, stats = _chat_features(data, tokenizer, base, max_length, packing, max_train_examples,
                                                    max_eval_examples, log)
    order = None if packing else length_grouped_batch_order([len(f["input_ids"]) for f in features], arguments)
    result = train(wrapped, features, eval_features, arguments, chat.CausalLMCollator(tokenizer), batch_order=order)

    adapter_dir = output_dir / "adapter"
    task_id = str(task) if str(task) in chat.list_instruct_tasks() else str(Path(task).resolve())
    from peftkit.export import serving_problems

    problems = [] if wrapped.is_full_finetune else serving_problems(wrapped)
    if is_main_process():  # the other processes of a data-parallel run hold the same weights
        save_run(wrapped, tokenizer, adapter_dir, model=model_reference(model), task=task_id, method=method,
                 kind="causal", max_length=max_length, quantize=quantized)
        if problems:
            log(serving_note(problems, adapter_dir))
    report = wrapped.trainable_parameters_report()
    best = result.best_eval or result.final_eval or {}
    job = InstructJobResult(
        model=str(model), task=str(task), method=method,
        validation_loss=best.get("loss"), validation_token_accuracy=best.get("accuracy"),
        trainable_parameters=report.trainable, total_parameters=report.total, trainable_share=report.share,
        adapter_bytes=folder_bytes(adapter_dir), wall_time_s=time.perf_counter() - started,
        train_time_s=result.wall_time_s, peak_rss_mb=result.peak_rss_mb,
        examples_per_second=result.examples_per_second, steps=result.steps,
        truncated_examples=stats.truncated, dropped_examples=stats.dropped,
        output_dir=str(output_dir), adapter_dir=str(adapter_dir), serving_problems=problems,
        quantize=quantize,
    )
    if is_main_process():
        io.write_json(output_dir / "job.json", job.to_dict())
    return job


def _chat_features(data, tokenizer, base, max_length: int, packing: bool, max_train_examples, max_eval_examples, log):
    """Tokenized (train features, eval features or None, train tokenization stats); packed when `packing`.

    Conversations longer than the model's context window or `max_length` are cut or dropped (logged).
    Evaluation uses the validation split, else the test split, at most `max_eval_examples` of it.
    """
    context = getattr(base.config, "max_position_embeddings", None)
    train_conversations = data.train[:max_train_examples] if max_train_examples else data.train
    features, stats = chat.tokenize_conversations(train_conversations, tokenizer, max_length, context_window=context)
    if stats.truncated or stats.dropped:
        log(stats.summary())
    evaluation = data.validation or data.test
    eval_features = None
    if evaluation:
        eval_conversations = evaluation[:max_eval_examples] if max_eval_examples else evaluation
        eval_features, _ = chat.tokenize_conversations(eval_conversations, tokenizer, max_length, context_window=context)
    if packing:
        features = chat.pack_examples(features, max_length, tokenizer.eos_token_id)
    return features, eval_features, stats


def serving_note(problems: list[str], adapter_dir: Path | str) -> str:
    lines = [f"note: serving engines such as vLLM load LoRA adapters only, and {adapter_dir} has what they cannot load:"]
    lines += [f"  - {problem}" for problem in problems]
    lines.append(f"  convert it: peftkit export {adapter_dir} --to-lora --output {adapter_dir}-lora "
                 f"(or write a merged model: peftkit merge {adapter_dir} --output DIR)")
    return "\n".join(lines)


def load_causal_run(folder: str | os.PathLike, model: str | None = None):
    """A saved causal run: (PeftModel or merged full model, tokenizer, run info), ready for generation."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PeftkitError(f"{folder} is not a folder; give the adapter folder written by `peftkit train` (runs/NAME/adapter)")
    info = read_run_info(folder)
    if info.get("full_finetune"):
        causal, tokenizer = zoo.load_causal_lm(folder)
        return causal.eval(), tokenizer, info
    base_name = model or info.get("model")
    if base_name is None:
        config_path = folder / io.CONFIG_NAME
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        base_name = config.get("base_model_name_or_path")
    if base_name is None:
        raise PeftkitError(f"{folder} does not say which base model it adapts; pass --model NAME_OR_FOLDER")
    base, tokenizer = zoo.load_causal_lm(base_name)
    quantize_like_run(base, info, task_type="CAUSAL_LM")
    _check_same_base(folder, base)
    wrapped = PeftModel.from_pretrained(base, folder)
    return wrapped.eval(), tokenizer, info


def _check_same_base(folder: Path, base) -> None:
    """An adapter for another base model fails here with both names, not with a shape error later."""
    try:
        tensors = io.read_tensors(folder / io.WEIGHTS_NAME)
    except PeftkitError:
        return
    modules = dict(base.named_modules())
    for key, tensor in tensors.items():
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if not key.endswith(suffix):
                continue
            path = key[len(io.KEY_PREFIX):-len(suffix)]
            layer = modules.get(path)
            weight = getattr(layer, "weight", None)
            if layer is None or weight is None:
                continue
            expected = weight.shape[1] if suffix.startswith(".lora_A") else weight.shape[0]
            found = tensor.shape[1] if suffix.startswith(".lora_A") else tensor.shape[0]
            if found != expected:
                raise PeftkitError(
                    f"{folder} was trained on another base model: {key} has shape {tuple(tensor.shape)}, but "
                    f"{path} of {getattr(base.config, '_name_or_path', type(base).__name__)} is {tuple(weight.shape)}; "
                    "pass the right base with --model"
                )


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[chat.Conversation], *, max_new_tokens: int = 16,
                     batch_size: int = 16, progress=None) -> list[str]:
    """Greedy answers to each conversation's prompt (the turns before its last assistant turn).

    Prompts are left-padded in batches of `batch_size` so every sequence's new tokens line up.
    """
    prompts = chat.encode_prompts(conversations, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in indices)
        input_ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            ids = prompts[i]
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(indices):
            by_index[i] = tokenizer.decode(output[row, longest:], skip_special_tokens=True)
        if progress is not None:
            progress(len(indices))
    return [by_index[i] for i in range(len(prompts))]


def evaluate_generation(folder: str | os.PathLike, task: str | None = None, split: str = "test", *,
                        model: str | None = None, max_examples: int | None = None, batch_size: int = 16,
                        max_new_tokens: int = 8, compare_base: bool = True, progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy of a saved causal run on a task split, beside the untuned base on the same examples."""
    causal, tokenizer, info = load_causal_run(folder, model=model)
    task = task or info.get("task")
    if task is None:
        raise PeftkitError(f"{folder} does not say which task it was trained on; pass --task")
    data = chat.load_chat_task(task)
    conversations = getattr(data, split, None)
    if not conversations:
        available = [s for s in ("train", "validation", "test") if getattr(data, s, None)]
        raise PeftkitError(f"task {task!r} has no {split!r} split; it has: {', '.join(available)}")
    conversations = conversations[:max_examples] if max_examples else conversations
    references = [c.reference for c in conversations]
    results: dict[str, Any] = {"task": str(task), "split": split, "examples": len(conversations)}
    runs = [("tuned", None)]
    if compare_base and isinstance(causal, PeftModel):
        runs.append(("base", "disabled"))
    for label, mode in runs:
        bar = _progress_bar(len(conversations), f"generating ({label})") if progress else None
        context = causal.disable_adapter() if mode == "disabled" else contextlib.nullcontext()
        started = time.perf_counter()
        with context:
            answers = generate_answers(causal, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress=bar.update if bar else None)
        if bar:
            bar.close()
        score = chat.score_answers(answers, references, answers=data.answers)
        results[label] = {**score.to_dict(), "seconds": time.perf_counter() - started,
                          "samples": [{"reference": r, "answer": a} for r, a in list(zip(references, answers))[:5]]}
    return results


def _progress_bar(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="ex", leave=False, file=sys.stderr)




@torch.no_grad()
def stream_reply(model, tokenizer, messages: list[dict[str, str]], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, write=None) -> str:
    """Generate the assistant's reply to `messages`, passing each decoded piece to `write` as it comes.

    temperature 0 is greedy decoding; above 0, sampling (with `top_p`), repeatable given `seed`.
    Returns the whole reply (special tokens removed).
    """
    from transformers import TextStreamer

    if temperature < 0:
        raise PeftkitError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise PeftkitError(f"top_p must be in (0, 1], got {top_p}")
    ids = chat.encode_chat_prompt(messages, tokenizer)
    input_ids = torch.tensor([ids])

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if write is not None and text:
                write(text)

    streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
