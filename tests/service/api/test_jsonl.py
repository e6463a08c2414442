"""The upload validator: every accepted format, and a clear "line N: ..." for each bad case."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service.api.jsonl import InvalidFile, validate_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 1}]}


@pytest.mark.parametrize(
    ("records", "fmt"),
    [
        ([{"text": "a long document"}] * 3, "text"),
        ([CHAT, CHAT], "chat"),
        ([CHAT, {"text": "doc"}], "chat+text"),
        ([{"prompt": "2+2=", "completion": "4"}], "prompt_completion"),
    ],
)
def test_accepts_each_format(jsonl: Callable[..., Path], records: list[dict], fmt: str) -> None:
    assert validate_jsonl(jsonl(records), max_line_bytes=1 << 20) == (len(records), fmt)


def _bad(tmp_path: Path, raw: bytes, max_line: int = 1 << 20) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(raw)
    with pytest.raises(InvalidFile) as e:
        validate_jsonl(p, max_line_bytes=max_line)
    return str(e.value)


GOOD = b'{"text": "ok"}\n'


@pytest.mark.parametrize(
    ("line3", "expected"),
    [
        (b"not json", "line 3: invalid JSON: Expecting value (column 1)"),
        (b"[1, 2]", "line 3: each line must be a JSON object, got list"),
        (b'{"text": ""}', "line 3: 'text' must be a non-empty string"),
        (b'{"foo": 1}', "line 3: a record needs 'text', 'messages', or 'prompt' and 'completion'"),
        (b'{"prompt": "p"}', "line 3: a prompt/completion record needs 'completion'"),
        (b'{"messages": []}', "line 3: 'messages' must be a non-empty list"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "line 3: messages[0].role must be one of"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "line 3: 'messages' has no assistant message"),
        (b'{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}', "messages[0].weight must be 0 or 1"),
        (b'{"text": "\xff\xfe"}', "line 3: not valid UTF-8"),
        (b'{"text": "x", "a": ' + b"[" * 100 + b"]" * 100 + b"}", "line 3: JSON nested too deeply"),
        (b"[" * 5000 + b"]" * 5000, "line 3: JSON nested too deeply"),
    ],
)
def test_names_the_first_bad_line(tmp_path: Path, line3: bytes, expected: str) -> None:
    assert expected in _bad(tmp_path, GOOD + b"\n" + line3 + b"\n" + b"also bad\n")


def test_empty_and_blank_files(tmp_path: Path) -> None:
    assert _bad(tmp_path, b"") == "contains no records (the file is empty)"
    assert _bad(tmp_path, b"\n  \n\n") == "contains no records (the file is empty)"


def test_line_too_long_is_bounded(tmp_path: Path) -> None:
    assert "line 2: longer than the limit of 100 bytes" in _bad(tmp_path, GOOD + b'{"text": "' + b"x" * 500, 100)
