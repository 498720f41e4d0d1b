"""Conversations for chat-format fine-tuning: what they are, how they are read, and the built-in tasks.

`load_chat_data` reads a `.jsonl` file (the train split) or a folder holding `train.jsonl` (and
optionally `validation.jsonl` / `dev.jsonl`, `test.jsonl`; `.jsonl.gz` too). Each line is one example,
chat (``{"messages": [...]}``) or instruction (``{"instruction", "input", "output"}``), detected per
file from its first record; every problem is a `PeftkitError` with the file, the line and the way out.
`load_instruct_task` gives built-in instruction versions of the packaged classification tasks.
Tokenizing, packing and scoring are in peftkit.train.chat, which re-exports these names.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.train.data import SPLIT_FILE_STEMS, SPLITS, binary_lines, jsonl_records

CHAT_ROLES = ("system", "user", "assistant")

CHAT_FILE_SUFFIXES = (".jsonl", ".jsonl.gz")
ACCEPTED_CHAT_FORMS = (
    "a .jsonl file (the train split) or a folder with train.jsonl (and optionally validation.jsonl "
    "and test.jsonl), one example per line, either "
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} or '
    '{"instruction": "...", "input": "... (optional)", "output": "..."}'
)
_CHAT_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
_INSTRUCTION_EXAMPLE = '{"instruction": "...", "input": "...", "output": "..."}'


# ---------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation: who speaks ("system", "user" or "assistant") and what they say."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A conversation to learn from: its turns in order, at least one of them by the assistant.

    `source` says where it was read ("train.jsonl line 3"), for error messages; it takes no part in
    equality.
    """

    messages: tuple[ChatMessage, ...]
    source: str = field(default="", compare=False)

    def to_dicts(self) -> list[dict[str, str]]:
        """The turns as `apply_chat_template` takes them: [{"role": ..., "content": ...}, ...]."""
        return [{"role": message.role, "content": message.content} for message in self.messages]

    @property
    def _last_assistant_index(self) -> int:
        return max(i for i, message in enumerate(self.messages) if message.role == "assistant")

    @property
    def prompt_messages(self) -> tuple[ChatMessage, ...]:
        """The turns before the last assistant turn: what a model is given to generate an answer."""
        return self.messages[: self._last_assistant_index]

    @property
    def reference(self) -> str:
        """The content of the last assistant turn: the answer generated text is scored against."""
        return self.messages[self._last_assistant_index].content


@dataclass
class ChatTaskData:
    """A chat fine-tuning task: its splits (None where absent) and, for built-in instruction tasks,
    the answers a reply may be (None for free-form data)."""

    name: str
    train: list[Conversation] | None
    validation: list[Conversation] | None = None
    test: list[Conversation] | None = None
    answers: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------------------------
# Reading


def _show(value: object) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _text_field(record: Mapping, key: str, where: str, required: bool = True) -> str | None:
    """record[key] as a non-empty string; None where an optional field is absent, null or empty."""
    if key not in record and required:
        raise PeftkitError(f"{where}: no {key!r} field; an instruction record looks like {_INSTRUCTION_EXAMPLE}")
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise PeftkitError(f"{where}: {key!r} is {_show(value)}, which is not a string")
    if not value.strip():
        if not required:
            return None
        raise PeftkitError(f"{where}: {key!r} is empty; give it some text or leave the example out")
    return value


def _conversation_from_chat(record: Mapping, where: str) -> Conversation:
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list) or not raw_messages:
        raise PeftkitError(
            f"{where}: \"messages\" must be a non-empty list of turns like {_CHAT_EXAMPLE}, found {_show(raw_messages)}"
        )
    messages = []
    for number, raw in enumerate(raw_messages, start=1):
        turn = f"{where}: message {number}"
        if not isinstance(raw, dict) or "role" not in raw or "content" not in raw:
            raise PeftkitError(
                f"{turn} is {_show(raw)}; each message must be an object with \"role\" and \"content\", "
                f'like {{"role": "user", "content": "..."}}'
            )
        role, content = raw["role"], raw["content"]
        if role not in CHAT_ROLES:
            raise PeftkitError(
                f"{turn} has the role {_show(role)}; accepted roles are: {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise PeftkitError(
                f"{turn} ({role}) has content {_show(content)}, which is not a string; "
                f"give the text of the turn as one string"
            )
        if not content.strip():
            raise PeftkitError(f"{turn} ({role}) has empty content; give it some text or remove the turn")
        messages.append(ChatMessage(role, content))
    if not any(message.role == "assistant" for message in messages):
        raise PeftkitError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn from it; "
            f'add one ({{"role": "assistant", "content": "..."}}) or leave the line out'
        )
    first_spoken = next(message for message in messages if message.role != "system")
    if first_spoken.role == "assistant":
        raise PeftkitError(
            f"{where}: the conversation starts with an assistant turn; put a user turn before it"
        )
    return Conversation(tuple(messages), source=where)


def _conversation_from_instruction(record: Mapping, where: str) -> Conversation:
    instruction = _text_field(record, "instruction", where)
    extra_input = _text_field(record, "input", where, required=False)
    output = _text_field(record, "output", where)
    return instruction_conversation(instruction, extra_input, output, source=where)


def instruction_conversation(instruction: str, input_text: str | None, output: str, source: str = "") -> Conversation:
    """The two-turn conversation of an instruction record: user = instruction (+ blank line + input
    where given), assistant = output."""
    user = instruction if not input_text else f"{instruction}\n\n{input_text}"
    return Conversation((ChatMessage("user", user), ChatMessage("assistant", output)), source=source)


def _record_format(record: Mapping) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    return None


def read_chat_file(path: str | Path) -> list[Conversation]:
    """Reads one chat or instruction `.jsonl` (or `.jsonl.gz`) file; the format is taken from its first record."""
    path = Path(path)
    conversations: list[Conversation] = []
    file_format, format_line = None, 0
    try:
        one_record = f"one object, either {_CHAT_EXAMPLE} or {_INSTRUCTION_EXAMPLE}"
        for line_number, where, record in jsonl_records(path, one_record):
            record_format = _record_format(record) if isinstance(record, dict) else None
            if record_format is None:
                found = f"the keys {list(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
                raise PeftkitError(
                    f"{where}: expected a chat record {_CHAT_EXAMPLE} or an instruction record "
                    f"{_INSTRUCTION_EXAMPLE}, found {found}"
                )
            if file_format is None:
                file_format, format_line = record_format, line_number
            elif record_format != file_format:
                raise PeftkitError(
                    f"{where}: this is a {record_format} record, but line {format_line} is a {file_format} "
                    f"record and a file must keep to one format; convert one kind or split the file"
                )
            if record_format == "chat":
                conversations.append(_conversation_from_chat(record, where))
            else:
                conversations.append(_conversation_from_instruction(record, where))
    except (OSError, EOFError) as error:  # unreadable, or a truncated or corrupt .gz
        raise PeftkitError(f"{path}: cannot be read ({error})") from None
    if not conversations:
        raise PeftkitError(f"{path} is empty: it holds no examples")
    return conversations


def _find_chat_split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        candidates = [
            folder / f"{stem}{suffix}"
            for stem in stems
            for suffix in CHAT_FILE_SUFFIXES
            if (folder / f"{stem}{suffix}").is_file()
        ]
        if len(candidates) > 1:
            names = ", ".join(candidate.name for candidate in candidates)
            raise PeftkitError(f"{folder}: more than one {split} file ({names}); keep one")
        if candidates:
            found[split] = candidates[0]
    if "train" not in found:
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise PeftkitError(
            f"{folder}: no train.jsonl; expected train.jsonl (and optionally validation.jsonl and "
            f"test.jsonl); the folder holds: {present}"
        )
    return found


def load_chat_data(path: str | Path) -> ChatTaskData:
    """Reads chat or instruction data from a `.jsonl` file (the train split) or a folder of split files."""
    path = Path(path).expanduser()
    if path.is_file():
        if not path.name.lower().endswith(CHAT_FILE_SUFFIXES):
            raise PeftkitError(f"{path}: chat data must be a .jsonl file; give {ACCEPTED_CHAT_FORMS}")
        name = path.name
        for suffix in CHAT_FILE_SUFFIXES:
            name = name.removesuffix(suffix)
        return ChatTaskData(name=name, train=read_chat_file(path))
    if not path.is_dir():
        raise PeftkitError(f"{path} does not exist; give {ACCEPTED_CHAT_FORMS}")
    splits = {split: read_chat_file(file) for split, file in _find_chat_split_files(path).items()}
    return ChatTaskData(name=path.name, **splits)


# ---------------------------------------------------------------------------------------------
# Built-in instruction tasks, made from the packaged classification tasks


@dataclass(frozen=True)
class InstructTask:
    """An instruction version of a packaged classification task: the user turn is the instruction,
    a blank line and the example's text; the assistant turn is the answer word of its label."""

    name: str
    classification_task: str  # the peftkit.zoo task it is made from
    description: str
    instruction: str
    answer_of_label: Mapping[str, str]  # the task's label name -> the answer the model must write

    @property
    def answers(self) -> tuple[str, ...]:
        """The allowed answers, in the classification task's label order."""
        return tuple(self.answer_of_label.values())


_TREC_ANSWERS = {
    "DESC": "description",
    "ENTY": "entity",
    "ABBR": "abbreviation",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
_SENTIMENT_ANSWERS = {"negative": "negative", "positive": "positive"}

INSTRUCT_TASKS: dict[str, InstructTask] = {
    task.name: task
    for task in (
        InstructTask(
            name="trec-instruct",
            classification_task="trec",
            description="TREC question type as one word (6 answers)",
            instruction=(
                "What type of answer does this question ask for? Answer with exactly one lowercase word: "
                "abbreviation, description, entity, human, location or number."
            ),
            answer_of_label=_TREC_ANSWERS,
        ),
        InstructTask(
            name="sst2-instruct",
            classification_task="sst2",
            description="SST-2 movie review sentence sentiment: positive or negative",
            instruction=(
                "Is the sentiment of this movie review sentence positive or negative? "
                "Answer with exactly one lowercase word: positive or negative."
            ),
            answer_of_label=_SENTIMENT_ANSWERS,
        ),
        InstructTask(
            name="cr-instruct",
            classification_task="cr",
            description="customer review sentiment: positive or negative",
            instruction=(
                "Is the sentiment of this product review sentence positive or negative? "
                "Answer with exactly one lowercase word: positive or negative."
            ),
            answer_of_label=_SENTIMENT_ANSWERS,
        ),
        InstructTask(
            name="mr-instruct",
            classification_task="mr",
            description="movie review sentence sentiment: positive or negative",
            instruction=(
                "Is the sentiment of this movie review sentence positive or negative? "
                "Answer with exactly one lowercase word: positive or negative."
            ),
            answer_of_label=_SENTIMENT_ANSWERS,
        ),
    )
}


def list_instruct_tasks() -> list[str]:
    """The names of the built-in instruction tasks."""
    return sorted(INSTRUCT_TASKS)


def load_instruct_task(name: str) -> ChatTaskData:
    """Loads a built-in instruction task (see `list_instruct_tasks`), with its allowed answers."""
    if name not in INSTRUCT_TASKS:
        close = difflib.get_close_matches(str(name), list(INSTRUCT_TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(f"{task.name} ({task.description})" for _, task in sorted(INSTRUCT_TASKS.items()))
        raise PeftkitError(f"unknown instruction task {str(name)!r}.{hint} Built-in instruction tasks are: {known}")
    task = INSTRUCT_TASKS[name]
    from peftkit.zoo import load_task  # zoo imports train.data; importing it lazily keeps this module light

    source = load_task(task.classification_task)
    answer_of_id = [task.answer_of_label[label] for label in source.label_names]
    splits: dict[str, list[Conversation] | None] = {}
    for split in SPLITS:
        examples = getattr(source, split)
        splits[split] = None if examples is None else [
            instruction_conversation(
                task.instruction, example.text, answer_of_id[example.label], source=f"{name} {split} example {i}"
            )
            for i, example in enumerate(examples, start=1)
        ]
    return ChatTaskData(name=name, answers=task.answers, **splits)


def load_chat_task(name_or_path: str | Path) -> ChatTaskData:
    """A built-in instruction task by name, or chat / instruction data from a file or folder."""
    if isinstance(name_or_path, str) and name_or_path in INSTRUCT_TASKS:
        return load_instruct_task(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return load_chat_data(path)
    raise PeftkitError(
        f"unknown chat task {str(name_or_path)!r}: it is neither a built-in instruction task "
        f"({', '.join(list_instruct_tasks())}) nor an existing path. Or give {ACCEPTED_CHAT_FORMS}."
    )


def looks_like_chat_data(path: str | Path) -> bool:
    """Whether `path` is a chat / instruction jsonl file, or a folder whose train file is one (first record only)."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            files = _find_chat_split_files(path)
        except PeftkitError:
            return False
        path = files.get("train") or next(iter(files.values()), None)
        if path is None:
            return False
    if not path.is_file() or not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        return False
    try:
        for line in binary_lines(path):
            if line.strip():
                record = json.loads(line)
                return isinstance(record, dict) and _record_format(record) is not None
    except (OSError, ValueError):
        return False
    return False
