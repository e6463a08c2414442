"""Validation loss by target position, from the chunk-wise pass, equals a plain computation:
one full forward of the model, per-token cross-entropy, grouped by the target's position."""

from __future__ import annotations

from bisect import bisect_right

import pytest
import torch
import torch.nn.functional as F

from seco_core import ChunkConfig, chunked_evaluate
from seco_core.position_buckets import (
    POSITION_EDGES,
    PositionLosses,
    bucket_names,
    buckets_with_targets,
    position_spans,
)
from tests.seco_core.tiny import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")  # float64, max_position_embeddings 2048


def plain_bucket_means(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, edges: tuple[int, ...]
) -> dict[str, float]:
    """Full forward, per-token CE; the target labels[b, p] (predicted from the tokens before p)
    is at position p and goes to the bucket of p."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    names = bucket_names(edges)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for b in range(ids.shape[0]):
        for p in range(1, ids.shape[1]):
            if labels[b, p] == -100:
                continue
            name = names[bisect_right(edges, p)]
            sums[name] = sums.get(name, 0.0) + float(ce[b, p - 1])
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in names if name in counts}


def batch(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[1, length // 3 : length // 2] = -100  # a masked span in one row
    return ids, labels


def test_bucket_names_and_spans() -> None:
    assert bucket_names() == ["0-1K", "1K-4K", "4K-16K", "16K-64K", "64K+"]
    assert bucket_names((8, 32)) == ["0-8", "8-32", "32+"]
    assert position_spans(1000, 5000) == [(0, 1000, 1024), (1, 1024, 4096), (2, 4096, 5000)]
    assert position_spans(70000, 70100) == [(4, 70000, 70100)]
    with pytest.raises(ValueError, match="strictly increasing, got \\[8, 8\\]"):
        bucket_names((8, 8))


def test_buckets_with_targets_skip_masked_positions() -> None:
    labels = [-100] * 10 + [5] * 3  # targets at positions 10..12 only
    assert buckets_with_targets(labels, (4, 8, 16)) == {2}
    assert buckets_with_targets([7, 7], (4,)) == {0}, "position 0 is never a target"


@pytest.mark.parametrize(
    ("chunk", "loss_slice", "offload"), [(7, 3, False), (16, 1024, False), (5, 2, True), (45, 4, False)]
)
def test_small_edges_match_the_plain_computation(
    model: torch.nn.Module, chunk: int, loss_slice: int, offload: bool
) -> None:
    """Edges that fall inside chunks, on chunk boundaries (chunk 16, edge 32) and inside loss slices."""
    edges = (5, 12, 32)
    ids, labels = batch(45)
    cfg = ChunkConfig(chunk_size=chunk, loss_slice=loss_slice, offload_kv=offload)
    out = chunked_evaluate(model, ids, labels, cfg, position_edges=edges)
    expected = plain_bucket_means(model, ids, labels, edges)
    got = out.by_position.means()
    assert list(got) == list(expected) == ["0-5", "5-12", "12-32", "32+"]
    assert got == pytest.approx(expected, rel=1e-12)
    # the buckets partition the targets: together they are the validation loss, unchanged
    assert sum(out.by_position.counts) == out.tokens
    assert sum(out.by_position.sums) / out.tokens == pytest.approx(out.loss, rel=1e-12)
    with torch.no_grad():  # the loss in float64 (`model(labels=...)` would upcast to float32 only)
        logits = model(input_ids=ids).logits
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert out.loss == pytest.approx(plain.item(), rel=1e-12)


def test_the_real_edges_on_a_window_past_1k(model: torch.nn.Module) -> None:
    ids, labels = batch(1300, seed=1)
    out = chunked_evaluate(model, ids, labels, ChunkConfig(chunk_size=200, loss_slice=64))
    expected = plain_bucket_means(model, ids, labels, POSITION_EDGES)
    assert list(out.by_position.means()) == ["0-1K", "1K-4K"]
    assert out.by_position.means() == pytest.approx(expected, rel=1e-12)
    assert out.by_position.counts[1] == 2 * (1300 - 1024), "positions 1024..1299 of both rows"


def test_sums_add_across_windows() -> None:
    total = PositionLosses((4,))
    total.add(PositionLosses((4,), [3.0, 0.0], [3, 0]))
    total.add(PositionLosses((4,), [1.0, 4.0], [1, 2]))
    assert total.means() == {"0-4": 1.0, "4+": 2.0}
    with pytest.raises(ValueError, match="position buckets differ"):
        total.add(PositionLosses((8,)))


def test_no_targets_is_a_clear_error(model: torch.nn.Module) -> None:
    ids = torch.randint(3, VOCAB, (1, 10))
    with pytest.raises(ValueError, match="no target tokens"):
        chunked_evaluate(model, ids, torch.full_like(ids, -100), ChunkConfig(chunk_size=4))
