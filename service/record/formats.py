"""The training-file formats: one JSONL record per line, validated without torch.

Used twice with the same rules: by the API when a file is uploaded (so a bad file is
refused at once, naming its first bad line) and by the worker before it tokenises.

Three supervised record formats, told apart by their keys; one file may mix them:

* `{"text": str}`: long documents, continued pre-training (loss on every token).
* `{"prompt": str, "completion": str}`: loss on the completion only.
* `{"messages": [{"role", "content", "weight"?}, ...]}`: chat; loss on assistant
  messages, except those with `"weight": 0`.

And OpenAI's preference format, for jobs with `method.type = "dpo"`:

* `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", ...}],
  "non_preferred_output": [{"role": "assistant", ...}]}`: a prompt (a chat) and two
  answers, the first preferred.

A file holds either preference pairs or supervised records, never both (the first
record decides, a record of the other kind is an error naming its line), so a job's
method can be checked against its files when it is created.

Keys of two formats in one record are an error, and so is any other key (a typo such
as "complettion" would otherwise silently train on the wrong thing). Lines are read
with a length cap and JSON nesting is bounded, so a 100 MB line or a deeply nested
value costs bounded memory and gets a clear message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_LINE_BYTES = 64 * 2**20
"""Default cap on one JSONL line (a record); the API passes SECO_MAX_LINE_BYTES."""
MAX_DEPTH = 32
"""Deepest JSON nesting accepted: a chat record needs 4 levels."""

ROLES = ("system", "user", "assistant")
FORMAT_KEYS = {
    "text": ("text",),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("input", "preferred_output", "non_preferred_output"),
}
PREFERENCE = "preference"
"""The format of DPO training data, and the kind of a file that holds it."""
SUPERVISED = "supervised"
"""The kind of a file of text, chat or prompt/completion records."""
UNSUPPORTED_KEYS = ("tools", "functions", "parallel_tool_calls")  # chat extras we cannot render faithfully
MESSAGE_KEYS = {"role", "content", "weight", "name"}


class DataError(ValueError):
    """A record (or the whole file) that cannot be trained on, with where and why.

    `file` is a display name chosen by the caller (e.g. "training_file"), never a
    server path; `line` is 1-based, or None for a problem with the file as a whole.
    """

    def __init__(self, file: str, line: int | None, reason: str) -> None:
        super().__init__(file, line, reason)
        self.file = file
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file} line {self.line}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    weight: int = 1
    """0 excludes an assistant message from the loss (OpenAI's fine-tuning "weight")."""
    name: str | None = None

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight == 1

    def as_template_dict(self) -> dict[str, str]:
        data = {"role": self.role, "content": self.content}
        if self.name is not None:
            data["name"] = self.name
        return data


@dataclass(frozen=True)
class TextRecord:
    text: str
    format: str = "text"


@dataclass(frozen=True)
class ChatRecord:
    messages: tuple[Message, ...]
    format: str = "chat"


@dataclass(frozen=True)
class PromptCompletionRecord:
    prompt: str
    completion: str
    format: str = "prompt_completion"


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt (chat messages) and two assistant answers, `preferred` the better one."""

    input: tuple[Message, ...]
    preferred: Message
    non_preferred: Message
    format: str = PREFERENCE


Record = TextRecord | ChatRecord | PromptCompletionRecord | PreferenceRecord


def record_kind(fmt: str) -> str:
    """ "preference" for preference pairs, "supervised" for the other formats."""
    return PREFERENCE if fmt == PREFERENCE else SUPERVISED


def _string(value: object, what: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _content(value: object, what: str) -> str:
    """A string, or OpenAI-style text parts `[{"type": "text", "text": ...}]` joined."""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{what} parts must be {{'type': 'text', 'text': str}} (only text is supported)")
            texts.append(part["text"])
        return "".join(texts)
    return _string(value, what)


def _message(index: int, raw: object, field: str = "messages") -> Message:
    where = f"{field}[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    if "tool_calls" in raw or "function_call" in raw:
        raise ValueError(f"{where}: tool and function calls are not supported")
    unexpected = sorted(set(raw) - MESSAGE_KEYS)
    if unexpected:
        raise ValueError(f"{where} has unexpected keys {unexpected}")
    role = raw.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(map(repr, ROLES))}, got {role!r}")
    if "content" not in raw:
        raise ValueError(f"{where} has no 'content'")
    content = _content(raw["content"], f"{where}.content")
    weight = raw.get("weight", 1)
    if "weight" in raw:
        if role != "assistant":
            raise ValueError(f"{where}: 'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise ValueError(f"{where}.weight must be 0 or 1, got {weight!r}")
    name = raw.get("name")
    if name is not None:
        _string(name, f"{where}.name")
    return Message(role=role, content=content, weight=int(weight), name=name)


def _chat(raw: dict[str, Any]) -> ChatRecord:
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    if not any(m.trained for m in parsed):
        raise ValueError("'messages' has no assistant message to train on (with weight 1)")
    return ChatRecord(parsed)


def _answer(raw: dict[str, Any], key: str) -> Message:
    """A preference answer: a list holding one assistant message."""
    value = raw[key]
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"'{key}' must be a list with one assistant message")
    message = _message(0, value[0], key)
    if message.role != "assistant":
        raise ValueError(f"{key}[0].role must be 'assistant', got {message.role!r}")
    if "weight" in value[0]:
        raise ValueError(f"{key}[0]: 'weight' has no meaning in a preference record")
    return message


def _preference(raw: dict[str, Any]) -> PreferenceRecord:
    missing = [k for k in FORMAT_KEYS[PREFERENCE] if k not in raw]
    if missing:
        raise ValueError(f"a preference record needs {missing} too")
    inp = raw["input"]
    if not isinstance(inp, dict) or "messages" not in inp:
        raise ValueError("'input' must be an object with 'messages'")
    unsupported = sorted(k for k in UNSUPPORTED_KEYS if k in inp)
    if unsupported:
        raise ValueError(f"input {unsupported} are not supported (no tool or function calling)")
    unknown = sorted(set(inp) - {"messages"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in 'input'")
    messages = inp["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'input.messages' must be a non-empty list")
    parsed = tuple(_message(i, m, "input.messages") for i, m in enumerate(messages))
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "weight" in m:
            raise ValueError(f"input.messages[{i}]: 'weight' has no meaning in a preference record")
    preferred, non_preferred = _answer(raw, "preferred_output"), _answer(raw, "non_preferred_output")
    if preferred.content == non_preferred.content:
        raise ValueError("'preferred_output' and 'non_preferred_output' are the same answer")
    return PreferenceRecord(parsed, preferred, non_preferred)


def parse_record(raw: object) -> Record:
    """Validate one decoded JSON value; raises ValueError with the reason."""
    if not isinstance(raw, dict):
        raise ValueError(f"each line must be a JSON object, got {type(raw).__name__}")
    formats = [name for name, keys in FORMAT_KEYS.items() if any(k in raw for k in keys)]
    if not formats:
        raise ValueError(
            "a record needs 'text', 'messages', or 'prompt' and 'completion' (supervised), "
            "or 'input', 'preferred_output' and 'non_preferred_output' (preference)"
        )
    if len(formats) > 1:
        found = sorted(k for keys in FORMAT_KEYS.values() for k in keys if k in raw)
        raise ValueError(f"a record must use one format, found keys {found}")
    unsupported = sorted(k for k in UNSUPPORTED_KEYS if k in raw)
    if unsupported:
        raise ValueError(f"{unsupported} are not supported (no tool or function calling)")
    unknown = sorted(set(raw) - set(FORMAT_KEYS[formats[0]]))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in a {formats[0]!r} record")
    if formats[0] == "text":
        return TextRecord(_string(raw["text"], "'text'", allow_empty=False))
    if formats[0] == "chat":
        return _chat(raw)
    if formats[0] == PREFERENCE:
        return _preference(raw)
    for key in ("prompt", "completion"):
        if key not in raw:
            raise ValueError(f"a prompt/completion record needs '{key}'")
    return PromptCompletionRecord(
        prompt=_string(raw["prompt"], "'prompt'"),
        completion=_string(raw["completion"], "'completion'", allow_empty=False),
    )


def _decode(line: bytes, number: int) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})") from None
    return text.removeprefix("\ufeff") if number == 1 else text  # tolerate a UTF-8 byte-order mark


def read_records(
    path: str | Path, display_name: str | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, Record]]:
    """Yield (line number, record) for each non-blank line, streaming the file.

    Raises DataError at the first bad line, or when the file holds no record at all.
    """
    name = display_name or Path(path).name
    try:
        with open(path, "rb") as handle:  # bytes: decoding errors are reported per line
            yield from _records(_texts(handle, name, max_line_bytes), name)
    except OSError as exc:
        raise DataError(name, None, f"cannot be read ({exc.strerror})") from None


def _texts(handle: Any, name: str, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded text) of each line, read with a cap: a longer line is cut, never
    read whole. A line's bytes are let go before its text is handed on, so a long line is
    held once as text while it is parsed, not also as bytes (a 60 MiB line cost 4x its size
    in memory, with a copy of each kind alive at once)."""
    number = 0
    while line := handle.readline(max_line_bytes + 1):
        number += 1
        try:
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                raise ValueError(f"longer than the limit of {max_line_bytes} bytes")
            text = _decode(line, number)
        except ValueError as exc:
            raise DataError(name, number, str(exc)) from None
        del line
        yield number, text
        del text


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping early once past `limit`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack and deepest <= limit:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


_SURROGATE = re.compile("[\ud800-\udfff]")
"""A UTF-16 surrogate left in a decoded string: JSON's `\\ud800` escape without its pair
(json.loads joins a valid pair into one character), which no encoder can write out."""


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string (key or value) of a decoded JSON value, as U+XXXX."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                return f"U+{ord(found.group()):04X}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _json(text: str) -> object:
    try:
        raw = json.loads(text)  # the line's end is JSON whitespace: no stripped copy of a long line
    except RecursionError:
        raw = None
    except json.JSONDecodeError as exc:  # past the line's end (it stopped short): the column after its text
        column = exc.colno if exc.lineno == 1 else len(text.rstrip("\r\n")) + 1
        raise ValueError(f"invalid JSON: {exc.msg} (column {column})") from None
    if raw is None or _depth(raw, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"JSON nested too deeply (limit {MAX_DEPTH} levels)")
    surrogate = _lone_surrogate(raw)
    if surrogate is not None:  # the tokenizer would fail on it mid-job with an internal error
        raise ValueError(
            f"a string holds a lone UTF-16 surrogate ({surrogate}, an unpaired \\u escape), which is "
            "not a character; write the character itself or its full surrogate pair"
        )
    return raw


def _records(texts: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[int, Record]]:
    count = 0
    first: tuple[int, str] | None = None  # (line, kind) of the first record
    for number, text in texts:
        try:
            if not text or text.isspace():  # (no stripped copy of a long line)
                continue
            record = parse_record(_json(text))
            del text  # the record holds its own strings: a long line's text goes before the next is read
            kind = record_kind(record.format)
            first = first or (number, kind)
            if kind != first[1]:
                raise ValueError(
                    f"a {kind} record in a file of {first[1]} records (line {first[0]} is one); a file holds "
                    "either preference pairs (for method 'dpo') or supervised records, not both"
                )
        except ValueError as exc:
            raise DataError(name, number, str(exc)) from None
        count += 1
        yield number, record
        del record
    if count == 0:
        raise DataError(name, None, "contains no records (the file is empty)")


def validate_file(
    path: str | Path, display_name: str | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> dict[str, int]:
    """Check every record without tokenising; returns the number of records per format."""
    counts: dict[str, int] = {}
    for _, record in read_records(path, display_name, max_line_bytes):
        counts[record.format] = counts.get(record.format, 0) + 1
        del record  # not alive while the next (maybe long) line is read
    return counts
