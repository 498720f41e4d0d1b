"""What a batch does on the model: classify texts, or generate completions, each row with its own adapter.

Both run on the batcher's worker thread with a `peftkit.mixed.MixedLoraModel`: the batch's adapters
are put into slots by the `AdapterCache`, then one forward (classification) or one `generate` call
(completions) serves every row with its own adapter through `adapter_names`.

Streaming: a streaming completion is decoded in the same batched `generate` call as the others; after
every decoding step each streaming row's new text is handed to its client (`Request.emit`), so a
stream sees its tokens as the batch produces them. A row stops at its own `max_tokens`, at its end
token, or when its client disconnects; the batch ends when every row has stopped, so a long request
keeps a short one's slot in the batch busy only with padding, not delaying its stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.serve.batching import Request
from peftkit.serve.cache import AdapterCache

BASE_ADAPTER = "__base__"  # the mixed engine's name for "no adapter" (slot 0)


@dataclass
class ClassifyWork:
    texts: list[str]


@dataclass
class GenerateWork:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float


@dataclass
class Classification:
    label_ids: list[int]
    probabilities: list[list[float]]  # per text, over the adapter's own labels


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token) or "length" (max_tokens)
    prompt_tokens: int


def _load_failures(cache: AdapterCache, requests: Sequence[Request]) -> dict[str, Exception]:
    return cache.ensure_loaded(r.adapter for r in requests if r.adapter != BASE_ADAPTER)


class ClassificationRunner:
    """Runs batches of /v1/classify requests: every text of every adapter in the batch, each with its adapter.

    forward_rows: 0 runs the whole batch as one forward. A positive number sorts the batch's texts by
    length and runs them in forwards of that many rows, each still mixing adapters: on a CPU a forward
    costs about the same per padded token whatever the batch size, so padding 32 random sentences to
    the longest wastes more than the larger batch saves, while a large batch sorted by length pads
    little. (On a GPU, where a larger batch costs little more, use 0.)
    """

    def __init__(self, model, tokenizer, cache: AdapterCache, max_length: int = 128, forward_rows: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_length = max_length
        self.forward_rows = forward_rows
        self.forwards = 0

    def num_labels(self, adapter: str) -> int:
        return self.model.num_labels(adapter)

    @torch.inference_mode()
    def run_batch(self, requests: Sequence[Request]) -> list[Any]:
        failures = _load_failures(self.cache, requests)
        ready = [r for r in requests if r.adapter not in failures]
        results: dict[int, Any] = {id(r): failures[r.adapter] for r in requests if r.adapter in failures}
        if ready:
            texts = [text for r in ready for text in r.payload.texts]
            row_adapters = [r.adapter for r in ready for _ in r.payload.texts]
            logits = self._logits(texts, row_adapters)
            start = 0
            for request in ready:
                count = len(request.payload.texts)
                labels = self.num_labels(request.adapter)
                probabilities = logits[start:start + count, :labels].softmax(-1)
                results[id(request)] = Classification(probabilities.argmax(-1).tolist(), probabilities.tolist())
                start += count
        return [results[id(r)] for r in requests]

    def _logits(self, texts: list[str], row_adapters: list[str]) -> torch.Tensor:
        """(len(texts), max_labels) logits, rows in the order of `texts`."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__) if self.forward_rows else list(range(len(texts)))
        step = self.forward_rows or len(texts)
        rows_out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), step):
            rows = order[start:start + step]
            inputs = _right_padded({key: [encoded[key][i] for i in rows] for key in encoded}, self.tokenizer.pad_token_id or 0)
            logits = self.model(**inputs, adapter_names=[row_adapters[i] for i in rows]).logits.float()
            self.forwards += 1
            for position, row in enumerate(rows):
                rows_out[row] = logits[position]
        return torch.stack(rows_out)


def _right_padded(features: dict[str, list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Lists of token ids (and masks, type ids) -> (rows, longest) tensors, padded on the right."""
    width = max(len(ids) for ids in features["input_ids"])
    padded = {}
    for key, rows in features.items():
        fill = pad_id if key == "input_ids" else 0
        padded[key] = torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=torch.long)
    return padded


class GenerationRunner:
    """Runs batches of completion requests with the same sampling settings: one batched `generate`."""

    def __init__(self, model, tokenizer, cache: AdapterCache):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.forwards = 0
        self.last_finish_reasons: list[str] = []  # of the last batch's rows: "stop", "length" or "cancelled"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.end_ids = _end_token_ids(model, tokenizer)

    @torch.inference_mode()
    def run_batch(self, requests: Sequence[Request]) -> list[Any]:
        from transformers import StoppingCriteriaList

        failures = _load_failures(self.cache, requests)
        ready = [r for r in requests if r.adapter not in failures]
        results: dict[int, Any] = {id(r): failures[r.adapter] for r in requests if r.adapter in failures}
        if ready:
            # Left padding: every prompt ends where generation starts.
            width = max(len(r.payload.prompt_ids) for r in ready)
            input_ids = torch.full((len(ready), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(ready), width), dtype=torch.long)
            for row, request in enumerate(ready):
                ids = request.payload.prompt_ids
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
            rows = _RowDecoding(ready, self.tokenizer, self.end_ids, width)
            first = ready[0].payload  # the batch key makes the sampling settings equal across the batch
            sampling = (dict(do_sample=True, temperature=first.temperature, top_p=first.top_p)
                        if first.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None))
            self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, adapter_names=[r.adapter for r in ready],
                max_new_tokens=max(r.payload.max_tokens for r in ready), stopping_criteria=StoppingCriteriaList([rows]),
                pad_token_id=self.pad_id, eos_token_id=self.end_ids[0] if len(self.end_ids) == 1 else self.end_ids,
                **sampling,
            )
            self.forwards += 1
            for row, request in enumerate(ready):
                results[id(request)] = rows.completion(row)
            self.last_finish_reasons = list(rows.finish)
        return [results[id(r)] for r in requests]


def _end_token_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


try:
    from transformers import StoppingCriteria as _StoppingCriteria
except ImportError:  # pragma: no cover - transformers is a dependency
    _StoppingCriteria = object


class _RowDecoding(_StoppingCriteria):
    """Called by `generate` after each step: records each row's new token, streams its new text, and
    marks rows done at their end token, their own max_tokens, or when their client has gone."""

    def __init__(self, requests: Sequence[Request], tokenizer, end_ids: list[int], prompt_width: int):
        self.requests = list(requests)
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.prompt_width = prompt_width
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent: list[str] = ["" for _ in requests]  # text already streamed
        self.finish: list[str | None] = [None for _ in requests]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        for row, (request, token) in enumerate(zip(self.requests, new_tokens)):
            if self.finish[row] is not None:
                continue
            if request.cancelled.is_set():
                self.finish[row] = "cancelled"
                continue
            if token in self.end_ids:
                self.finish[row] = "stop"
            else:
                self.tokens[row].append(token)
                if len(self.tokens[row]) >= request.payload.max_tokens:
                    self.finish[row] = "length"
            if request.stream:
                self._stream(row, final=self.finish[row] is not None)
        return torch.tensor([f is not None for f in self.finish], dtype=torch.bool, device=input_ids.device)

    def _stream(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        # Hold back a trailing partial character (a multi-byte one split across tokens) until it completes.
        ready = text if final else text.rstrip("\ufffd")
        if len(ready) > len(self.sent[row]) and ready.startswith(self.sent[row]):
            self.requests[row].emit(ready[len(self.sent[row]):])
            self.sent[row] = ready

    def completion(self, row: int) -> Completion:
        request = self.requests[row]
        if self.finish[row] is None:  # generate stopped at max_new_tokens before this criterion saw it
            self.finish[row] = "length"
        if request.stream:
            self._stream(row, final=True)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        return Completion(token_ids=list(self.tokens[row]), text=text, finish_reason=self.finish[row],
                          prompt_tokens=len(request.payload.prompt_ids))
