"""Splitting documents into windows: every target trained once, padding exact."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seco_core.windows import (
    IGNORE_INDEX,
    Document,
    Window,
    batch_windows,
    collate_windows,
    split_documents,
    window_bounds,
)


def _text_document(length: int, offset: int = 0) -> Document:
    ids = [(offset + i) % 50 + 1 for i in range(length)]
    return Document(ids, [IGNORE_INDEX, *ids[1:]])


def test_window_bounds_overlap_by_one_token() -> None:
    assert window_bounds(3, 4) == [(0, 3)]
    assert window_bounds(4, 4) == [(0, 4)]
    assert window_bounds(5, 4) == [(0, 4), (3, 5)]
    assert window_bounds(10, 4) == [(0, 4), (3, 7), (6, 10)]
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        window_bounds(10, 1)


def test_document_validates_lengths() -> None:
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        Document([1, 2], [1])
    with pytest.raises(ValueError, match="at least one token"):
        Document([], [])


def test_every_target_is_trained_exactly_once() -> None:
    doc = _text_document(10)
    split = split_documents([doc], max_length=4)
    assert [(w.start, w.input_ids) for w in split.windows] == [
        (0, doc.input_ids[0:4]),
        (3, doc.input_ids[3:7]),
        (6, doc.input_ids[6:10]),
    ]
    # The first label of every window is masked: nothing precedes it inside the window.
    assert [w.labels[0] for w in split.windows] == [IGNORE_INDEX] * 3
    trained = [w.start + k for w in split.windows for k, label in enumerate(w.labels) if label != IGNORE_INDEX]
    assert trained == list(range(1, 10))  # positions 1..9, each once, in order
    assert all(w.labels[k] == doc.labels[w.start + k] for w in split.windows for k in range(1, len(w)))
    stats = split.stats
    assert (stats.documents, stats.document_tokens, stats.split_documents) == (1, 10, 1)
    assert (stats.windows, stats.tokens, stats.loss_tokens, stats.repeated_tokens) == (3, 12, 9, 2)
    assert (stats.skipped_windows, stats.skipped_tokens, stats.truncated_tokens) == (0, 0, 0)


def test_windows_without_targets_are_counted_and_skipped() -> None:
    ids = list(range(1, 13))
    prompt_only = Document(ids, [IGNORE_INDEX] * 9 + ids[9:])  # targets at positions 9..11
    short = _text_document(3)
    split = split_documents([prompt_only, short], max_length=4)
    # prompt_only windows: (0,4) (3,7) (6,10) (9,12); the first two have no target.
    # (6,10) keeps position 9 as a target; (9,12) starts at 9, whose label it masks.
    assert [(w.document_index, w.start) for w in split.windows] == [(0, 6), (0, 9), (1, 0)]
    assert [w.num_targets for w in split.windows] == [1, 2, 2]
    stats = split.stats
    assert (stats.skipped_windows, stats.skipped_tokens) == (2, 8)
    assert (stats.documents, stats.split_documents, stats.windows, stats.loss_tokens) == (2, 1, 3, 5)
    assert stats.document_tokens + stats.repeated_tokens == stats.tokens + stats.skipped_tokens
    assert "2 windows (8 tokens) skipped" in stats.summary()


def test_collate_pads_right_with_ignored_labels() -> None:
    windows = [Window([5, 6, 7], [IGNORE_INDEX, 6, 7], 0, 0), Window([8, 9], [IGNORE_INDEX, 9], 1, 0)]
    batch = collate_windows(windows, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch.input_ids.dtype == torch.long
    assert (batch.num_targets, batch.lengths) == (3, [3, 2])
    with pytest.raises(ValueError, match="empty"):
        collate_windows([], pad_token_id=0)


def test_batch_windows_groups_by_length() -> None:
    split = split_documents([_text_document(n, offset=n) for n in (5, 2, 4, 3)], max_length=8)
    plain = batch_windows(split.windows, batch_size=2, pad_token_id=0)
    assert [b.lengths for b in plain] == [[5, 2], [4, 3]]
    grouped = batch_windows(split.windows, batch_size=3, pad_token_id=0, group_by_length=True)
    assert [b.lengths for b in grouped] == [[2, 3, 4], [5]]
    with pytest.raises(ValueError, match="batch_size"):
        batch_windows(split.windows, batch_size=0, pad_token_id=0)


def test_right_padding_is_exact_for_a_causal_model() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).double().eval()
    split = split_documents([_text_document(9), _text_document(5, offset=7)], max_length=6)
    batch = collate_windows(split.windows, pad_token_id=0)
    with torch.no_grad():
        padded = model(input_ids=batch.input_ids, labels=batch.labels)
        total = torch.zeros((), dtype=torch.float64)
        for row, window in enumerate(split.windows):
            ids = torch.tensor([window.input_ids])
            alone = model(input_ids=ids, labels=torch.tensor([window.labels]))
            torch.testing.assert_close(padded.logits[row, : len(window)], alone.logits[0], rtol=0, atol=1e-12)
            total += alone.loss.double() * window.num_targets
    # The Hugging Face loss is computed in float32 even for a float64 model.
    torch.testing.assert_close(padded.loss.double(), total / batch.num_targets, rtol=1e-6, atol=0)
