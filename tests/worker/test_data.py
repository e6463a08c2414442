"""Training-file validation and loss masks, checked token by token with the demo tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from seco_core.windows import IGNORE_INDEX, split_documents
from service.record.formats import DataError, validate_file
from tests.worker.byte_tokens import EOS, TOK, ids
from worker.data import load_documents


def write(tmp_path: Path, *records: object, raw: bytes | None = None) -> Path:
    path = tmp_path / "train.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def expected_labels(pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) from (piece, trained) pairs; the first label is always -100."""
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, trained in pieces:
        piece_ids = ids(piece) if piece != "<eos>" else [EOS]
        input_ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    labels[0] = IGNORE_INDEX
    return input_ids, labels


def test_byte_tokenizer_assumptions() -> None:
    assert len(ids("hello")) == 5 and len(ids("<|assistant|>")) == 1
    assert TOK.bos_token_id is None and TOK.convert_tokens_to_ids("<|endoftext|>") == EOS


def test_text_trains_on_every_token_and_ends_with_eos(tmp_path: Path) -> None:
    data = load_documents(write(tmp_path, {"text": "abc"}), TOK, "training_file")
    (doc,) = data.documents
    assert doc.input_ids == [*ids("abc"), EOS]
    assert doc.labels == [IGNORE_INDEX, *ids("bc"), EOS]  # the first token is never a target
    assert data.stats.as_dict()["formats"] == {"text": {"records": 1, "tokens": 4, "loss_tokens": 3}}


def test_prompt_completion_mask_token_by_token(tmp_path: Path) -> None:
    data = load_documents(write(tmp_path, {"prompt": "Q: 2+2?", "completion": " 4"}), TOK)
    (doc,) = data.documents
    want_ids, want_labels = expected_labels([("Q: 2+2?", False), (" 4", True), ("<eos>", True)])
    assert doc.input_ids == want_ids
    assert doc.labels == want_labels
    assert [t != IGNORE_INDEX for t in doc.labels] == [False] * 7 + [True] * 3
    stats = data.stats.formats["prompt_completion"]
    assert (stats.records, stats.tokens, stats.loss_tokens) == (1, 10, 3)


CHAT = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "no", "weight": 0},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "ok", "weight": 1},
    ]
}
# Loss on what the model generates after "<|assistant|>": the content and its "<|end|>".
CHAT_PIECES = [
    ("<|system|>", False),
    ("S", False),
    ("<|end|>", False),
    ("<|user|>", False),
    ("hi", False),
    ("<|end|>", False),
    ("<|assistant|>", False),
    ("yo", True),
    ("<|end|>", True),
    ("<|user|>", False),
    ("q", False),
    ("<|end|>", False),
    ("<|assistant|>", False),
    ("no", False),
    ("<|end|>", False),  # weight 0
    ("<|user|>", False),
    ("r", False),
    ("<|end|>", False),
    ("<|assistant|>", False),
    ("ok", True),
    ("<|end|>", True),
]


def test_chat_template_mask_token_by_token(tmp_path: Path) -> None:
    data = load_documents(write(tmp_path, CHAT), TOK)
    (doc,) = data.documents
    want_ids, want_labels = expected_labels(CHAT_PIECES)
    assert doc.input_ids == want_ids
    assert doc.labels == want_labels
    assert data.stats.chat_mask_fallbacks == 0
    assert data.stats.formats["chat"].loss_tokens == 6


def test_chat_without_template_uses_plain_format(tmp_path: Path) -> None:
    tok = copy.deepcopy(TOK)
    tok.chat_template = None
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (doc,) = load_documents(write(tmp_path, record), tok).documents
    want_ids, want_labels = expected_labels([("user: hi\nassistant: ", False), ("yo\n", True), ("<eos>", True)])
    assert (doc.input_ids, doc.labels) == (want_ids, want_labels)


def test_chat_template_that_rewrites_past_turns_falls_back_to_offsets(tmp_path: Path) -> None:
    tok = copy.deepcopy(TOK)
    # Renders the last message differently, so rendered prefixes are not prefixes of the whole chat.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}"
        "{% if loop.last %}!{% endif %}{{ '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    data = load_documents(write(tmp_path, record), tok)
    (doc,) = data.documents
    # Located by content: the message text is trained, the template's extras are not.
    want_ids, want_labels = expected_labels(
        [
            ("<|user|>", False),
            ("hi", False),
            ("<|end|>", False),
            ("<|assistant|>", False),
            ("yo", True),
            ("<|end|>", False),
            ("<|user|>", False),
            ("q", False),
            ("<|end|>", False),
            ("<|assistant|>", False),
            ("ok", True),
            ("!", False),
            ("<|end|>", False),
        ]
    )
    assert (doc.input_ids, doc.labels) == (want_ids, want_labels)
    assert data.stats.chat_mask_fallbacks == 1


def test_chat_template_error_is_a_data_error(tmp_path: Path) -> None:
    tok = copy.deepcopy(TOK)
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(DataError) as info:
        load_documents(write(tmp_path, {"text": "a"}, CHAT), tok, "training_file")
    assert str(info.value) == (
        "training_file line 2: the model's chat template cannot render this chat: System role not supported"
    )


def test_mixed_formats_in_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"text": "abc"}, CHAT, {"prompt": "p", "completion": "c"})
    data = load_documents(path, TOK)
    assert len(data.documents) == 3
    assert {k: v.records for k, v in data.stats.formats.items()} == {"text": 1, "chat": 1, "prompt_completion": 1}
    assert data.stats.records == 3
    assert data.stats.loss_tokens == 3 + 6 + 2
    assert validate_file(path) == {"text": 1, "chat": 1, "prompt_completion": 1}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ([1, 2], "each line must be a JSON object, got list"),
        (
            {"foo": 1},
            "a record needs 'text', 'messages', or 'prompt' and 'completion' (supervised), "
            "or 'input', 'preferred_output' and 'non_preferred_output' (preference)",
        ),
        ({"text": "a", "prompt": "b"}, "a record must use one format, found keys ['prompt', 'text']"),
        ({"text": "a", "id": 7}, "unknown field(s) ['id'] in a 'text' record"),
        ({"text": ""}, "'text' must be a non-empty string"),
        ({"text": 5}, "'text' must be a string, got int"),
        ({"prompt": "a"}, "a prompt/completion record needs 'completion'"),
        ({"prompt": "a", "completion": ""}, "'completion' must be a non-empty string"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role must be one of 'system', 'user', 'assistant', got 'tool'",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "'messages' has no assistant message to train on (with weight 1)",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "weight": 0}]},
            "'messages' has no assistant message to train on (with weight 1)",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "weight": 2}]},
            "messages[0].weight must be 0 or 1, got 2",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
            "messages[0]: 'weight' is only allowed on assistant messages",
        ),
        ({"messages": [{"role": "assistant"}]}, "messages[0] has no 'content'"),
        (
            {"messages": [{"role": "assistant", "content": "x", "extra": 1}]},
            "messages[0] has unexpected keys ['extra']",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}], "tools": []},
            "['tools'] are not supported (no tool or function calling)",
        ),
    ],
)
def test_bad_record_names_file_line_and_reason(tmp_path: Path, line: object, reason: str) -> None:
    path = write(tmp_path, {"text": "fine"}, line)
    with pytest.raises(DataError) as info:
        load_documents(path, TOK, "training_file")
    assert str(info.value) == f"training_file line 2: {reason}"
    assert (info.value.file, info.value.line, info.value.reason) == ("training_file", 2, reason)


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, raw=b'{"text": "a"}\n\n   \n{"text": \n')
    with pytest.raises(DataError, match=r"^training_file line 4: invalid JSON: Expecting value \(column 10\)$"):
        load_documents(path, TOK, "training_file")


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(DataError) as info:
        load_documents(write(tmp_path, raw=content), TOK, "training_file")
    assert str(info.value) == "training_file: contains no records (the file is empty)"
    assert info.value.line is None


def test_non_utf8_line(tmp_path: Path) -> None:
    path = write(tmp_path, raw=b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError) as info:
        load_documents(path, TOK, "validation_file")
    assert str(info.value) == "validation_file line 2: not valid UTF-8 (byte 0xff at column 11)"


def test_utf8_bom_and_multibyte_text(tmp_path: Path) -> None:
    path = write(tmp_path, raw='\ufeff{"text": "é"}\n'.encode())
    (doc,) = load_documents(path, TOK).documents
    assert doc.input_ids == [*ids("é"), EOS] and len(doc.input_ids) == 3  # é is two bytes


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^training_file: cannot be read"):
        load_documents(tmp_path / "nope.jsonl", TOK, "training_file")


def test_long_document_becomes_windows_with_nothing_dropped(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    data = load_documents(write(tmp_path, {"text": text}, {"prompt": "p" * 10, "completion": "c" * 5}), TOK)
    split = split_documents(data.documents, max_length=64)
    stats = split.stats
    assert stats.documents == 2 and stats.split_documents == 1
    assert stats.windows == 1 + 16  # 1001 tokens: 64 + 15 * 63 = 1009 >= 1001 > 64 + 14 * 63
    assert stats.loss_tokens == data.stats.loss_tokens == 1000 + 6
    assert stats.truncated_tokens == 0 and stats.skipped_windows == 0
    assert max(len(w) for w in split.windows) == 64
    # Rebuild the long document: each window after the first repeats one token.
    long_windows = [w for w in split.windows if w.document_index == 0]
    rebuilt = long_windows[0].input_ids + [t for w in long_windows[1:] for t in w.input_ids[1:]]
    assert rebuilt == data.documents[0].input_ids
