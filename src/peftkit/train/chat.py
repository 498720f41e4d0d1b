"""Chat-format supervised fine-tuning data for causal language models.

Reading (in peftkit.train.conversations; the names are re-exported here). `load_chat_data` reads a `.jsonl` file (the train split) or a folder holding
`train.jsonl` (and optionally `validation.jsonl` / `dev.jsonl`, `test.jsonl`; `.jsonl.gz` too).
Each line is one example in either of two formats, detected per file from its first record:

- chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``;
  at least one assistant turn, and a user turn before the first assistant turn;
- instruction: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``, which becomes
  a user turn (the instruction, a blank line and the input where there is one) and an assistant
  turn (the output).

A file must keep to one format. Every problem is reported in a `PeftkitError` with the file, the line
and the way out. `load_instruct_task` gives built-in instruction versions of the packaged
classification tasks (trec-instruct, sst2-instruct, cr-instruct, mr-instruct), with the set of allowed
answers for scoring.

Tokenizing. `tokenize_conversations` renders each conversation with the tokenizer's own chat template
(`tokenizer.apply_chat_template`) and labels only what the model must learn to write: the content of
every assistant turn plus the end-of-turn token that closes it (so the model learns to stop). Every
system / user token and every piece of template scaffolding gets the label -100. Assistant spans are
found by rendering, for each assistant turn, the conversation before it with the generation prompt
(where the assistant's text starts) and the conversation up to and including it (where the turn
ends), so any template that renders conversations prefix-consistently works, without the
`{% generation %}` markers that few templates have. A fast (Rust) tokenizer is needed, for its
character offsets.

A tokenizer without a chat template gets this plain one (`FALLBACK_CHAT_TEMPLATE`), with a warning::

    ### System:
    {system content}

    ### User:
    {user content}

    ### Assistant:
    {assistant content}<eos>

(turns separated by a blank line; the generation prompt is "### Assistant:\\n"; `<eos>` is the
tokenizer's eos token, or its sep token where it has no eos). To use another template, set one on the
tokenizer before tokenizing: ``tokenizer.chat_template = "..."`` (a Jinja template string).

Length. Conversations longer than `max_length` tokens (or than the model's context window, where
given) are cut at the end; the returned `ChatTokenizeStats` counts them and the tokens cut, and
conversations whose assistant tokens were all cut off are dropped (and counted), since they would
teach nothing.

Packing. `pack_examples` concatenates tokenized conversations into blocks of at most `max_length`
tokens, with an eos token between conversations. With `reset_position_ids=True` (the default) each
conversation's positions restart at 0 and `CausalLMCollator` passes `position_ids` without an
attention mask and with ``use_cache=False``: recent transformers versions (v5) then build a
block-diagonal causal mask for Llama-style models, so attention does not cross conversations and each
gives the same logits as alone. With `reset_position_ids=False`, or a model or attention
implementation that does not detect packed sequences from `position_ids`, attention does cross
conversation boundaries inside a block (the usual approximation of packed pre-training). Prefix and
prompt tuning add virtual tokens to the sequence and should not be used with packing.

Batching. `CausalLMCollator` right-pads `input_ids` with the pad token (the eos token where the
tokenizer has no pad token), builds the `attention_mask` and pads `labels` with -100; it works as
`peftkit.train.loop.train(collate_fn=...)`.

Scoring. `score_answers` compares generated answers with references after `normalize_answer`
(first line, stripped, lowercased, trailing punctuation removed) by exact match.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from peftkit.errors import PeftkitError
from peftkit.train.conversations import (  # noqa: F401  (re-exported: the chat data names live there)
    ACCEPTED_CHAT_FORMS,
    CHAT_FILE_SUFFIXES,
    CHAT_ROLES,
    INSTRUCT_TASKS,
    ChatMessage,
    ChatTaskData,
    Conversation,
    InstructTask,
    instruction_conversation,
    list_instruct_tasks,
    load_chat_data,
    load_chat_task,
    load_instruct_task,
    looks_like_chat_data,
    read_chat_file,
)

__all__ = [
    "CHAT_ROLES",
    "FALLBACK_CHAT_TEMPLATE",
    "INSTRUCT_TASKS",
    "AnswerScore",
    "CausalLMCollator",
    "ChatMessage",
    "ChatTaskData",
    "ChatTokenizeStats",
    "Conversation",
    "InstructTask",
    "encode_prompts",
    "instruction_conversation",
    "list_instruct_tasks",
    "load_chat_data",
    "load_chat_task",
    "load_instruct_task",
    "normalize_answer",
    "pack_examples",
    "read_chat_file",
    "score_answers",
    "tokenize_conversations",
]

IGNORE_INDEX = -100  # the label Hugging Face causal LM losses skip

# The Jinja strings hold "\n" escapes, which Jinja (not Python) turns into newlines.
FALLBACK_CHAT_TEMPLATE = r"""{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{{ '### System:\n' + message['content'] + '\n\n' }}
{%- elif message['role'] == 'user' -%}{{ '### User:\n' + message['content'] + '\n\n' }}
{%- else -%}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"""


# ---------------------------------------------------------------------------------------------
# Rendering with the chat template


class _ChatRenderer:
    """Renders conversations with a tokenizer's chat template, or the fallback where it has none."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise PeftkitError(
                f"chat fine-tuning needs a fast tokenizer (for its character offsets), but "
                f"{type(tokenizer).__name__} is a slow one; load it with "
                f"AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        self.tokenizer = tokenizer
        self.template_kwargs: dict[str, str] = {}
        self.chat_template: str | None = None  # None: the tokenizer's own
        self.uses_fallback = not getattr(tokenizer, "chat_template", None)
        if self.uses_fallback:
            end_token = tokenizer.eos_token or getattr(tokenizer, "sep_token", None)
            if end_token is None:
                raise PeftkitError(
                    f"the tokenizer {type(tokenizer).__name__} has no chat template and neither an eos nor a "
                    f"sep token to end assistant turns with; set tokenizer.chat_template = '...' (a Jinja "
                    f"template) or tokenizer.eos_token = '...'"
                )
            self.chat_template = FALLBACK_CHAT_TEMPLATE
            self.template_kwargs = {"eos_token": end_token}
            warnings.warn(
                f"the tokenizer {type(tokenizer).__name__} has no chat template, so conversations are "
                f"written in peftkit's plain template (### System: / ### User: / ### Assistant:, each turn "
                f"followed by a blank line, assistant turns ending in {end_token}); to use another, set "
                f"tokenizer.chat_template = '...' (a Jinja template) before tokenizing",
                stacklevel=3,
            )
        # Texts of tokens that may close an assistant turn (<|im_end|>, <|eot_id|>, </s>, ...).
        special = set(getattr(tokenizer, "all_special_tokens", []) or [])
        special.update(
            token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values() if token.special
        )
        special.update(self.template_kwargs.values())
        self.special_token_texts = sorted((text for text in special if text), key=len, reverse=True)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool, source: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **self.template_kwargs,
            )
        except Exception as error:  # a template's raise_exception() gives jinja2 or ValueError errors
            raise PeftkitError(
                f"{source}: the chat template cannot render this conversation ({type(error).__name__}: {error}); "
                f"check the order of its turns, or set tokenizer.chat_template to a template that accepts it"
            ) from None
        if not isinstance(text, str):  # a template list of several named templates could give a list
            raise PeftkitError(f"{source}: the chat template gave {type(text).__name__}, not one text")
        return text

    def label_spans(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans to learn: each assistant turn's text
        from where the generation prompt ends through its first end-of-turn token."""
        messages = conversation.to_dicts()
        where = conversation.source or "a conversation"
        full = self.render(messages, False, where)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for index, message in enumerate(conversation.messages):
            if message.role != "assistant":
                continue
            prompt = self.render(messages[:index], True, where)
            through = self.render(messages[: index + 1], False, where)
            start, end = len(prompt), len(through)
            if not (full.startswith(prompt) and full.startswith(through) and cursor <= start < end):
                raise PeftkitError(
                    f"{where}: the chat template does not render this conversation's turns one after another "
                    f"(the text before assistant turn {index + 1} plus the generation prompt is not the start "
                    f"of the whole conversation), so the assistant's tokens cannot be found; set "
                    f"tokenizer.chat_template to a template that renders turns in order"
                )
            # Templates may trim the content; the end-of-turn token is looked for after the content.
            found = full.find(message.content.strip(), start, end)
            content_end = start if found < 0 else found + len(message.content.strip())
            label_end = end
            closers = [
                (position, len(text))
                for text in self.special_token_texts
                if (position := full.find(text, content_end, end)) >= 0
            ]
            if closers:
                position, length = min(closers, key=lambda closer: (closer[0], -closer[1]))
                label_end = position + length
            spans.append((start, label_end))
            cursor = end
        return full, spans

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Chat templates write their own bos/eos, so the tokenizer must add none (as apply_chat_template does).
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(offset) for offset in encoding["offset_mapping"]]


# ---------------------------------------------------------------------------------------------
# Tokenizing


@dataclass
class ChatTokenizeStats:
    """What `tokenize_conversations` did about length.

    conversations: how many came in; kept: how many came out; truncated: how many were cut to the
    length limit (kept or dropped); tokens_cut: tokens removed by those cuts; dropped: conversations
    left out because the cut removed every assistant token; over_context: conversations longer than
    the model's context window; longest: the longest conversation in tokens before cutting.
    """

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped: int = 0
    over_context: int = 0
    longest: int = 0
    max_length: int | None = None
    context_window: int | None = None
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: what was cut and dropped, and how to avoid it."""
        parts = [f"{self.kept} of {self.conversations} conversations kept"]
        if self.truncated:
            parts.append(f"{self.truncated} cut to {self.limit} tokens ({self.tokens_cut} tokens removed)")
        if self.over_context:
            parts.append(
                f"{self.over_context} longer than the model's context window of {self.context_window} tokens"
            )
        if self.dropped:
            shown = ", ".join(self.dropped_sources[:3]) + (", ..." if self.dropped > 3 else "")
            parts.append(f"{self.dropped} dropped because the cut removed all their assistant tokens ({shown})")
        text = "; ".join(parts)
        if self.truncated:
            text += f"; the longest conversation has {self.longest} tokens"
            if self.over_context:
                text += ", more than the model can attend to: shorten those conversations"
            else:
                text += f": raise max_length (now {self.max_length}) to keep more"
        return text

    @property
    def limit(self) -> int | None:
        """The length conversations were cut to: the smaller of max_length and the context window."""
        limits = [value for value in (self.max_length, self.context_window) if value is not None]
        return min(limits) if limits else None


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer,
    max_length: int | None = None,
    *,
    context_window: int | None = None,
) -> tuple[list[dict[str, list[int]]], ChatTokenizeStats]:
    """Tokenizes conversations with the tokenizer's chat template, labelling assistant tokens only.

    Returns one dict per kept conversation, with "input_ids" and "labels" (lists of ints of the same
    length, at most min(max_length, context_window)): labels[t] = input_ids[t] for the tokens of each
    assistant turn and its end-of-turn token, -100 elsewhere (the model shifts labels itself), and a
    `ChatTokenizeStats` saying what was cut or dropped. `context_window` is the model's number of
    positions (config.max_position_embeddings), where known. Warns when anything was cut.
    """
    for name, value in (("max_length", max_length), ("context_window", context_window)):
        if value is not None and (not isinstance(value, int) or value < 2):
            raise PeftkitError(f"{name} must be a whole number of tokens, at least 2; got {value!r}")
    renderer = _ChatRenderer(tokenizer)
    stats = ChatTokenizeStats(max_length=max_length, context_window=context_window)
    limit = stats.limit
    features = []
    for conversation in conversations:
        stats.conversations += 1
        text, spans = renderer.label_spans(conversation)
        input_ids, offsets = renderer.encode(text)
        labels = [IGNORE_INDEX] * len(input_ids)
        span_index = 0
        for position, (token_start, token_end) in enumerate(offsets):
            # A token belongs to a span if their characters overlap; spans are in order, as are tokens.
            while span_index < len(spans) and spans[span_index][1] <= token_start:
                span_index += 1
            if span_index == len(spans):
                break
            span_start, span_end = spans[span_index]
            if token_end > span_start and token_start < span_end:
                labels[position] = input_ids[position]
        if all(label == IGNORE_INDEX for label in labels):
            raise PeftkitError(
                f"{conversation.source or 'a conversation'}: no token of its assistant turns was found after "
                f"rendering it with the chat template; check the template"
            )
        stats.longest = max(stats.longest, len(input_ids))
        if context_window is not None and len(input_ids) > context_window:
            stats.over_context += 1
        if limit is not None and len(input_ids) > limit:
            stats.truncated += 1
            stats.tokens_cut += len(input_ids) - limit
            input_ids, labels = input_ids[:limit], labels[:limit]
            if all(label == IGNORE_INDEX for label in labels):
                stats.dropped += 1
                stats.dropped_sources.append(conversation.source or f"conversation {stats.conversations}")
                continue
        features.append({"input_ids": input_ids, "labels": labels})
        stats.kept += 1
    if stats.truncated:
        warnings.warn(f"chat data: {stats.summary()}", stacklevel=2)
    return features, stats


def encode_prompts(conversations: Sequence[Conversation], tokenizer) -> list[list[int]]:
    """Token ids to generate each conversation's answer from: the turns before its last assistant
    turn, rendered with the same template as `tokenize_conversations`, ending in the generation prompt."""
    renderer = _ChatRenderer(tokenizer)
    prompts = []
    for conversation in conversations:
        messages = [{"role": m.role, "content": m.content} for m in conversation.prompt_messages]
        text = renderer.render(messages, True, conversation.source or "a conversation")
        prompts.append(renderer.encode(text)[0])
    return prompts


def encode_chat_prompt(messages: Sequence[Mapping[str, str]], tokenizer) -> list[int]:
    """Token ids of `messages` (dicts with role and content, ending with a user turn) plus the
    generation prompt, rendered as `tokenize_conversations` renders them (chat: the next reply)."""
    for number, message in enumerate(messages, 1):
        if message.get("role") not in CHAT_ROLES:
            raise PeftkitError(f"message {number} has role {message.get('role')!r}; roles are: {', '.join(CHAT_ROLES)}")
    renderer = _ChatRenderer(tokenizer)
    return renderer.encode(renderer.render([dict(m) for m in messages], True, "the conversation"))[0]


# ---------------------------------------------------------------------------------------------
# Packing and batching


def pack_examples(
    features: Sequence[Mapping[str, Sequence[int]]],
    max_length: int,
    eos_token_id: int,
    *,
    reset_position_ids: bool = True,
) -> list[dict[str, list[int]]]:
    """Packs tokenized conversations, in order, into blocks of at most `max_length` tokens.

    A conversation is never split: a new block starts where the next one does not fit. Between two
    conversations in a block goes `eos_token_id` (labelled -100) unless the first already ends with it.
    Each block has "input_ids" and "labels" (and "position_ids", restarting at 0 for each conversation,
    where `reset_position_ids`), lists of ints of one length. See the module docstring for what
    attention sees across conversations.
    """
    if max_length < 1:
        raise PeftkitError(f"max_length must be at least 1, got {max_length}")
    blocks: list[dict[str, list[int]]] = []
    block: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for number, feature in enumerate(features, start=1):
        input_ids, labels = list(feature["input_ids"]), list(feature["labels"])
        if len(input_ids) > max_length:
            raise PeftkitError(
                f"conversation {number} has {len(input_ids)} tokens, more than the block length {max_length}; "
                f"tokenize with tokenize_conversations(..., max_length={max_length}) first"
            )
        separator = bool(block["input_ids"]) and block["input_ids"][-1] != eos_token_id
        if len(block["input_ids"]) + separator + len(input_ids) > max_length:
            blocks.append(block)
            block = {"input_ids": [], "labels": [], "position_ids": []}
            separator = False
        if separator:
            # The eos continues the conversation before it, so it shares that conversation's positions.
            block["input_ids"].append(eos_token_id)
            block["labels"].append(IGNORE_INDEX)
            previous = block["position_ids"][-1] + 1
            block["position_ids"].append(previous)
        block["input_ids"].extend(input_ids)
        block["labels"].extend(labels)
        block["position_ids"].extend(range(len(input_ids)))
    if block["input_ids"]:
        blocks.append(block)
    if not reset_position_ids:
        for packed in blocks:
            del packed["position_ids"]
    return blocks


class CausalLMCollator:
    """Pads a batch of tokenized conversations (or packed blocks) on the right and makes tensors.

    Holds only token ids, not the tokenizer, so it pickles cheaply into DataLoader workers.
    """

    def __init__(self, tokenizer=None, *, pad_token_id: int | None = None):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise PeftkitError(
                "the tokenizer has neither a padding token nor an eos token to pad with; set one first, "
                "e.g. tokenizer.pad_token = '<pad>', or pass pad_token_id="
            )
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor | bool]:
        """Returns "input_ids" (long, [batch, longest]) padded with the pad token and "labels" (same
        shape) padded with -100. Unpacked features also get "attention_mask" (long, 1 for tokens, 0 for
        padding). Packed features (with "position_ids") get "position_ids" (long, [batch, longest];
        padding counts up from 0 as a sequence of its own) instead of an attention mask, and
        use_cache=False: that is how transformers keeps attention within each packed conversation."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        packed = "position_ids" in features[0]
        if any(("position_ids" in feature) != packed for feature in features):
            raise PeftkitError("a batch mixes packed blocks (with position_ids) and unpacked conversations")
        longest = max(len(feature["input_ids"]) for feature in features)
        input_ids, labels, extra = [], [], []
        for feature in features:
            length = len(feature["input_ids"])
            if len(feature["labels"]) != length:
                raise PeftkitError(
                    f"a feature has {length} input_ids but {len(feature['labels'])} labels; "
                    f"make features with tokenize_conversations"
                )
            padding = longest - length
            input_ids.append(list(feature["input_ids"]) + [self.pad_token_id] * padding)
            labels.append(list(feature["labels"]) + [IGNORE_INDEX] * padding)
            if packed:
                extra.append(list(feature["position_ids"]) + list(range(padding)))
            else:
                extra.append([1] * length + [0] * padding)
        batch: dict[str, torch.Tensor | bool] = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.tensor(extra, dtype=torch.long)
            # transformers only derives the per-conversation mask from position_ids without a cache.
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.tensor(extra, dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------
# Scoring generated answers

_TRAILING = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """The first non-empty line of `text`, stripped, lowercased, without trailing punctuation."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first.strip().lower().rstrip(_TRAILING)


@dataclass(frozen=True)
class AnswerScore:
    """Exact-match scores: accuracy = correct / total; invalid counts answers outside the allowed set
    (0 when no set was given)."""

    accuracy: float
    correct: int
    total: int
    invalid: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "invalid": self.invalid}


def score_answers(
    predictions: Sequence[str], references: Sequence[str], answers: Sequence[str] | None = None
) -> AnswerScore:
    """Exact match of normalized generated answers against normalized references.

    `answers`, where given (ChatTaskData.answers), is the set of allowed answers; predictions outside
    it are counted as invalid (and wrong).
    """
    if len(predictions) != len(references):
        raise PeftkitError(f"{len(predictions)} predictions but {len(references)} references; give one per example")
    allowed = None if answers is None else {normalize_answer(answer) for answer in answers}
    correct = invalid = 0
    for prediction, reference in zip(predictions, references):
        predicted = normalize_answer(prediction)
        correct += predicted == normalize_answer(reference)
        invalid += allowed is not None and predicted not in allowed
    total = len(predictions)
    return AnswerScore(accuracy=correct / total if total else 0.0, correct=correct, total=total, invalid=invalid)
