"""Turn tokenised documents into training windows of at most `max_length` tokens.

A document longer than `max_length` becomes consecutive windows; nothing is truncated
or dropped silently, and `WindowStats` accounts for every token.

Labels follow the Hugging Face convention: unshifted, -100 ignored, and the model
predicts `labels[t]` from the tokens before `t` *within the same window* (the shift
happens inside the loss). Two consequences shape this module:

* A window's first label is never a target: nothing precedes it in the window. We set
  it to -100 explicitly so that counting `labels != -100` gives the true number of
  targets (the loss is unchanged: the shifted loss never reads it).
* Consecutive windows of one document therefore overlap by exactly one token: window
  k+1 starts with the last token of window k. That token is repeated as *context only*
  (its label in window k+1 is -100), so every target of the document after its first
  token is trained exactly once, with as much context as the window allows. The price
  is one repeated input token per continuation window (`WindowStats.repeated_tokens`).

Windows never span two documents (no packing), so no token attends across a document
boundary. Batches are right-padded with `pad_token_id` and label -100: in a causal model
a token only attends to earlier positions, so pads at the *end* of a sequence never
influence the real tokens before them, and their -100 labels keep them out of the loss.
Right padding is therefore exact (the same loss and gradients as the unpadded windows
run one by one, up to how the loss is averaged over the batch) and needs no attention
mask, which also keeps the positions of the KV cache in SeCO / SpaCO chunking simple.

This module imports torch only inside `collate_windows`, so splitting and counting are
cheap to use from processes that never train.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
"""Label value the Hugging Face cross-entropy ignores."""


@dataclass(frozen=True)
class Document:
    """One tokenised training example, before it is split into windows."""

    input_ids: list[int]
    """Token ids of the whole document."""

    labels: list[int]
    """Same length as `input_ids`; the token id where the token carries loss, else -100."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids and labels must have the same length, got {len(self.input_ids)} and {len(self.labels)}"
            )
        if not self.input_ids:
            raise ValueError("a document must have at least one token")


@dataclass(frozen=True)
class Window:
    """At most `max_length` consecutive tokens of one document."""

    input_ids: list[int]
    labels: list[int]
    """labels[0] is always -100 (never a target: nothing precedes it in the window)."""

    document_index: int
    """Index of the source document in the sequence given to `split_documents`."""

    start: int
    """Offset of input_ids[0] inside the source document."""

    @property
    def num_targets(self) -> int:
        """Tokens this window trains on (the denominator contribution of its loss)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class WindowStats:
    """Where every token went, for the job's events.

    Invariant: `document_tokens + repeated_tokens == tokens + skipped_tokens`.
    """

    max_length: int
    documents: int = 0
    """Documents read."""
    document_tokens: int = 0
    """Tokens in those documents."""
    split_documents: int = 0
    """Documents longer than max_length, hence split into several windows."""
    windows: int = 0
    """Windows kept for training."""
    tokens: int = 0
    """Tokens in the kept windows (what the model processes, repeated tokens included)."""
    loss_tokens: int = 0
    """Targets in the kept windows (labels != -100)."""
    repeated_tokens: int = 0
    """One per continuation window: its first token repeats the previous window's last."""
    skipped_windows: int = 0
    """Windows with no target at all (e.g. inside a long prompt): they could not change
    the gradient, so they are counted here and not trained."""
    skipped_tokens: int = 0
    """Tokens in the skipped windows."""
    truncated_tokens: int = 0
    """Always 0: documents are split, never truncated. Kept so events can say so."""

    def summary(self) -> str:
        """One line for the job's events."""
        text = (
            f"{self.documents} documents ({self.document_tokens} tokens) -> {self.windows} windows of "
            f"at most {self.max_length} tokens: {self.tokens} tokens, {self.loss_tokens} trained; "
            f"{self.split_documents} documents split, {self.truncated_tokens} tokens truncated"
        )
        if self.skipped_windows:
            text += (
                f"; {self.skipped_windows} windows ({self.skipped_tokens} tokens) skipped "
                "because no token in them carries loss"
            )
        return text


@dataclass
class WindowSplit:
    """Result of `split_documents`."""

    windows: list[Window]
    stats: WindowStats


@dataclass
class WindowBatch:
    """Right-padded windows; shapes (batch, longest window)."""

    input_ids: torch.Tensor
    """(B, T) LongTensor, padded on the right with pad_token_id."""
    labels: torch.Tensor
    """(B, T) LongTensor, -100 on pads and on every window's first position."""
    num_targets: int
    """Targets in the batch: the denominator of the mean token loss."""
    lengths: list[int] = field(default_factory=list)
    """Unpadded length of each window."""


def window_bounds(length: int, max_length: int) -> list[tuple[int, int]]:
    """[start, end) of each window of a `length`-token document.

    Windows after the first start one token before the previous one ends (see the
    module docstring), so the stride is max_length - 1. The last window may be short.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a window needs context and a target), got {max_length}")
    bounds = [(0, min(length, max_length))]
    while bounds[-1][1] < length:
        start = bounds[-1][1] - 1
        bounds.append((start, min(length, start + max_length)))
    return bounds


def _window(document: Document, index: int, start: int, end: int) -> Window:
    labels = list(document.labels[start:end])
    labels[0] = IGNORE_INDEX  # never a target: nothing precedes it inside the window
    return Window(list(document.input_ids[start:end]), labels, index, start)


def split_documents(documents: Iterable[Document], max_length: int) -> WindowSplit:
    """Split documents into windows of at most `max_length` tokens, accounting for every token.

    Windows with no target are skipped and counted in the stats rather than trained,
    since they carry no loss and, cut off from later windows, provide no context either.
    """
    stats = WindowStats(max_length=max_length)
    windows: list[Window] = []
    for index, document in enumerate(documents):
        bounds = window_bounds(len(document.input_ids), max_length)
        stats.documents += 1
        stats.document_tokens += len(document.input_ids)
        stats.split_documents += len(bounds) > 1
        stats.repeated_tokens += len(bounds) - 1
        for start, end in bounds:
            window = _window(document, index, start, end)
            if window.num_targets == 0:
                stats.skipped_windows += 1
                stats.skipped_tokens += len(window)
                continue
            windows.append(window)
            stats.windows += 1
            stats.tokens += len(window)
            stats.loss_tokens += window.num_targets
    return WindowSplit(windows, stats)


def collate_windows(windows: Sequence[Window], pad_token_id: int) -> WindowBatch:
    """Stack windows into one right-padded batch (exact: see the module docstring)."""
    import torch

    if not windows:
        raise ValueError("cannot collate an empty list of windows")
    width = max(len(w) for w in windows)
    input_ids = torch.full((len(windows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window.input_ids, dtype=torch.long)
        labels[row, : len(window)] = torch.tensor(window.labels, dtype=torch.long)
    return WindowBatch(
        input_ids=input_ids,
        labels=labels,
        num_targets=sum(w.num_targets for w in windows),
        lengths=[len(w) for w in windows],
    )


def batch_windows(
    windows: Sequence[Window],
    batch_size: int,
    pad_token_id: int,
    *,
    group_by_length: bool = False,
) -> list[WindowBatch]:
    """Consecutive batches of `batch_size` windows (the last may be smaller).

    `group_by_length=True` sorts windows by length first (stable), so each batch holds
    windows of (nearly) equal length and little compute goes to padding; the order of
    the batches then follows length, so a trainer should shuffle the batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ordered = sorted(windows, key=len) if group_by_length else list(windows)
    return [collate_windows(ordered[i : i + batch_size], pad_token_id) for i in range(0, len(ordered), batch_size)]
