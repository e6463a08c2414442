"""Validation loss by target position: which part of a long window the model predicts well.

A falling loss at late positions is what shows that a long-document adapter uses its
context; the mean over all tokens hides it (most targets of a corpus sit early in their
windows). The buckets are named here once ("0-1K", "1K-4K", ..., "64K+"); the worker's
metrics events, CSV columns and messages, and the dashboard take these names as they are.

Position: the index of the *target* token in the window the model sees (0-based), which
is also how many tokens of context precede it. In the Hugging Face convention
(`labels[p]` is predicted from the tokens before `p`) a window's targets sit at positions
1..L-1; the target at position p is predicted from the hidden state at index p - 1. Edge
1024 puts the target at position 1023 (1023 tokens of context) in "0-1K" and the one at
1024 in "1K-4K". Torch-free: the worker sizes its CSV columns from labels alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

POSITION_EDGES: tuple[int, ...] = (1024, 4096, 16384, 65536)
"""Where the buckets split: 0-1K, 1K-4K, 4K-16K, 16K-64K, 64K+ (K = 1024)."""

IGNORE_INDEX = -100


def check_edges(edges: Sequence[int]) -> None:
    """Edges must be positive and strictly increasing: a ValueError naming what is wrong."""
    if not edges or any(e < 1 for e in edges) or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"position bucket edges must be positive and strictly increasing, got {list(edges)}")


def _size(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_names(edges: Sequence[int] = POSITION_EDGES) -> list[str]:
    """The name of each bucket, in order: "0-1K", "1K-4K", ..., "64K+" for the default edges
    (an edge that is not a multiple of 1024 is written in tokens: "0-8", "8-32", "32+")."""
    check_edges(edges)
    lows = [0, *edges]
    names = [f"{_size(lo)}-{_size(hi)}" for lo, hi in zip(lows, edges, strict=False)]
    return [*names, f"{_size(edges[-1])}+"]


def position_spans(start: int, end: int, edges: Sequence[int] = POSITION_EDGES) -> list[tuple[int, int, int]]:
    """The target positions [start, end) cut at the bucket edges: (bucket, lo, hi) per piece, in order."""
    bounds = [0, *edges, max(end, edges[-1] + 1)]
    spans = []
    for bucket in range(len(edges) + 1):
        lo, hi = max(start, bounds[bucket]), min(end, bounds[bucket + 1])
        if lo < hi:
            spans.append((bucket, lo, hi))
    return spans


def buckets_with_targets(labels: Sequence[int], edges: Sequence[int] = POSITION_EDGES) -> set[int]:
    """The buckets holding at least one target of one window's (unshifted) labels; position 0
    is never a target (nothing precedes it)."""
    return {
        bucket
        for bucket, lo, hi in position_spans(1, len(labels), edges)
        if any(label != IGNORE_INDEX for label in labels[lo:hi])
    }


@dataclass
class PositionLosses:
    """Summed token cross-entropy and target count per bucket, to add across windows.

    Sums, not means, so that windows of different lengths combine into the mean over
    exactly each bucket's targets (a bucket's loss weighs every target the same).
    """

    edges: tuple[int, ...] = POSITION_EDGES
    sums: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_edges(self.edges)
        n = len(self.edges) + 1
        self.sums = self.sums or [0.0] * n
        self.counts = self.counts or [0] * n
        if len(self.sums) != n or len(self.counts) != n:
            raise ValueError(f"{len(self.sums)} sums and {len(self.counts)} counts for {n} position buckets")

    def add(self, other: PositionLosses) -> None:
        """Add another window's sums (the same edges)."""
        if other.edges != self.edges:
            raise ValueError(f"position buckets differ: edges {list(other.edges)} vs {list(self.edges)}")
        self.sums = [a + b for a, b in zip(self.sums, other.sums, strict=True)]
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]

    def means(self) -> dict[str, float]:
        """Mean token loss per bucket name, only the buckets that have targets, in bucket order."""
        return {
            name: total / count
            for name, total, count in zip(bucket_names(self.edges), self.sums, self.counts, strict=True)
            if count
        }
