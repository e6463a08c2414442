"""Checks that an uploaded training file is JSONL the trainer can use, line by line.

The file is read from disk one line at a time (a line is capped, so a 100 MB line or a
file with no newline costs at most the cap in memory), and the first bad line is
reported as "line N: reason", the way a user fixes it in an editor.

Accepted records (one format per file):
- `{"text": str}`                                   long documents, continued pre-training
- `{"messages": [{"role", "content", "weight"?}]}`  chat; loss on assistant turns
- `{"prompt": str, "completion": str}`              loss on the completion
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_DEPTH = 32
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
CHAT_EXTRA = frozenset({"tools", "parallel_tool_calls"})
MESSAGE_KEYS = frozenset({"role", "content", "weight", "name", "tool_calls", "tool_call_id"})


class InvalidFile(ValueError):
    """The file cannot be used for training; the message names the line."""


def _depth(value: Any, limit: int) -> int:
    """Nesting depth, stopping early once past `limit`."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _fmt_keys(keys: set[str]) -> str:
    return ", ".join(repr(k) for k in sorted(keys))


def record_format(rec: Any) -> str:
    """The record's format ("text" | "messages" | "prompt_completion"), or ValueError why not."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    keys = set(rec)
    if "messages" in keys:
        unknown = keys - {"messages"} - CHAT_EXTRA
        if unknown:
            raise ValueError(f"unknown field(s) {_fmt_keys(unknown)} in a chat record")
        _check_messages(rec["messages"])
        return "messages"
    if "text" in keys:
        if keys != {"text"}:
            raise ValueError(f"unknown field(s) {_fmt_keys(keys - {'text'})} in a text record")
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError('"text" must be a non-empty string')
        return "text"
    if "prompt" in keys or "completion" in keys:
        unknown = keys - {"prompt", "completion"}
        if unknown:
            raise ValueError(f"unknown field(s) {_fmt_keys(unknown)} in a prompt/completion record")
        if not isinstance(rec.get("prompt"), str):
            raise ValueError('"prompt" must be a string')
        if not isinstance(rec.get("completion"), str) or not rec["completion"]:
            raise ValueError('"completion" must be a non-empty string')
        return "prompt_completion"
    raise ValueError(
        'a record needs "text", "messages" or "prompt"+"completion"'
        + (f"; got field(s) {_fmt_keys(keys)}" if keys else "; got an empty object")
    )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    trained = False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(m) - MESSAGE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {_fmt_keys(unknown)}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}.content must be a string")
        if "weight" in m:
            if m["role"] != "assistant":
                raise ValueError(f"{where}.weight is only allowed on assistant messages")
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise ValueError(f"{where}.weight must be 0 or 1, got {m['weight']!r}")
        if m["role"] == "assistant" and m.get("weight", 1) == 1:
            trained = True
    if not trained:
        raise ValueError("a chat record needs at least one assistant message to learn from (weight 1)")


def validate_jsonl(path: Path, *, max_line_bytes: int) -> tuple[int, str]:
    """Check every line; returns (number of records, format). Raises InvalidFile("line N: ...")."""
    records = 0
    fmt: str | None = None
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise InvalidFile(f"line {lineno}: longer than the limit of {max_line_bytes} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidFile(f"line {lineno}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) carry nothing
            try:
                rec = json.loads(line)
            except RecursionError:
                raise InvalidFile(f"line {lineno}: JSON nested too deeply (limit {MAX_DEPTH})") from None
            except json.JSONDecodeError as e:
                raise InvalidFile(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if _depth(rec, MAX_DEPTH) > MAX_DEPTH:
                raise InvalidFile(f"line {lineno}: JSON nested too deeply (limit {MAX_DEPTH})")
            try:
                this = record_format(rec)
            except ValueError as e:
                raise InvalidFile(f"line {lineno}: {e}") from None
            if fmt is None:
                fmt = this
            elif this != fmt:
                raise InvalidFile(f"line {lineno}: a {this!r} record in a file of {fmt!r} records; use one format")
            records += 1
    if records == 0:
        raise InvalidFile("the file is empty: it needs at least one JSONL record")
    assert fmt is not None
    return records, fmt
