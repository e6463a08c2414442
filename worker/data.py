"""Read and validate a JSONL training file, and tokenise it into loss-masked documents.

Three record formats, told apart by their keys; one file may mix them (each line is
validated on its own, and the stats count each format separately):

* `{"text": str}`: continued pre-training. Loss on every token; the tokenizer's EOS is
  appended so the model learns where a document ends.
* `{"prompt": str, "completion": str}`: loss on the completion (and the EOS after it)
  only. Prompt and completion are tokenised separately and concatenated, so the mask
  boundary is exact and the completion starts on a token boundary, as at inference.
* `{"messages": [{"role", "content", "weight"?}, ...]}`: chat, rendered with the
  tokenizer's chat template (else a plain `"role: content\\n"` format). Loss only on what
  the model must *generate* for each assistant message with weight 1: the tokens after
  the generation prompt (`<|assistant|>` or the template's equivalent) up to the end of
  the message, its end-of-turn marker included. See `_chat_document` for how the mask
  is computed exactly.

Keys of other formats in one record are an error; other keys (e.g. an "id") are ignored.
Every document's first label is -100: no token precedes it, so it is never a target,
and writing that down keeps the loss-token counts equal to the true number of targets.

Preference pairs (`{"input", "preferred_output", "non_preferred_output"}`, for DPO jobs)
are read by `load_preferences`: the prompt is the input chat rendered with the
generation prompt, each answer the text that rendering the chat with the answer adds
to it, tokenised on its own (as at inference, where generation starts at the prompt's
last token; TRL tokenises prompt and completion apart too).

The record formats and their validation live in service/record/formats.py (shared with the API's
upload check); this module adds tokenisation and loss masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seco_core.windows import IGNORE_INDEX, Document
from service.record.formats import (
    ChatRecord,
    DataError,
    Message,
    PreferenceRecord,
    PromptCompletionRecord,
    Record,
    TextRecord,
    read_records,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class FormatStats:
    records: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    """Targets: tokens whose label is not -100."""


@dataclass
class DataStats:
    """Per-format counts, for the job's events."""

    formats: dict[str, FormatStats] = field(default_factory=dict)
    chat_mask_fallbacks: int = 0
    """Chats whose template could not be rendered as token prefixes, masked from
    character offsets instead (see `_chat_document`)."""

    def add(self, fmt: str, document: Document) -> None:
        stats = self.formats.setdefault(fmt, FormatStats())
        stats.records += 1
        stats.tokens += len(document.input_ids)
        stats.loss_tokens += sum(1 for label in document.labels if label != IGNORE_INDEX)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.formats.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.formats.values())

    @property
    def loss_tokens(self) -> int:
        return sum(s.loss_tokens for s in self.formats.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "formats": {name: asdict(s) for name, s in self.formats.items()},
            "chat_mask_fallbacks": self.chat_mask_fallbacks,
        }


@dataclass
class TokenizedData:
    documents: list[Document]
    stats: DataStats


# --------------------------------------------------------------------------- tokenising


def _document(input_ids: list[int], labels: list[int]) -> Document:
    """Build a Document whose first label is -100 (never a target, see the module docstring)."""
    labels = list(labels)
    labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError("no token of this record carries loss")
    return Document(list(input_ids), labels)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


def _text_document(tokenizer: PreTrainedTokenizerBase, record: TextRecord) -> Document:
    ids = _with_eos(tokenizer, _encode(tokenizer, record.text, special=True))
    return _document(ids, ids)


def _prompt_completion_document(tokenizer: PreTrainedTokenizerBase, record: PromptCompletionRecord) -> Document:
    prompt = _encode(tokenizer, record.prompt, special=True) if record.prompt else []
    completion = _with_eos(tokenizer, _encode(tokenizer, record.completion, special=False))
    if not prompt:  # keep a BOS when the tokenizer uses one, even with an empty prompt
        prompt = [t for t in _encode(tokenizer, "", special=True) if t != tokenizer.eos_token_id]
    return _document(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


class _ChatRenderer:
    """Renders (a prefix of) a chat to text and tokens, with the template or the plain format.

    A chat template carries its own BOS / special tokens, so its text is tokenised
    without adding special tokens (as `apply_chat_template(tokenize=True)` does); the
    plain format is ordinary text and gets the tokenizer's usual special tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def text(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if self.templated:
            rendered = self.tokenizer.apply_chat_template(
                [m.as_template_dict() for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            return str(rendered)
        text = "".join(f"{m.role}: {m.content}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text, special=not self.templated)


def _is_prefix(prefix: Sequence[Any], whole: Sequence[Any]) -> bool:
    return len(prefix) <= len(whole) and list(whole[: len(prefix)]) == list(prefix)


def _token_spans(renderer: _ChatRenderer, messages: Sequence[Message], full: list[int]) -> list[tuple[int, int]] | None:
    """Token [start, end) of each trained assistant message, or None if prefixes do not line up.

    start = tokens of the chat so far plus the generation prompt; end = tokens of the
    chat up to and including this message. Both must be token prefixes of the whole
    chat, or the mask would not describe the sequence actually trained on.
    """
    spans = []
    for i, message in enumerate(messages):
        if not message.trained:
            continue
        try:
            start = renderer.encode(renderer.text(messages[:i], add_generation_prompt=True))
            end = renderer.encode(renderer.text(messages[: i + 1], add_generation_prompt=False))
        except Exception:  # a template may refuse a partial chat (e.g. one without a user turn)
            return None
        if not (_is_prefix(start, end) and _is_prefix(end, full)):
            return None
        spans.append((len(start), len(end)))
    return spans


def _char_spans(renderer: _ChatRenderer, messages: Sequence[Message], full: str) -> list[tuple[int, int]]:
    """Character [start, end) of each trained assistant message in the rendered chat.

    Prefers the same prefix rule as `_token_spans` on text; when a template renders
    earlier turns differently once later turns exist (e.g. it strips reasoning from
    past turns), falls back to locating the message content itself.
    """
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if not message.trained:
            continue
        try:
            start = renderer.text(messages[:i], add_generation_prompt=True)
            end = renderer.text(messages[: i + 1], add_generation_prompt=False)
            aligned = end.startswith(start) and full.startswith(end) and len(start) >= cursor
        except Exception:
            aligned = False
        if aligned:
            span = (len(start), len(end))
        else:
            found = full.find(message.content, cursor)
            if found < 0:
                raise ValueError(f"cannot locate messages[{i}] in the chat rendered by the template")
            span = (found, found + len(message.content))
        spans.append(span)
        cursor = span[1]
    return spans


def _offset_labels(renderer: _ChatRenderer, full: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(renderer.tokenizer, "is_fast", False):
        raise ValueError("the chat template cannot be rendered incrementally and the tokenizer has no offsets")
    encoded = renderer.tokenizer(full, add_special_tokens=not renderer.templated, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def _chat_document(renderer: _ChatRenderer, record: ChatRecord, stats: DataStats) -> Document:
    """Tokenise a chat with loss on the trained assistant messages only.

    Exact mask by incremental rendering: the targets of assistant message i are the
    tokens that rendering messages[:i+1] adds to rendering messages[:i] followed by the
    generation prompt. When the renders are not token prefixes of the whole chat (BPE
    merges across a boundary, or a template that rewrites past turns), the targets are
    instead the tokens of the whole chat whose first character lies in the message's
    character span (from the tokenizer's offset mapping).
    """
    messages = record.messages
    try:
        full_text = renderer.text(messages, add_generation_prompt=False)
    except Exception as exc:  # jinja2 errors, or raise_exception() inside the template
        raise ValueError(f"the model's chat template cannot render this chat: {exc}") from None
    ids = renderer.encode(full_text)
    spans = _token_spans(renderer, messages, ids)
    labels = [IGNORE_INDEX] * len(ids)
    if spans is not None:
        for start, end in spans:
            labels[start:end] = ids[start:end]
    else:
        stats.chat_mask_fallbacks += 1
        ids, offsets = _offset_labels(renderer, full_text)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in _char_spans(renderer, messages, full_text):
            for k, (a, b) in enumerate(offsets):
                if a < b and start <= a < end:
                    labels[k] = ids[k]
    if not renderer.templated and renderer.tokenizer.eos_token_id is not None:
        # The plain format has no end-of-turn marker: EOS after the chat, a target when
        # the chat ends with a trained assistant message (so the model learns to stop).
        eos = renderer.tokenizer.eos_token_id
        ids = [*ids, eos]
        labels = [*labels, eos if messages[-1].trained else IGNORE_INDEX]
    return _document(ids, labels)


def tokenize_record(tokenizer: PreTrainedTokenizerBase, record: Record, stats: DataStats | None = None) -> Document:
    """One record as a Document with its loss mask; raises ValueError if nothing is trainable."""
    stats = stats if stats is not None else DataStats()
    if isinstance(record, TextRecord):
        return _text_document(tokenizer, record)
    if isinstance(record, PromptCompletionRecord):
        return _prompt_completion_document(tokenizer, record)
    if isinstance(record, PreferenceRecord):
        raise ValueError(
            "a preference pair (input / preferred_output / non_preferred_output) in a supervised job: "
            'train on preference pairs with method={"type": "dpo"}'
        )
    return _chat_document(_ChatRenderer(tokenizer), record, stats)


def load_documents(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, display_name: str | None = None
) -> TokenizedData:
    """Validate and tokenise every record of a JSONL file.

    Raises DataError (file, line, reason) at the first record that is invalid or has
    nothing to train on. Split the documents with `seco_core.windows.split_documents`.
    """
    name = display_name or Path(path).name
    stats = DataStats()
    documents = []
    for number, record in read_records(path, name):
        try:
            document = tokenize_record(tokenizer, record, stats)
        except ValueError as exc:
            raise DataError(name, number, str(exc)) from None
        stats.add(record.format, document)
        documents.append(document)
    return TokenizedData(documents, stats)


# --------------------------------------------------------------------------- preference pairs


@dataclass(frozen=True)
class PreferencePair:
    """A tokenised preference record: every answer token is a target."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    line: int
    """Line of the record in its file, for messages about it."""

    def __len__(self) -> int:
        """The longer of the two sequences, prompt + answer: what max_length bounds."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def tokens(self) -> int:
        """Tokens a DPO step processes per model and stage: the prompt once, both answers."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class PreferenceStats:
    records: int = 0
    prompt_tokens: int = 0
    answer_tokens: int = 0
    longest: int = 0
    """Longest prompt + answer of any pair (tokens)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    stats: PreferenceStats


def _preference_pair(renderer: _ChatRenderer, record: PreferenceRecord, line: int) -> PreferencePair:
    try:
        prompt_text = renderer.text(record.input, add_generation_prompt=True)
        full_texts = [
            renderer.text([*record.input, a], add_generation_prompt=False)
            for a in (record.preferred, record.non_preferred)
        ]
    except Exception as exc:  # jinja2 errors, or raise_exception() inside the template
        raise ValueError(f"the model's chat template cannot render this record: {exc}") from None
    prompt = renderer.encode(prompt_text)
    if not prompt:
        raise ValueError("the prompt renders to no tokens")
    answers = []
    for key, text in zip(("preferred_output", "non_preferred_output"), full_texts, strict=True):
        if not text.startswith(prompt_text):
            raise ValueError(f"the chat template renders the input differently once {key} follows it")
        ids = _encode(renderer.tokenizer, text[len(prompt_text) :], special=False)
        if not renderer.templated:  # the plain format has no end-of-turn marker: EOS ends the answer
            ids = _with_eos(renderer.tokenizer, ids)
        if not ids:
            raise ValueError(f"{key} renders to no tokens")
        answers.append(ids)
    return PreferencePair(prompt, answers[0], answers[1], line)


def load_preferences(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, display_name: str | None = None
) -> PreferenceData:
    """Validate and tokenise every preference pair of a JSONL file (a DPO job's data).

    Raises DataError (file, line, reason) at the first record that is not a preference
    pair or cannot be rendered.
    """
    name = display_name or Path(path).name
    renderer = _ChatRenderer(tokenizer)
    stats = PreferenceStats()
    pairs = []
    for number, record in read_records(path, name):
        if not isinstance(record, PreferenceRecord):
            raise DataError(
                name,
                number,
                f"a {record.format} record: a job with method 'dpo' trains on preference pairs, "
                'one {"input", "preferred_output", "non_preferred_output"} object per line',
            )
        try:
            pair = _preference_pair(renderer, record, number)
        except ValueError as exc:
            raise DataError(name, number, str(exc)) from None
        stats.records += 1
        stats.prompt_tokens += len(pair.prompt)
        stats.answer_tokens += len(pair.chosen) + len(pair.rejected)
        stats.longest = max(stats.longest, len(pair))
        pairs.append(pair)
    return PreferenceData(pairs, stats)
