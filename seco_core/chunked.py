"""chunked_backward: one training step's gradients, one chunk's graph at a time.

Stage 1 (no grad) runs the chunks in order and keeps every chunk's per-layer K/V as
detached blocks m'_j (kv_store.py). Stage 2 walks the chunks in reverse: it rebuilds
chunk j's graph on top of the blocks m'_1..m'_{j-1}, and back-propagates

    f_j * (J_j + sum_layers <K_j, dK'_j> + <V_j, dV'_j>)

where J_j is chunk j's summed token cross-entropy over the whole sequence's target count,
K_j/V_j are the freshly computed (graph-connected) states, and dK'_j/dV'_j are the
gradients that later chunks sent to the blocks of chunk j (summed in float32 by the
store). The inner products relay those gradients into chunk j's graph without hooks,
and the backward sends new gradients to the blocks of earlier chunks. With f_j = 1 for
every chunk (SeCO) the parameter gradients equal one full-sequence backward; SpaCO sets
f_j = 0 for skipped chunks and compensates the others (see sampling.py).

The loop is written once, `ChunkTree`, over segments of chunks: a sequence is one
segment; a prefix tree (prefix.py) is its shared prefix and a segment per continuation.

Memory: the blocks and their gradient sums grow with the sequence (the KV cache), on
the device or, with KV offload, in host memory; the activations and logits are those of
one chunk.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seco_core import cache as chunk_cache
from seco_core.arch import ModelParts, check_length, model_parts
from seco_core.config import ChunkConfig
from seco_core.kv_store import DeviceStore, HostBuffers, HostStore, KVBlock, KVStore
from seco_core.position_buckets import POSITION_EDGES, PositionLosses, check_edges, position_spans
from seco_core.sampling import chunk_factors

IGNORE_INDEX = -100


@dataclass
class ChunkedOutput:
    loss: float
    """Mean token cross-entropy over the non-ignored targets of the whole batch."""
    num_chunks: int
    chunks_backpropagated: int
    tokens: int
    """Target tokens (non-ignored, after the shift) the loss is averaged over."""
    correct_tokens: int = 0
    """Of those, the targets the model's argmax predicts (ties go to the lowest token id, as
    `torch.argmax`). Counted slice by slice from the logits the loss computes anyway, so
    no full-vocabulary logits are kept for it."""

    @property
    def token_accuracy(self) -> float:
        """correct_tokens / tokens: OpenAI's mean token accuracy."""
        return self.correct_tokens / self.tokens if self.tokens else 0.0


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: position t predicts labels[t + 1] (Hugging Face convention)."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _slice_stats(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of one slice, (B,) each: the summed cross-entropy (logits in float32, or the
    model's dtype if wider) and the count of targets whose argmax is right.

    An ignored target (-100) never equals an argmax (>= 0), so it is never counted right.
    """
    logits = head(hidden)  # (B, s, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    correct = (logits.detach().argmax(dim=-1) == targets).sum(dim=1)
    return ce.view(targets.shape).sum(dim=1), correct


def chunk_row_stats(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, slice_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token CE and right-argmax count of each row of a chunk, (B,) each, without
    holding its full-vocabulary logits.

    hidden: (B, c, H); targets: (B, c). Logits exist for `slice_len` tokens at a time;
    under grad each slice is checkpointed so backward recomputes its logits instead of
    keeping them. A chunk that fits in one slice is computed directly (no recompute).
    The argmax is taken from the same logits as the loss: accuracy costs no extra pass.
    """
    c = hidden.shape[1]
    if c <= slice_len:
        return _slice_stats(head, hidden, targets)
    recompute = torch.is_grad_enabled()
    total = torch.zeros(targets.shape[0], device=hidden.device)
    correct = torch.zeros(targets.shape[0], dtype=torch.long, device=hidden.device)
    for s in range(0, c, slice_len):
        args = (head, hidden[:, s : s + slice_len], targets[:, s : s + slice_len])
        part, right = checkpoint(_slice_stats, *args, use_reentrant=False) if recompute else _slice_stats(*args)
        total = total + part
        correct = correct + right
    return total, correct


def chunks_with_targets(targets: torch.Tensor, bounds: list[tuple[int, int]]) -> list[bool]:
    """Per chunk, whether any of its (shifted) targets is not ignored.

    A chunk without targets (inside a prompt) needs no output projection at all: for a
    small model with a large vocabulary the head costs more than the decoder layers.
    """
    if not bounds:
        return []
    flags = torch.stack([(targets[:, s:e] != IGNORE_INDEX).any() for s, e in bounds])
    return [bool(f) for f in flags.tolist()]  # one device sync for all chunks


def run_chunk(
    parts: ModelParts, cache: chunk_cache.ChunkCache, input_ids: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """One chunk through the decoder on top of the cached prefix: (B, c) ids -> (B, c, H) hidden states.

    The chunk's fresh K/V are left in the cache (`cache.current()`) for the caller to
    push as blocks (stage 1) or relay into (stage 2). The cache goes in under the keyword
    the decoder's signature names (`ModelParts.cache_keyword`): transformers 5.17 knows
    only `past_key_values` and would swallow `cache` in `**kwargs`, building a cache of
    its own; newer releases call it `cache` and deprecate the old name.
    """
    kwargs: dict[str, Any] = {parts.cache_keyword: cache}
    out = parts.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=True, **kwargs)
    return out.last_hidden_state


def relay_objective(
    loss: torch.Tensor,
    current: list[tuple[torch.Tensor, torch.Tensor]],
    relayed: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> torch.Tensor:
    """`loss + sum_layers <K_j, dK'_j> + <V_j, dV'_j>`: the scalar stage 2 back-propagates for chunk j.

    `current` are the chunk's freshly computed (graph-connected) K/V per layer, `relayed`
    the gradients later chunks (of every branch, in a prefix tree) sent to its blocks
    (`ChunkCache.pop_last`; None where none were kept). Back-propagating the inner
    products relays them into the chunk's graph without hooks.
    """
    objective = loss
    for (k_new, v_new), grads in zip(current, relayed, strict=True):
        if grads is not None:
            objective = objective + (k_new * grads[0]).sum() + (v_new * grads[1]).sum()
    return objective


@contextlib.contextmanager
def _checkpointed(layers: nn.ModuleList, enabled: bool) -> Iterator[None]:
    """Run each decoder layer under activation checkpointing (non-reentrant) while active.

    The layer's inputs are kept and its internals recomputed in backward. Its cache write
    is simply repeated by the recomputation, with the same values.
    """
    if not enabled:
        yield
        return
    originals = [layer.forward for layer in layers]
    for layer, forward in zip(layers, originals, strict=True):
        layer.forward = functools.partial(checkpoint, forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, originals, strict=True):
            layer.forward = forward


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random state a chunk's stage-1 pass starts from, so stage 2 replays its dropout masks."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


Scored = tuple[torch.Tensor, torch.Tensor]
"""One chunk's per-row summed CE and right-argmax count, (B,) each (`chunk_row_stats`)."""
Scorer = Callable[["Segment", int, torch.Tensor], Scored]
"""Scores chunk j of a segment from its last hidden states (B, c, H)."""


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of a `length`-token sequence; the last one may be shorter."""
    return [(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]


@dataclass
class Segment:
    """Consecutive chunks of one sequence: a whole sequence, or a prefix tree's shared prefix
    or one of its branches (prefix.py)."""

    input_ids: torch.Tensor  # (B, n)
    targets: torch.Tensor  # (B, n): position t predicts targets[:, t] (already shifted)
    positions: torch.Tensor  # (B, n) absolute positions
    bounds: list[tuple[int, int]]
    has_targets: list[bool]
    factors: list[float] = field(default_factory=list)
    """Per chunk, set before the stages: multiplies its loss and relay (0.0: not back-propagated)."""


def segment(ids: torch.Tensor, targets: torch.Tensor, offset: int, chunk_size: int) -> Segment:
    """The segment of `ids` (B, n) at absolute positions offset..offset+n-1, cut into chunks."""
    batch, length = ids.shape
    positions = torch.arange(offset, offset + length, device=ids.device).unsqueeze(0).expand(batch, -1)
    bounds = chunk_bounds(length, chunk_size)
    return Segment(ids, targets, positions, bounds, chunks_with_targets(targets, bounds))


class ChunkTree:
    """SeCO's two stages over a tree of segments sharing one chunk cache (`chunk_tree`).

    segments[0] is the root: a whole sequence (then the only segment), or a prefix tree's
    shared prefix. Every other segment is a branch that continues the root: stage 1 runs
    the root's chunks, then each branch's on top of them, setting the branch's blocks aside
    afterwards so that every branch sees exactly the root. Stage 2 brings each branch back
    and sweeps it in reverse (the K/V gradients of all branches add up in the root's
    blocks' float32 sums), then sweeps the root, relaying those sums.
    """

    def __init__(
        self, parts: ModelParts, cache: chunk_cache.ChunkCache, segments: list[Segment], config: ChunkConfig
    ) -> None:
        self.parts, self.cache, self.segments, self.config = parts, cache, segments, config
        self.device = segments[0].input_ids.device
        self.rng_states: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in segments]
        self.set_aside: list[list[list[KVBlock]]] = [[] for _ in segments]  # per branch, per chunk (last first)
        self.final_rng = _rng_state(self.device)

    def stage1(self, *, score_all: bool, score: Scorer | None = None) -> list[list[Scored]]:
        """No grad: each segment's chunks in order, left in the cache as blocks.

        Returns per segment the scores of the chunks with targets that it computed: all of
        them with `score_all` (each sequence's exact CE before stage 2, which a prefix
        tree's weights may depend on), else only those stage 2 will not revisit. `score`
        replaces the plain chunk score (validation's loss by position splits each chunk).
        """
        score = score or self._score
        branch_selected = any(any(seg.factors) for seg in self.segments[1:])
        scored: list[list[Scored]] = [[] for _ in self.segments]
        with torch.no_grad():
            for i, seg in enumerate(self.segments):
                for j in range(len(seg.bounds)):
                    factor = seg.factors[j]
                    self.rng_states[i].append(_rng_state(self.device))
                    hidden = self._run(seg, j)
                    if seg.has_targets[j] and (score_all or factor == 0.0):
                        scored[i].append(score(seg, j, hidden))
                    # A block needs gradient sums only if it will relay them: its own chunk is
                    # back-propagated and some later back-propagated chunk attends to it.
                    later = any(seg.factors[j + 1 :]) or (i == 0 and branch_selected)
                    self.cache.push_current(factor != 0.0 and later)
                if i > 0:
                    self.set_aside[i] = [self.cache.set_aside_last() for _ in seg.bounds]
        self.final_rng = _rng_state(self.device)
        return scored

    def stage2(self, weights: list[torch.Tensor]) -> list[list[Scored]]:
        """Back-propagate every branch, then the root, with weights[i] (B,) on segment i's rows.

        Returns per segment the scores of the chunks it back-propagated. The random state
        is left where stage 1 left it, as if each chunk had run once.
        """
        scored: list[list[Scored]] = [[] for _ in self.segments]
        for i in [*range(1, len(self.segments)), 0]:
            self.restore(i)
            scored[i] = self._sweep(i, weights[i])
        _set_rng_state(self.device, self.final_rng)
        return scored

    def restore(self, i: int) -> None:
        """Put segment i's set-aside blocks back on top of the cache."""
        while self.set_aside[i]:
            self.cache.restore(self.set_aside[i].pop())

    def _sweep(self, i: int, weight: torch.Tensor) -> list[Scored]:
        """Stage 2 of segment i, whose blocks are on top of the cache: its chunks in reverse.

        Chunk j back-propagates `f_j * (sum_rows weight * CE_j + relay)`, replaying the
        random state of its stage-1 pass. A branch pops all its blocks (also those of chunks
        not back-propagated) so that the cache is back to the root afterwards; the root
        stops once no earlier chunk is back-propagated: the rest of the cache is dead.
        """
        seg, scored = self.segments[i], []
        for j in reversed(range(len(seg.bounds))):
            relayed = self.cache.pop_last()
            factor = seg.factors[j]
            if factor == 0.0:
                continue
            _set_rng_state(self.device, self.rng_states[i][j])
            with torch.enable_grad():
                hidden = self._run(seg, j)
                if seg.has_targets[j]:
                    rows, right = self._score(seg, j, hidden)
                    loss = (rows * weight.to(rows.dtype)).sum()
                    scored.append((rows.detach(), right))
                else:
                    loss = torch.zeros((), device=self.device)
                objective = relay_objective(loss, self.cache.current(), relayed)
                if objective.requires_grad:
                    (objective * factor).backward()
            del relayed, hidden, objective, loss
            if i == 0 and not any(seg.factors[:j]):
                break
        return scored

    def _run(self, seg: Segment, j: int) -> torch.Tensor:
        s, e = seg.bounds[j]
        return run_chunk(self.parts, self.cache, seg.input_ids[:, s:e], seg.positions[:, s:e])  # (B, c, H)

    def _score(self, seg: Segment, j: int, hidden: torch.Tensor) -> Scored:
        s, e = seg.bounds[j]
        return chunk_row_stats(self.parts.head, hidden, seg.targets[:, s:e], self.config.loss_slice)


@contextlib.contextmanager
def chunk_tree(
    model: nn.Module, parts: ModelParts, segments: list[Segment], config: ChunkConfig, host_buffers: HostBuffers | None
) -> Iterator[ChunkTree]:
    """A ChunkTree on a chunk cache on the store `config` asks for (device, or host with KV
    offload), the model attending through it and (optionally) checkpointing its layers.

    At the end, blocks still set aside (after an error) go back to the cache, whose closing
    releases every block.
    """
    device = segments[0].input_ids.device
    store: KVStore = HostStore(device, config.chunk_size, host_buffers) if config.offload_kv else DeviceStore()
    cache = chunk_cache.ChunkCache(parts.num_layers, store)
    with (
        contextlib.closing(cache),
        chunk_cache.activate(model, cache),
        _checkpointed(parts.layers, config.layer_checkpointing),
    ):
        tree = ChunkTree(parts, cache, segments, config)
        try:
            yield tree
        finally:
            for i in range(len(segments)):
                tree.restore(i)


def chunked_backward(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    config: ChunkConfig,
    generator: torch.Generator | None = None,
    *,
    loss_scale: float = 1.0,
    host_buffers: HostBuffers | None = None,
) -> ChunkedOutput:
    """Accumulate the gradients of the mean token loss into `.grad`, chunk by chunk.

    model: a supported Hugging Face causal LM, plain or peft-wrapped. input_ids, labels:
    (B, L) LongTensors, labels unshifted with -100 ignored. Like `loss.backward()` this
    accumulates into `.grad` of trainable parameters and leaves the optimizer to the
    caller. `generator` makes SpaCO's chunk draw reproducible. Dropout stays consistent:
    each chunk's recomputation replays the random state its stage-1 pass used.
    `loss_scale` multiplies the gradients (not the returned loss), e.g. to weight a
    window by its share of the targets when accumulating over several windows.
    `host_buffers` (with `config.offload_kv`): a pool of host buffers to keep across a
    job's steps, so that pinned host memory is allocated once rather than every step.
    """
    if input_ids.dim() != 2 or input_ids.shape != labels.shape:
        raise ValueError(
            f"input_ids and labels must both be (batch, length); got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    num_chunks = -(-input_ids.shape[-1] // config.chunk_size)
    factors = chunk_factors(num_chunks, config, generator)
    return backward_with_factors(
        model, input_ids, labels, config, factors, loss_scale=loss_scale, host_buffers=host_buffers
    )


@dataclass
class EvaluationOutput(ChunkedOutput):
    by_position: PositionLosses = field(default_factory=PositionLosses)
    """Summed loss and target count per target-position bucket (position_buckets.py), from
    the same logits as `loss`: their sums add up to it."""


@torch.no_grad()
def chunked_evaluate(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    config: ChunkConfig,
    *,
    host_buffers: HostBuffers | None = None,
    position_edges: tuple[int, ...] = POSITION_EDGES,
) -> EvaluationOutput:
    """Loss, token accuracy and loss by target position of a long sequence with no gradients
    (validation): stage 1 only, one pass.

    Takes the training step's own `config`, so a sequence that only fits with the K/V
    cache offloaded to host memory is validated with it offloaded too. Each chunk's
    targets are cut at the bucket edges (`position_edges`, positions as defined in
    position_buckets.py: the target's index in the sequence, the context before it) and
    each piece's summed cross-entropy goes to its bucket, so the buckets cost no second
    pass and no per-token loss tensor.
    """
    if input_ids.dim() != 2 or input_ids.shape != labels.shape:
        raise ValueError(
            f"input_ids and labels must both be (batch, length); got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    check_edges(position_edges)
    parts = model_parts(model)
    check_length(model, input_ids.shape[1])
    device = input_ids.device
    seg = segment(input_ids, shifted_targets(labels), 0, config.chunk_size)
    if not any(seg.has_targets):
        raise ValueError("labels have no target tokens (every label after the first is -100)")
    seg.factors = [0.0] * len(seg.bounds)
    sums = torch.zeros(len(position_edges) + 1, dtype=torch.float64, device=device)
    counts = torch.zeros(len(position_edges) + 1, dtype=torch.long, device=device)

    def by_bucket(seg: Segment, j: int, hidden: torch.Tensor) -> Scored:
        """The chunk's targets cut at the bucket edges, each piece's CE summed into its bucket."""
        s, e = seg.bounds[j]
        rows_sum = torch.zeros(hidden.shape[0], dtype=torch.float64, device=device)
        right_sum = torch.zeros(hidden.shape[0], dtype=torch.long, device=device)
        for bucket, lo, hi in position_spans(s + 1, e + 1, position_edges):
            piece = seg.targets[:, lo - 1 : hi - 1]
            rows, right = chunk_row_stats(parts.head, hidden[:, lo - 1 - s : hi - 1 - s], piece, config.loss_slice)
            sums[bucket] += rows.sum().double()
            counts[bucket] += (piece != IGNORE_INDEX).sum()
            rows_sum, right_sum = rows_sum + rows.double(), right_sum + right
        return rows_sum, right_sum

    with chunk_tree(model, parts, [seg], config, host_buffers) as tree:
        scored = tree.stage1(score_all=True, score=by_bucket)[0]
    correct = torch.stack([right.sum() for _, right in scored]).sum()
    bucket_counts = [int(c) for c in counts.tolist()]  # one device sync for the whole sequence
    n_targets = sum(bucket_counts)
    return EvaluationOutput(
        loss=float(sums.sum()) / n_targets,
        num_chunks=len(seg.bounds),
        chunks_backpropagated=0,
        tokens=n_targets,
        correct_tokens=int(correct),
        by_position=PositionLosses(tuple(position_edges), [float(x) for x in sums.tolist()], bucket_counts),
    )


def chunked_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    config: ChunkConfig,
    *,
    host_buffers: HostBuffers | None = None,
) -> float:
    """The mean token loss of `chunked_evaluate`."""
    return chunked_evaluate(model, input_ids, labels, config, host_buffers=host_buffers).loss


def backward_with_factors(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    config: ChunkConfig,
    factors: list[float],
    *,
    loss_scale: float = 1.0,
    host_buffers: HostBuffers | None = None,
) -> ChunkedOutput:
    """chunked_backward with the per-chunk factors given (0.0: not back-propagated).

    A factor multiplies its chunk's loss and relay, so it compounds along gradient
    paths (SpaCO's compensation); `loss_scale` multiplies only the losses, so it
    scales every gradient exactly once.

    Exposed so tests can enumerate every SpaCO draw and check its expectation exactly.
    """
    parts = model_parts(model)
    batch, length = input_ids.shape
    check_length(model, length)
    targets = shifted_targets(labels)
    n_targets = int((targets != IGNORE_INDEX).sum())
    if n_targets == 0:
        raise ValueError("labels have no target tokens (every label after the first is -100)")
    seg = segment(input_ids, targets, 0, config.chunk_size)
    if len(factors) != len(seg.bounds):
        raise ValueError(f"{len(factors)} factors for {len(seg.bounds)} chunks")
    seg.factors = factors
    weight = torch.full((batch,), loss_scale / n_targets, dtype=torch.float64, device=input_ids.device)

    with chunk_tree(model, parts, [seg], config, host_buffers) as tree:
        scored = tree.stage1(score_all=False)[0]  # chunks stage 2 does not revisit
        scored += tree.stage2([weight])[0]  # every chunk with targets is scored once

    return ChunkedOutput(
        loss=float(sum(rows.sum().double() for rows, _ in scored)) / n_targets,
        num_chunks=len(seg.bounds),
        chunks_backpropagated=sum(f != 0.0 for f in factors),
        tokens=n_targets,
        correct_tokens=int(sum(right.sum() for _, right in scored)),
    )
