"""Token accuracy counted inside the chunked loss equals the plain model's logits' argmax.

Labels are built so that about half of the targets are the model's own argmax prediction,
so the count is far from 0 and from all: an off-by-one shift, a chunk counted twice or
skipped, or a slice boundary lost would change it.
"""

from __future__ import annotations

import pytest
import torch

from seco_core import ChunkConfig, chunked_backward, chunked_evaluate
from seco_core.arch import model_parts
from seco_core.chunked import chunk_row_stats
from tests.seco_core.tiny import VOCAB, tiny_model


def half_right_batch(model: torch.nn.Module, length: int = 45) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, labels, right): labels agree with the model's argmax at every other position.

    `right` is the plain model's count of non-ignored targets whose argmax is the label.
    """
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)  # (B, L): position t predicts token t+1
    labels = torch.randint(3, VOCAB, (2, length), generator=g)
    labels[:, 1::2] = predicted[:, :-1][:, 0::2]  # label t+1 = argmax at t, for odd t+1
    labels[:, :6] = -100  # a prompt with no loss
    labels[1, 20:25] = -100  # and a masked span in the second row
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    targets = labels[:, 1:]
    right = int(((logits[:, :-1].argmax(-1) == targets) & (targets != -100)).sum())
    return ids, labels, right


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")  # float64: no near-ties that rounding could flip


def test_the_batch_is_neither_all_right_nor_all_wrong(model: torch.nn.Module) -> None:
    _, labels, right = half_right_batch(model)
    n = int((labels[:, 1:] != -100).sum())
    assert 0.3 * n < right < 0.7 * n


@pytest.mark.parametrize(("chunk", "loss_slice"), [(45, 1024), (9, 1024), (7, 3), (16, 5)])
def test_seco_counts_the_plain_argmax(model: torch.nn.Module, chunk: int, loss_slice: int) -> None:
    ids, labels, right = half_right_batch(model)
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=chunk, loss_slice=loss_slice))
    model.zero_grad(set_to_none=True)
    assert out.correct_tokens == right
    assert out.token_accuracy == pytest.approx(right / out.tokens)


@pytest.mark.parametrize("sampling", ["bernoulli", "fixed"])
def test_spaco_counts_every_chunk_once(model: torch.nn.Module, sampling: str) -> None:
    """Skipped chunks are counted in stage 1, back-propagated ones in stage 2: all of them, once."""
    ids, labels, right = half_right_batch(model)
    cfg = ChunkConfig(chunk_size=5, mode="spaco", budget=3, sampling=sampling, loss_slice=2)  # type: ignore[arg-type]
    for seed in range(3):
        out = chunked_backward(model, ids, labels, cfg, generator=torch.Generator().manual_seed(seed))
        assert 0 < out.chunks_backpropagated < out.num_chunks or sampling == "bernoulli"
        assert out.correct_tokens == right
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
def test_evaluate_counts_the_plain_argmax(model: torch.nn.Module, offload: bool) -> None:
    ids, labels, right = half_right_batch(model)
    cfg = ChunkConfig(chunk_size=10, offload_kv=offload, layer_checkpointing=offload, loss_slice=4)
    out = chunked_evaluate(model, ids, labels, cfg)
    assert out.correct_tokens == right and out.chunks_backpropagated == 0
    assert all(p.grad is None for p in model.parameters())


def test_slices_under_grad_count_like_one_pass(model: torch.nn.Module) -> None:
    """The checkpointed slices (recomputed in backward) count as the unsliced head does,
    and backward through them still works."""
    head = model_parts(model).head
    hidden = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 11))
    targets[0, 3] = -100
    with torch.no_grad():
        whole_ce, whole_right = chunk_row_stats(head, hidden, targets, slice_len=64)
    ce, right = chunk_row_stats(head, hidden, targets, slice_len=3)
    ce.sum().backward()
    assert torch.equal(right, whole_right) and torch.allclose(ce, whole_ce, rtol=1e-13)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    model.zero_grad(set_to_none=True)
