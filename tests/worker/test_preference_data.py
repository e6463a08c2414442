"""Preference (DPO) training files: validation by line, and prompt/answer tokens checked token by token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from service.record.formats import DataError, validate_file
from tests.worker.byte_tokens import EOS, TOK, ids
from worker.data import load_documents, load_preferences
from worker.preference import check_pair_lengths


def pair(prompt: str = "Q?", good: str = "yes", bad: str = "no", **extra: Any) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": prompt}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
        **extra,
    }


def write(tmp_path: Path, *records: object) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_and_answers_with_the_chat_template(tmp_path: Path) -> None:
    data = load_preferences(write(tmp_path, pair(), pair("Why?", "because", "dunno")), TOK, "training_file")
    first = data.pairs[0]
    assert first.prompt == ids("<|system|>", "S", "<|end|>", "<|user|>", "Q?", "<|end|>", "<|assistant|>")
    assert first.chosen == ids("yes", "<|end|>")  # the answer and its end-of-turn marker
    assert first.rejected == ids("no", "<|end|>")
    assert (first.line, data.pairs[1].line) == (1, 2)
    assert len(first) == len(first.prompt) + len(first.chosen)  # prompt + the longer answer
    assert first.tokens == len(first.prompt) + len(first.chosen) + len(first.rejected)
    second_prompt = len(first.prompt) - len("Q?") + len("Why?")
    assert data.stats.as_dict() == {
        "records": 2,
        "prompt_tokens": len(first.prompt) + second_prompt,
        "answer_tokens": len("yes") + len("no") + len("because") + len("dunno") + 4,  # bytes + 4 end markers
        "longest": second_prompt + len("because") + 1,
    }
    assert validate_file(write(tmp_path, pair())) == {"preference": 1}


def test_plain_format_without_a_template_ends_answers_with_eos(tmp_path: Path) -> None:
    tok = PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, eos_token="<|endoftext|>")
    assert not tok.chat_template
    (got,) = load_preferences(write(tmp_path, pair()), tok).pairs
    assert got.prompt == tok("system: S\nuser: Q?\nassistant: ")["input_ids"]
    assert got.chosen == [*tok("yes\n")["input_ids"], EOS]
    assert got.rejected == [*tok("no\n")["input_ids"], EOS]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {**pair(), "preferred_output": {"role": "assistant", "content": "x"}},
            "'preferred_output' must be a list with one assistant message",
        ),
        (
            {**pair(), "preferred_output": [{"role": "assistant", "content": "a"}] * 2},
            "'preferred_output' must be a list with one assistant message",
        ),
        (
            {**pair(), "non_preferred_output": [{"role": "user", "content": "x"}]},
            "non_preferred_output[0].role must be 'assistant', got 'user'",
        ),
        (
            {**pair(), "preferred_output": [{"role": "assistant", "content": "x", "weight": 1}]},
            "preferred_output[0]: 'weight' has no meaning in a preference record",
        ),
        (
            {k: v for k, v in pair().items() if k != "non_preferred_output"},
            "a preference record needs ['non_preferred_output'] too",
        ),
        ({**pair(), "input": [{"role": "user", "content": "x"}]}, "'input' must be an object with 'messages'"),
        ({**pair(), "input": {"messages": []}}, "'input.messages' must be a non-empty list"),
        (
            {**pair(), "input": {"messages": [{"role": "user", "content": "x"}], "tools": []}},
            "input ['tools'] are not supported (no tool or function calling)",
        ),
        (
            {**pair(), "input": {"messages": [{"role": "user", "content": "x"}], "temperature": 1}},
            "unknown field(s) ['temperature'] in 'input'",
        ),
        (
            {**pair(), "input": {"messages": [{"role": "wizard", "content": "x"}]}},
            "input.messages[0].role must be one of 'system', 'user', 'assistant', got 'wizard'",
        ),
        (pair(good="same", bad="same"), "'preferred_output' and 'non_preferred_output' are the same answer"),
        (pair(id=3), "unknown field(s) ['id'] in a 'preference' record"),
        (
            {"text": "a supervised record"},
            "a supervised record in a file of preference records (line 1 is one); a file holds either preference "
            "pairs (for method 'dpo') or supervised records, not both",
        ),
    ],
)
def test_bad_preference_record_names_file_line_and_reason(tmp_path: Path, record: object, reason: str) -> None:
    """The same rule at upload (validate_file) and in the worker (load_preferences)."""
    path = write(tmp_path, pair(), record)
    with pytest.raises(DataError) as info:
        load_preferences(path, TOK, "training_file")
    assert str(info.value) == f"training_file line 2: {reason}"
    with pytest.raises(DataError) as at_upload:
        validate_file(path, "file")
    assert at_upload.value.reason == reason and at_upload.value.line == 2


def test_a_supervised_file_in_a_dpo_job_and_the_reverse(tmp_path: Path) -> None:
    text = write(tmp_path, {"text": "hello"})
    with pytest.raises(DataError, match=r"^training_file line 1: a text record: a job with method 'dpo' trains on"):
        load_preferences(text, TOK, "training_file")
    prefs = write(tmp_path, pair())
    with pytest.raises(DataError, match=r'^training_file line 1: a preference pair .* method=\{"type": "dpo"\}$'):
        load_documents(prefs, TOK, "training_file")


def test_a_pair_longer_than_max_length_is_refused_by_line(tmp_path: Path) -> None:
    data = load_preferences(write(tmp_path, pair(), pair(prompt="a much longer question " * 3)), TOK)
    check_pair_lengths(data.pairs, 100, "training_file", "set by the job")
    with pytest.raises(DataError) as info:
        check_pair_lengths(data.pairs, 40, "training_file", "set by the job")
    assert info.value.line == 2
    assert str(info.value) == (
        f"training_file line 2: this preference pair is {len(data.pairs[1])} tokens (prompt "
        f"{len(data.pairs[1].prompt)} + the longer answer 4), longer than max_length 40 (set by the job); "
        "raise seco.max_length or shorten the prompt"
    )
