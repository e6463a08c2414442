"""The upload check: the same record rules the trainer applies (service/record/formats.py).

Refusing a bad file at upload, naming its first bad line ("line 3: ..."), saves a user
from learning about it minutes later from a failed job. Streaming and bounded: lines
are capped at `max_line_bytes` and JSON nesting is limited.
"""

from __future__ import annotations

from pathlib import Path

from service.record.formats import DataError, validate_file


class InvalidFile(ValueError):
    """The file cannot be used for training; the message names the line."""


def validate_jsonl(path: Path, *, max_line_bytes: int) -> tuple[int, str]:
    """Check every line; returns (number of records, formats joined by '+')."""
    try:
        counts = validate_file(path, "file", max_line_bytes=max_line_bytes)
    except DataError as e:
        raise InvalidFile(e.reason if e.line is None else f"line {e.line}: {e.reason}") from None
    return sum(counts.values()), "+".join(sorted(counts))
