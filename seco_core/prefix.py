"""prefix_tree_backward: several continuations of one long prefix, the prefix computed once.

The sequences `prefix + continuation_i` (i = 1..k) share their first P tokens. Their
loss is `sum_i w_i * CE_i`, CE_i the summed token cross-entropy of sequence i (its
prefix targets included). Chunk-wise, they form a tree of chunks:

* Stage 1 (no grad) runs the prefix's chunks once, keeping their K/V as blocks
  (kv_store.py), then each continuation's chunks on top of that cache. A branch's blocks
  are set aside before the next branch runs, so every branch sees exactly the prefix. Each
  sequence's CE comes out of stage 1 exactly, so the weights may depend on it
  (`weight_fn`; DPO's weight does, see dpo.py).
* Stage 2 back-propagates each branch's chunks in reverse with its weight w_i (the
  relay of chunked.py). Every branch attends to the same prefix blocks, so their K/V
  gradients add up in those blocks' (float32) gradient sums. Then the prefix's chunks
  are back-propagated once, their own targets weighted `sum_i w_i`, relaying that sum.

Both stages are chunked.py's `ChunkTree`, the loop a single sequence runs as a tree of one
segment: here the root segment is the shared prefix and each branch one more segment.

The parameter gradients equal those of the k weighted full-sequence backwards; the
prefix runs twice per model (stage 1, stage 2) instead of twice per continuation.

The boundary: the prefix's last position predicts each continuation's first label, so
its output differs per branch. The tree therefore shares tokens 0..P-2 and starts each
branch with token P-1 (one repeated token per branch).

SpaCO: every chunk of the tree (prefix chunks, then each branch's) is a node drawn by
`sampling.chunk_factors`. A gradient path runs through distinct nodes of one root-to-
leaf path, so with independent Bernoulli draws and factor 1/q it survives with
probability q^p and is scaled by q^-p: still exactly unbiased, whatever the weights,
because stage 1 (which fixes them) is never sampled.

Memory: at the start of stage 2 the blocks of the prefix and of every branch exist
together: a KV cache of P + sum_i n_i tokens, against P + n_i for one sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from seco_core.arch import check_length, model_parts
from seco_core.chunked import IGNORE_INDEX, Segment, chunk_bounds, chunk_tree, segment
from seco_core.config import ChunkConfig
from seco_core.kv_store import HostBuffers
from seco_core.sampling import chunk_factors


class Continuation(NamedTuple):
    """One branch of the tree; a plain `(input_ids, labels, weight)` tuple works too."""

    input_ids: torch.Tensor
    """(B, n) tokens that follow the prefix, n >= 1."""
    labels: torch.Tensor
    """(B, n) labels, unshifted (Hugging Face convention): labels[:, 0] is the target of
    the prefix's last position; -100 is ignored."""
    weight: float | torch.Tensor = 1.0
    """Multiplies this sequence's summed token cross-entropy: a float, or (B,) per row."""


WeightFn = Callable[[list[torch.Tensor]], Sequence[float | torch.Tensor]]
"""Called between the stages with each sequence's summed CE, (B,) float64 per
continuation; returns the weights to back-propagate with (replacing `Continuation.weight`)."""


@dataclass
class PrefixTreeOutput:
    ce_sums: list[torch.Tensor]
    """Per continuation: (B,) float64 summed token cross-entropy of the whole sequence
    (prefix and continuation targets), from stage 1. Its negative is the sequence's
    log-probability of its targets."""
    targets: list[int]
    """Per continuation: target tokens of the whole sequence (all rows)."""
    weights: list[torch.Tensor]
    """Per continuation: the (B,) float64 weights that were back-propagated."""
    num_chunks: int
    """Chunks of the tree: the shared prefix's plus every branch's."""
    chunks_backpropagated: int


def _segments(
    prefix_ids: torch.Tensor,
    prefix_labels: torch.Tensor | None,
    continuations: Sequence[Continuation],
    chunk_size: int,
) -> list[Segment]:
    """[shared prefix, branch 1, ..., branch k], validated, with shifted targets."""
    if prefix_ids.dim() != 2 or prefix_ids.shape[1] < 1:
        raise ValueError(f"prefix_ids must be (batch, length >= 1), got {tuple(prefix_ids.shape)}")
    if prefix_labels is None:
        prefix_labels = torch.full_like(prefix_ids, IGNORE_INDEX)
    if prefix_labels.shape != prefix_ids.shape:
        raise ValueError(
            f"prefix_labels must match prefix_ids {tuple(prefix_ids.shape)}, got {tuple(prefix_labels.shape)}"
        )
    if not continuations:
        raise ValueError("a prefix tree needs at least one continuation")
    batch, p = prefix_ids.shape
    segments = [segment(prefix_ids[:, :-1], prefix_labels[:, 1:], 0, chunk_size)]
    for i, cont in enumerate(continuations):
        ids, labels = cont[0], cont[1]
        if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] < 1 or labels.shape != ids.shape:
            raise ValueError(
                f"continuation {i}: input_ids and labels must both be ({batch}, n >= 1); "
                f"got {tuple(ids.shape)} and {tuple(labels.shape)}"
            )
        branch_ids = torch.cat([prefix_ids[:, -1:], ids], dim=1)
        branch_targets = torch.cat([labels, torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        segments.append(segment(branch_ids, branch_targets, p - 1, chunk_size))
    return segments


def tree_num_chunks(prefix_len: int, continuation_lens: Sequence[int], chunk_size: int) -> list[int]:
    """Chunks of the shared prefix and of each branch, in the order `backward_tree_with_factors` takes factors."""
    return [len(chunk_bounds(prefix_len - 1, chunk_size))] + [
        len(chunk_bounds(n + 1, chunk_size)) for n in continuation_lens
    ]


def _row_weights(weight: float | torch.Tensor, batch: int, device: torch.device, what: str) -> torch.Tensor:
    w = torch.as_tensor(weight, dtype=torch.float64).to(device)
    if w.dim() == 0:
        w = w.expand(batch)
    if w.shape != (batch,):
        raise ValueError(f"{what} must be a number or a ({batch},) tensor, got shape {tuple(w.shape)}")
    return w


def prefix_tree_backward(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    continuations: Sequence[Continuation | tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]],
    config: ChunkConfig,
    generator: torch.Generator | None = None,
    *,
    prefix_labels: torch.Tensor | None = None,
    weight_fn: WeightFn | None = None,
    host_buffers: HostBuffers | None = None,
) -> PrefixTreeOutput:
    """Accumulate the gradients of `sum_i w_i * CE_i` into `.grad`, the prefix computed once.

    model: a supported Hugging Face causal LM, plain or peft-wrapped. prefix_ids: (B, P);
    prefix_labels: (B, P) or None (no prefix targets). Each continuation: (input_ids,
    labels, weight), see `Continuation`. CE_i is the summed (not averaged) token
    cross-entropy of `cat(prefix, continuation_i)` with `cat(prefix_labels, labels_i)`.
    `weight_fn`, if given, sets the weights from stage 1's exact CE_i (see `WeightFn`).
    Like `chunked_backward` this only accumulates gradients; SpaCO draws over the tree's
    chunks with `generator`; `host_buffers` is the job's pool for KV offload.
    """
    conts = [Continuation(*c) for c in continuations]
    counts = tree_num_chunks(prefix_ids.shape[-1], [c.input_ids.shape[-1] for c in conts], config.chunk_size)
    factors = chunk_factors(sum(counts), config, generator)
    return backward_tree_with_factors(
        model,
        prefix_ids,
        conts,
        config,
        factors,
        prefix_labels=prefix_labels,
        weight_fn=weight_fn,
        host_buffers=host_buffers,
    )


def prefix_tree_loss(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    continuations: Sequence[Continuation | tuple[torch.Tensor, torch.Tensor]],
    config: ChunkConfig,
    *,
    prefix_labels: torch.Tensor | None = None,
    host_buffers: HostBuffers | None = None,
) -> list[torch.Tensor]:
    """Each sequence's summed token CE, (B,) float64, with no gradients (stage 1 only).

    A reference model's log-probabilities, or validation: the prefix still runs once.
    """
    conts = [Continuation(c[0], c[1]) for c in continuations]
    counts = tree_num_chunks(prefix_ids.shape[-1], [c.input_ids.shape[-1] for c in conts], config.chunk_size)
    out = backward_tree_with_factors(
        model, prefix_ids, conts, config, [0.0] * sum(counts), prefix_labels=prefix_labels, host_buffers=host_buffers
    )
    return out.ce_sums


def backward_tree_with_factors(
    model: nn.Module,
    prefix_ids: torch.Tensor,
    continuations: Sequence[Continuation],
    config: ChunkConfig,
    factors: list[float],
    *,
    prefix_labels: torch.Tensor | None = None,
    weight_fn: WeightFn | None = None,
    host_buffers: HostBuffers | None = None,
) -> PrefixTreeOutput:
    """prefix_tree_backward with the per-chunk factors given (0.0: not back-propagated).

    `factors` lists the shared prefix's chunks, then each branch's (`tree_num_chunks`).
    Exposed so tests can enumerate every SpaCO draw of a tree and check its expectation.
    """
    parts = model_parts(model)
    segments = _segments(prefix_ids, prefix_labels, continuations, config.chunk_size)
    batch, device = prefix_ids.shape[0], prefix_ids.device
    check_length(model, max(int(seg.positions[0, -1]) + 1 for seg in segments[1:]))
    counts = [len(seg.bounds) for seg in segments]
    if len(factors) != sum(counts):
        raise ValueError(f"{len(factors)} factors for a tree of {sum(counts)} chunks ({counts})")
    for i, seg in enumerate(segments):
        seg.factors = factors[sum(counts[:i]) : sum(counts[: i + 1])]
    n_targets = [int((seg.targets != IGNORE_INDEX).sum()) for seg in segments]
    if sum(n_targets) == 0:
        raise ValueError("no target tokens: every label after the first is -100")

    with chunk_tree(model, parts, segments, config, host_buffers) as tree:
        zero = torch.zeros(batch, dtype=torch.float64, device=device)
        ce = [sum((rows.double() for rows, _ in chunks), zero) for chunks in tree.stage1(score_all=True)]
        ce_sums = [ce[0] + ce[i] for i in range(1, len(segments))]
        raw = weight_fn(ce_sums) if weight_fn is not None else [c.weight for c in continuations]
        if len(raw) != len(continuations):
            raise ValueError(f"weight_fn returned {len(raw)} weights for {len(continuations)} continuations")
        weights = [_row_weights(w, batch, device, f"weight {i}") for i, w in enumerate(raw)]
        # The prefix's own targets belong to every sequence: weighted by the sum.
        tree.stage2([torch.stack(weights).sum(0), *weights])

    return PrefixTreeOutput(
        ce_sums=ce_sums,
        targets=[n_targets[0] + n for n in n_targets[1:]],
        weights=weights,
        num_chunks=sum(counts),
        chunks_backpropagated=sum(f != 0.0 for f in factors),
    )
